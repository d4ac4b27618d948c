"""Predict per-rank device and host memory of a training run before launching it.

    python scripts/estimate_memory.py --n_layer 12 --n_head 12 --head_width 64 --seq_len 1024 --batch 8 \\
        --world_size 8 --stage 3 --offload none --precision bf16

The accounting is mupgpt/memory.py's (its docstring, printed by --help below).
"""
import argparse
import json

from mupgpt import memory
from mupgpt.errors import UsageError, exit_on_usage_error  # noqa: F401 (UsageError: what estimate raises)
from mupgpt.memory import GIB, count_params, estimate, layer_activations  # noqa: F401 (the estimator's API)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__ + "\n" + memory.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="gpt2", choices=["gpt2", "llama"],
                   help="the model's architecture (as the trainer's)")
    p.add_argument("--n_kv_head", type=int, default=0, help="llama: key/value heads (0: n_head)")
    p.add_argument("--mlp_hidden", type=int, default=0, help="MLP hidden size (0: the architecture's default)")
    p.add_argument("--n_layer", type=int, default=12, help="transformer blocks")
    p.add_argument("--n_head", type=int, default=12, help="attention heads")
    p.add_argument("--head_width", type=int, default=64, help="width of each head (model width = n_head x head_width)")
    p.add_argument("--vocab", type=int, default=50257, help="vocabulary size")
    p.add_argument("--seq_len", type=int, default=1024, help="tokens per sequence")
    p.add_argument("--batch", type=int, default=8, help="micro batch per rank")
    p.add_argument("--world_size", type=int, default=1, help="ranks the states are sharded over")
    p.add_argument("--stage", type=int, default=0, help="0 (single/DDP), 1, 2, 3 (ZeRO-3 or FSDP2)")
    p.add_argument("--fsdp", action="store_true", help="FSDP2's layout (with --stage 3) instead of DeepSpeed's")
    p.add_argument("--offload", default="none", choices=["none", "cpu", "nvme"],
                   help="DeepSpeed offload (with --stage 3)")
    p.add_argument("--offload_ratio", type=float, default=1.0,
                   help="fraction of Adam's states offloaded (offload_optimizer.ratio; the rest stays on the device)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"], help="compute precision")
    p.add_argument("--gradient_checkpointing", action="store_true",
                   help="with activation checkpointing: each block's input plus one block's activations")
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
