"""The optimizer step's time under --optimizer muon against adamw on one engine, side by side.

    python bench/optim_step.py --name cpu_optim_step --backend single --repeats 5
    torchrun --nproc_per_node 2 bench/optim_step.py --name cpu_optim_step_fsdp2 --backend fsdp --repeats 5
    deepspeed --num_gpus 2 bench/optim_step.py --name cpu_optim_step_zero3 --backend deepspeed --repeats 5

Both optimizers are built by the trainer's own engine (mupgpt.engines.factory.build, so FSDP2's AdamW
steps local shards as in training and its Muon gathers each matrix) on the same model, from the same
seed. One backward makes the gradients; then the engine's step_optimizer alone is timed, --steps times
per repeat after --warmup untimed steps (the first steps make the optimizer's state), the repeats
alternating adamw, muon, adamw, ... so drift on a shared machine falls on both sides. Reported: the
median ms per step of each, the ratio of medians and each repeat's pair ratio. DeepSpeed's step uses up
the gradients, so there the whole train step is timed (forward, backward, step: the same batch each
time) and Muon's own cost is the difference of the medians (also reported).
Results: bench/results/<name>.json (rank 0).
"""
import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from mupgpt.config import parse_args
from mupgpt.engines.factory import build
from mupgpt.errors import ArgumentParser, exit_on_usage_error
from mupgpt.model_config import model_config
from mupgpt.world import init_world

ROOT = Path(__file__).resolve().parent.parent

VOCAB = 320  # byte tokens, as the trainer pads them


def make_engine(args, optimizer, world):
    """What one timed step runs: the optimizer's step with the gradients of one forward and backward on a
    fixed random batch in place, or under DeepSpeed the whole train step on that batch."""
    cfg = parse_args(["--backend", args.backend, "--optimizer", optimizer, "--n_layer", str(args.n_layer),
                      "--n_head", str(args.n_head), "--head_width", str(args.head_width), "--seq_len",
                      str(args.seq_len), "--precision", "fp32", "--tokenizer", "bytes", "--seed", "0", "--zero_stage",
                      str(args.zero_stage), "--per_device_train_batch_size", str(args.batch)])
    ds = None
    if args.backend == "deepspeed":
        from mupgpt.engines.deepspeed_config import ds_config
        ds = ds_config(cfg, "fp32", args.batch * world.world_size, 1, args.n_head * args.head_width)
    engine = build(args.backend, cfg, model_config(cfg, VOCAB), world, "fp32", total_steps=10 ** 6, ds_config=ds)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (args.batch, args.seq_len), generator=gen)
    batch = [(x, torch.roll(x, -1, 1))]
    if args.backend == "deepspeed":
        return lambda: engine.train_step(batch)
    engine.forward_model(*batch[0]).backward()
    return engine.step_optimizer


def time_steps(step, steps, world):
    """ms per step() over `steps` steps (the optimizer's: the gradients stay, each step is the same work)."""
    if world.world_size > 1:
        torch.distributed.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if world.world_size > 1:
        torch.distributed.barrier()
    return (time.perf_counter() - start) * 1000 / steps


def main():
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="results go to bench/results/NAME.json")
    p.add_argument("--backend", default="single", choices=["single", "fsdp", "deepspeed"],
                   help="the trainer's --backend")
    p.add_argument("--zero_stage", type=int, default=3, help="--backend deepspeed: the ZeRO stage")
    p.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    p.add_argument("--n_layer", type=int, default=4, help="transformer blocks")
    p.add_argument("--n_head", type=int, default=4, help="attention heads")
    p.add_argument("--head_width", type=int, default=64, help="width of each head")
    p.add_argument("--seq_len", type=int, default=256, help="tokens per sequence")
    p.add_argument("--batch", type=int, default=8, help="sequences in the one backward")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps per repeat")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before the repeats")
    p.add_argument("--repeats", type=int, default=5, help="alternating repeats per optimizer")
    args = p.parse_args()
    world = init_world(args.backend, "cpu")
    steps = {name: make_engine(args, name, world) for name in ("adamw", "muon")}
    for step in steps.values():
        time_steps(step, args.warmup, world)
    ms = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():
            ms[name].append(time_steps(step, args.steps, world))
    med = {name: statistics.median(v) for name, v in ms.items()}
    result = {"args": vars(args), "world_size": world.world_size, "threads": torch.get_num_threads(),
              "torch": torch.__version__, "python": platform.python_version(), "load_average": os.getloadavg(),
              "ms_per_step": ms, "median_ms": med, "muon_over_adamw": med["muon"] / med["adamw"],
              "timed": "train step" if args.backend == "deepspeed" else "optimizer step",
              "muon_minus_adamw_ms": med["muon"] - med["adamw"],
              "pair_ratios": [m / a for a, m in zip(ms["adamw"], ms["muon"])]}
    if world.is_main:
        out = ROOT / "bench" / "results" / f"{args.name}.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"{args.backend} x{world.world_size}: adamw {med['adamw']:.2f} ms, muon {med['muon']:.2f} ms per "
              f"{result['timed']} (muon - adamw {result['muon_minus_adamw_ms']:.1f} ms), "
              f"muon/adamw {result['muon_over_adamw']:.2f}x (pairs: "
              f"{', '.join(f'{r:.2f}' for r in result['pair_ratios'])}); load {result['load_average'][0]:.1f} -> {out}")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    exit_on_usage_error(main)
