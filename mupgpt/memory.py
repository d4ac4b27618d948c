"""Per-rank device and host memory of a training run, predicted from its shape (scripts/estimate_memory.py
and scripts/plan.py print it).

Per rank, in bytes per parameter (P parameters from the real model built on the meta device, N
ranks, w = 2 in bf16/fp16 and 4 in fp32): the ZeRO paper's accounting (Rajbhandari et al. 2020)
corrected to what DeepSpeed and FSDP2 allocate, as tests/mem_probe.py counts it on CPU
(tests/test_estimate_memory.py holds this module to those counts):

  stage 0 (single, DDP)  4 weights + 4 gradients + 8 Adam, all fp32 (bf16 only inside autocast)
  ZeRO-1                 w weights + w gradients + 12/N fp32 master and Adam (DeepSpeed keeps the
                         master apart from the weights even in fp32) + 4/N in bf16/fp16: the gradient
                         partition copied to fp32 for the optimizer step
  ZeRO-2                 as ZeRO-1, gradients sharded: w/N
  ZeRO-3                 as ZeRO-2, weights sharded: w/N; plus the gathered weights: a weight stays
                         gathered from forward to backward while fewer than stage3_max_reuse_distance
                         (1e9) elements are fetched in between, up to stage3_max_live_parameters (1e9),
                         so below 1e9 parameters the whole model does (w x P), and a reduce bucket of gradients
                         (one layer, at least 2^20 elements: bucket_elements in engines/deepspeed_config.py)
  FSDP2 (fsdp)           (4 + 4 + 8)/N fp32 shards; plus two groups of blocks gathered (one or two
                         blocks a group: engines/fsdp.py's blocks_per_group), each weight with its
                         gradient and that gradient's fp32 copy for the reduce-scatter
  offload cpu            Adam, master and fp32 gradients (16/N) and the weight shards (w/N) on the
                         host, x1.5 for DeepSpeed's pinned buffers (18 B/param x 1.5 in bf16, its own
                         estimate_zero3_model_states_mem_needs); offload_ratio r < 1 keeps the
                         fraction 1 - r of the 16/N on the device. nvme: on disk instead.

Activations per layer use s*b*h*34 bytes in half precision for a pre-LN GPT block with flash
attention (Korthikanti et al. 2022, without the s^2 attention term; a llama block keeps more: about
s*b*h*44 bytes at its default MLP and half as many K/V heads, see layer_activations), s*b*h*2 with activation
checkpointing plus one recomputed layer; the logits add s*b*V*(2 + 4 + 4) bytes (logits, fp32 loss
input, gradient). All terms are summed though not all are alive at once, so it is an estimate, not a bound
(bench/RESULTS.md compares it with measured peaks). arch llama counts its own parameters (SwiGLU,
grouped K/V, no position table) and its own activations.
"""
import functools
import math

import torch

from mup_model import GPT, GPTConfig
from mupgpt.engines.deepspeed_config import bucket_elements
from mupgpt.engines.fsdp import blocks_per_group, gathered_bytes
from mupgpt.errors import UsageError

GIB = 2**30
MAX_LIVE = 1e9  # stage3_max_live_parameters and stage3_max_reuse_distance: DeepSpeed's defaults, ds_configs/zero3*.json


def count_params(args):
    """(parameters, config, one block's matrix elements) of the model the flags describe, built on the meta
    device once per shape."""
    return _count((args.vocab, args.seq_len, args.n_layer, args.n_head, args.head_width, args.arch, args.n_kv_head,
                   args.mlp_hidden))


@functools.lru_cache(maxsize=64)
def _count(shape):
    vocab, seq_len, n_layer, n_head, head_width, arch, n_kv_head, mlp_hidden = shape
    try:
        cfg = GPTConfig(vocab_size=64 * math.ceil(vocab / 64), block_size=seq_len, n_layer=n_layer,
                        n_head=n_head, head_width=head_width, arch=arch, n_kv_head=n_kv_head,
                        mlp_hidden=mlp_hidden)
    except ValueError as e:
        raise UsageError(str(e)) from None
    with torch.device("meta"):
        model = GPT(cfg)
    layer = sum(p.numel() for p in model.h[0].parameters() if p.dim() == 2)  # a block's matrices
    return sum(p.numel() for p in model.parameters()), cfg, layer


def layer_activations(cfg):
    """Values per token one block keeps for backward (as counted with saved-tensor hooks on CPU).
    gpt2: each LayerNorm's input and output, q, k, v, the attention output and the projection's input,
    and the MLP's hidden before and after GELU: 7h + 2kv + 2f with kv = h (17h: Korthikanti's 34 bytes in half
    precision).
    llama: RMSNorm also keeps its normalised input (for the gain's gradient), k and v are n_kv_head wide,
    RoPE's rotated q and k are kept besides the unrotated projection, and SwiGLU keeps four hidden-wide
    tensors (gate, silu(gate), up, their product): 10h + 3kv + 4f (22.2h at f = 8/3 h, n_kv_head = n_head / 2)."""
    h, f, kv = cfg.width, cfg.mlp_hidden, cfg.n_kv_head * cfg.head_width
    if cfg.arch == "llama":
        return 3 * 2 * h + (h + 2 * kv) + (h + kv) + 2 * h + 4 * f
    return 2 * 2 * h + (h + 2 * kv) + 2 * h + 2 * f


def estimate(args):
    for flag in ("n_layer", "n_head", "head_width", "vocab", "seq_len", "batch", "world_size"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be at least 1, not {getattr(args, flag)}")
    if args.stage not in (0, 1, 2, 3):
        raise UsageError(f"--stage must be 0, 1, 2 or 3, not {args.stage}")
    if args.fsdp and (args.stage != 3 or args.offload != "none"):
        raise UsageError("--fsdp is sharded like ZeRO-3 and without offload here: pass --stage 3 and no --offload")
    if args.offload != "none" and args.stage != 3:
        raise UsageError("--offload needs --stage 3")
    if not 0 <= args.offload_ratio <= 1 or (args.offload_ratio < 1 and args.offload != "cpu"):
        raise UsageError("--offload_ratio is a fraction in [0, 1] and needs --offload cpu")
    n_params, cfg, layer = count_params(args)
    N, P = args.world_size, n_params
    half = args.precision in ("bf16", "fp16")
    w = 2 if half else 4  # bytes of a weight or gradient in the training precision
    gathered = 0.0
    if args.stage == 0:
        weights, grads, optim = 4 * P, 4 * P, 8 * P
    elif args.fsdp:
        weights, grads, optim = 4 * P / N, 4 * P / N, 8 * P / N
        block = gathered_bytes(layer, half)
        gathered = 2 * blocks_per_group(block) * block
    else:
        weights = w * P / N if args.stage == 3 else w * P
        grads = (w * P / N if args.stage >= 2 else w * P) + (4 * P / N if half else 0)
        optim = 12 * P / N
        if args.stage == 3:  # weights reused within MAX_LIVE elements stay gathered from forward to backward,
            # and the gradients wait in a full reduce bucket before their reduce-scatter
            gathered = w * (min(P, MAX_LIVE) + max(layer, bucket_elements(cfg.width)))
    host = 0.0
    if args.offload == "cpu":
        # DeepSpeed keeps the offloaded gradients in fp32 (4 B, not 2) and reserves 1.5x for its pinned
        # buffers (its own estimate_zero3_model_states_mem_needs: 18 B/param x 1.5); bench/RESULTS.md
        # compares this rule with the host and device memory of offloaded runs on a GPU machine.
        r, states = args.offload_ratio, optim + 4 * P / N
        host = 1.5 * (r * states + weights)
        weights, optim, grads = 0.0, (1 - r) * states, 0.0
    elif args.offload == "nvme":
        weights, optim, grads = 0.0, 0.0, 0.0
        host = 4 * layer * 4  # pinned staging buffers
    act_bytes = 2 if half else 4
    s, b, h, L, V = args.seq_len, args.batch, cfg.width, args.n_layer, cfg.vocab_size
    per_layer = s * b * layer_activations(cfg) * act_bytes
    activations = (L * s * b * h * act_bytes + per_layer) if args.gradient_checkpointing else L * per_layer
    activations += s * b * V * (act_bytes + 4 + 4)
    device = weights + grads + optim + gathered + activations
    return {"params": P, "width": h, "per_rank_device_bytes": device, "per_rank_host_bytes": host,
            "breakdown_bytes": {"weights": weights, "gradients": grads, "optimizer": optim, "gathered": gathered,
                                "activations": activations}}
