"""Predict per-rank device and host memory of a training run before launching it.

    python scripts/estimate_memory.py --n_layer 12 --n_head 12 --head_width 64 --seq_len 1024 --batch 8 \\
        --world_size 8 --stage 3 --offload none --precision bf16

Model states follow the ZeRO paper (Rajbhandari et al. 2020) with the parameter count taken from the
real model built on the meta device: with Adam, fp32 master weights and two moments are K = 12 bytes
per parameter in mixed precision (fp32: weights are the master, K = 8), plus the working weights and
gradients (2 + 2 bytes in bf16/fp16, 4 + 4 in fp32). Stage 0 here means the single, DDP or FSDP-less
path (fp32 weights and Adam; bf16 only in autocast). ZeRO-1 shards the optimizer states over the
world size N, ZeRO-2 also the gradients, ZeRO-3 (and FSDP2) also the weights. Offload moves the
sharded optimizer states and gradients (and with ZeRO-3 the weights) to host memory (nvme: to disk);
on the host DeepSpeed holds the gradients in fp32 and 1.5x for buffers (18 B/param x 1.5 in bf16).
--offload_ratio r < 1 (offload_optimizer.ratio) keeps the fraction 1 - r of Adam's states and fp32
gradients on the device.
Activations per layer use s*b*h*34 bytes in half precision for a pre-LN GPT block with flash
attention (Korthikanti et al. 2022, without the s^2 attention term), s*b*h*2 with activation
checkpointing plus one recomputed layer; the logits add s*b*V*(2 + 4 + 4) bytes (logits, fp32 loss
input, gradient).
"""
import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from mup_model import GPT, GPTConfig  # noqa: E402
from mupgpt.errors import UsageError, exit_on_usage_error  # noqa: E402

GIB = 2**30


def count_params(args):
    cfg = GPTConfig(vocab_size=64 * math.ceil(args.vocab / 64), block_size=args.seq_len, n_layer=args.n_layer,
                    n_head=args.n_head, head_width=args.head_width)
    with torch.device("meta"):
        model = GPT(cfg)
    return sum(p.numel() for p in model.parameters()), cfg


def estimate(args):
    if args.stage not in (0, 1, 2, 3):
        raise UsageError(f"--stage must be 0, 1, 2 or 3, not {args.stage}")
    if args.offload != "none" and args.stage != 3:
        raise UsageError("--offload needs --stage 3")
    if not 0 <= args.offload_ratio <= 1 or (args.offload_ratio < 1 and args.offload != "cpu"):
        raise UsageError("--offload_ratio is a fraction in [0, 1] and needs --offload cpu")
    n_params, cfg = count_params(args)
    N, P = args.world_size, n_params
    half = args.precision in ("bf16", "fp16")
    if args.stage == 0:  # fp32 weights, gradients and Adam on every rank
        weights, grads, optim = 4 * P, 4 * P, 8 * P
    else:
        w, g, k = (2, 2, 12) if half else (4, 4, 8)
        weights = w * P / N if args.stage == 3 else w * P
        grads = g * P / N if args.stage >= 2 else g * P
        optim = k * P / N
    host = 0.0
    if args.offload == "cpu":
        # DeepSpeed keeps the offloaded gradients in fp32 (4 B, not 2) and reserves 1.5x for its pinned
        # buffers (its own estimate_zero3_model_states_mem_needs: 18 B/param x 1.5). Measured on an H100
        # host: 4.44B params, 103.8 GiB peak RSS, this rule 111.7 GiB; 6.86B with ratio 0.55: 110.9 GiB
        # RSS and 49.2 GiB device, this rule 103.5 and 47.6 GiB (bench/RESULTS.md).
        states = optim + (4 * P / N if half else grads)
        r = args.offload_ratio
        host = 1.5 * (r * states + weights)
        optim, grads = (1 - r) * states, 0.0
        weights = 2 * 12 * cfg.width**2 * (2 if half else 4)  # about two layers gathered at a time
    elif args.offload == "nvme":
        optim, grads = 0.0, 0.0
        weights = 2 * 12 * cfg.width**2 * (2 if half else 4)
        host = 4 * 12 * cfg.width**2 * 4  # pinned staging buffers
    act_bytes = 2 if half else 4
    s, b, h, L, V = args.seq_len, args.batch, cfg.width, args.n_layer, cfg.vocab_size
    per_layer = s * b * h * 34 * act_bytes / 2
    activations = (L * s * b * h * act_bytes + per_layer) if args.gradient_checkpointing else L * per_layer
    activations += s * b * V * (act_bytes + 4 + 4)
    device = weights + grads + optim + activations
    return {"params": P, "width": h, "per_rank_device_bytes": device, "per_rank_host_bytes": host,
            "breakdown_bytes": {"weights": weights, "gradients": grads, "optimizer": optim, "activations": activations}}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n_layer", type=int, default=12)
    p.add_argument("--n_head", type=int, default=12)
    p.add_argument("--head_width", type=int, default=64)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--seq_len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8, help="micro batch per rank")
    p.add_argument("--world_size", type=int, default=1)
    p.add_argument("--stage", type=int, default=0, help="0 (single/DDP), 1, 2, 3 (ZeRO-3 or FSDP2)")
    p.add_argument("--offload", default="none", choices=["none", "cpu", "nvme"])
    p.add_argument("--offload_ratio", type=float, default=1.0,
                   help="fraction of Adam's states offloaded (offload_optimizer.ratio; the rest stays on the device)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--json", action="store_true", help="print JSON")
    return p


def main():
    args = build_parser().parse_args()
    est = estimate(args)
    if args.json:
        print(json.dumps(est, indent=2))
        return
    print(f"{est['params'] / 1e6:.1f}M parameters, width {est['width']}, ZeRO stage {args.stage}, "
          f"{args.world_size} rank(s), offload {args.offload}, {args.precision}")
    for k, v in est["breakdown_bytes"].items():
        print(f"  {k:<12} {v / GIB:8.2f} GiB per rank")
    print(f"  {'device':<12} {est['per_rank_device_bytes'] / GIB:8.2f} GiB per rank")
    print(f"  {'host':<12} {est['per_rank_host_bytes'] / GIB:8.2f} GiB per rank (offloaded states)")


if __name__ == "__main__":
    exit_on_usage_error(main)
