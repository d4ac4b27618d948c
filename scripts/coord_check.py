"""Coordinate check: does every activation keep its size as the model widens (or deepens)?

For each width (or depth), a few seeds, one fixed batch and a high LR, record after each of the first
T steps the mean |x| of every module's output (embeddings, attention and MLP outputs, the residual
stream, q, k, the attention logits, the logits) and its learned part, mean |x - x at step 1|, then fit
the slope of their log2 against log2(width) (or depth). Under muP every slope stays near 0; under SP
hidden outputs and logits grow.

    python scripts/coord_check.py --parametrization mup --out coord_mup
    python scripts/coord_check.py --arch llama --parametrization mup --out coord_llama   # the Llama-style block
    torchrun --nproc_per_node 2 scripts/coord_check.py --backend fsdp ...     # the same under FSDP2
    deepspeed --num_gpus 2 scripts/coord_check.py --backend deepspeed ...     # and ZeRO-3
    python scripts/coord_check.py --depths 4,8,16,32 --depth_alpha 1 --n_head 4 --head_width 32 --steps 10

Width verdict: muP passes when |slope| of mean |x| <= 0.15 for every module at steps >= 2 (the attention
logits: -0.5 <= slope <= 0.15, see GROWTH_ONLY) and the zero-initialised readout gives exactly 0 logits at step 1.
Wider ranges and more steps need 3 seeds or more (docs/mup.md has the runs).
Depth verdict (the last block, the final residual stream and the logits across depths): passes when
|slope| of the learned part <= 0.15 for every module from the first step whose gradient reaches the
blocks (step 3 with the zero-initialised readout) and the logits are 0 at step 1. The learned part,
not |x|: under CompleteP the L branches start independent and scaled by 1/L, so at init the
stream's block part shrinks like L^-1/2 by design, while what CompleteP keeps depth-independent is
each step's update (its Figure 7 shows the same init shrinkage). The last block's attention logits
(q . k) are recorded but not judged: they shrink with depth without any depth scaling too (see
docs/mup.md), so no depth rule controls them.
Writes <out>/coord.json (every slope) and <out>/coord.png.
"""
import argparse
import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from mup_model import MUON_SCALES
from mupgpt import config_checks
from mupgpt.config import parse_args
from mupgpt.engines.factory import build
from mupgpt.errors import ArgumentParser, UsageError, exit_on_usage_error
from mupgpt.model_config import model_config
from mupgpt.world import exit_process, init_world

MAX_SLOPE = 0.15
VOCAB = 257  # the byte tokenizer's


def watched_modules(model, depth=False):
    """name -> module whose output is recorded; attention blocks compute their logits explicitly.
    Across depths only the same relative place compares, so a depth check watches the last block."""
    out = {"wte": model.wte, **({"wpe": model.wpe} if hasattr(model, "wpe") else {})}  # llama: no position table
    blocks = {"last": model.h[-1]} if depth else {f"h.{i}": b for i, b in enumerate(model.h)}
    for name, block in blocks.items():
        block.attn.record_logits = True
        out.update({f"{name}.attn.q": block.attn.q, f"{name}.attn.k": block.attn.k,
                    f"{name}.attn.logits": block.attn.attn_logits, f"{name}.attn": block.attn,
                    f"{name}.mlp": block.mlp, f"{name}.residual": block})
    out["logits"] = model.lm_head
    return out


def record(engine, batch, steps, depth=False):
    """[step][module] -> (mean |x|, mean |x - x at step 1|) after 0..steps-1 updates, averaged over ranks."""
    model = engine.model
    current, first = {}, {}
    hooks = []
    for name, module in watched_modules(model, depth).items():
        scale = model.logit_scale if name == "logits" else 1.0

        def hook(mod, inp, out, name=name, scale=scale):
            out = out.detach().float() * scale
            first.setdefault(name, out)
            current[name] = torch.stack([out.abs().mean(), (out - first[name]).abs().mean()])
        hooks.append(module.register_forward_hook(hook))
    l1, delta = [], []
    for _ in range(steps):
        current.clear()
        engine.train_step([batch])
        names = sorted(current)
        values = engine.reduce_mean(torch.cat([current[n] for n in names])).view(-1, 2)
        l1.append(dict(zip(names, values[:, 0].tolist())))
        delta.append(dict(zip(names, values[:, 1].tolist())))
    for h in hooks:
        h.remove()
    return l1, delta


def slopes(sizes, runs):
    """runs[size] = list over seeds of histories -> {step: {module: slope of log2 l1 vs log2 size}}."""
    steps = len(next(iter(runs.values()))[0])
    out = {}
    for t in range(steps):
        out[t + 1] = {}
        for module in runs[sizes[0]][0][t]:
            means = [np.mean([h[t][module] for h in runs[s]]) for s in sizes]
            if max(means) == 0:
                out[t + 1][module] = 0.0  # zero at every width (a zero-initialised layer before its first update)
            elif min(means) == 0:
                out[t + 1][module] = None  # zero at some widths only: no slope, counted as a violation
            else:
                out[t + 1][module] = float(np.polyfit(np.log2(sizes), np.log2(means), 1)[0])
    return out


NOT_JUDGED_IN_DEPTH = ("last.attn.logits",)
# Judged for growth, and for shrinking faster than d^-1/2: the learned query's overlap with the key's random part
# is a CLT sum, q.k/d_head ~ d^-1/2, that inflates mean |logit| at small widths and fades towards the Theta(1)
# limit, so a correct scale gives a mildly negative slope; a wrong attention scale makes them grow
# (1/sqrt(d_head): d^+1/2) or shrink like d^-1 or faster (1/d_head^1.5), and a query or key that learns too
# slowly shows on q and k themselves.
GROWTH_ONLY = ("attn.logits",)
LOGITS_FLOOR = -0.5


def judged_slope(module, slope):
    return slope if module.endswith(GROWTH_ONLY) else abs(slope)


def verdict(slope_table, runs, from_step=2, skip=()):
    """Passes when every |slope| <= MAX_SLOPE from from_step on (modules in skip aside; the attention logits'
    slope, not its size, see GROWTH_ONLY) and the logits are exactly 0 at step 1."""
    judged = [(t, m, s) for t, mods in slope_table.items() if t >= from_step for m, s in mods.items() if m not in skip]
    bad = [(t, m, s) for t, m, s in judged
           if s is None or judged_slope(m, s) > MAX_SLOPE or (m.endswith(GROWTH_ONLY) and s < LOGITS_FLOOR)]
    logits_step1 = max(h[0]["logits"] for hist in runs.values() for h in hist)
    return {"passes": bool(judged) and not bad and logits_step1 == 0.0, "judged_from_step": from_step,
            "not_judged": list(skip),
            "max_abs_slope": max((judged_slope(m, s) for _, m, s in judged if s is not None), default=0.0),
            "violations": [{"step": t, "module": m, "slope": s} for t, m, s in bad], "logits_at_step1": logits_step1}


def first_body_step(deltas):
    """The first step at which the token embeddings have moved: the first whose forward pass sees a
    gradient step on the blocks (step 3 when the readout starts at zero: step 1's gradient reaches
    only the readout)."""
    hist = next(iter(deltas.values()))[0]
    return next((t + 1 for t in range(len(hist)) if hist[t]["wte"] > 0), len(hist) + 1)


def train_config(args, backend, size, seed, sizes):
    """The trainer's config for one width (or depth) and seed; what the flags leave out is the trainer's default,
    so the check judges the model users train (the query init included)."""
    flags = ["--arch", args.arch, "--parametrization", args.parametrization, "--head_width", str(args.head_width),
             "--base_head_width", str(args.base_head_width), "--n_head", str(args.n_head),
             "--n_layer", str(args.n_layer), "--seq_len", str(args.seq_len), "--learning_rate", str(args.lr),
             "--per_device_train_batch_size", str(args.batch), "--seed", str(seed), "--grad_clip", "0",
             "--lr_scheduler_type", "constant", "--precision", "fp32", "--backend", backend,
             "--zero_stage", "3", "--init_std", str(args.init_std), "--shard_group_size", str(args.shard_group_size),
             "--optimizer", args.optimizer, "--muon_scale", args.muon_scale, "--muon_lr", str(args.muon_lr)]
    if args.query_zero_init is not None:
        flags += ["--query_zero_init", str(args.query_zero_init)]
    if args.depths:
        flags += ["--n_layer", str(size), "--base_n_layer", str(sizes[0]), "--depth_alpha", str(args.depth_alpha)]
    else:
        flags += ["--head_width", str(size)]
    return parse_args(flags)


def check_args(args):
    """Bad flags fail here, in this script's own names, before any model is built; returns the sizes."""
    flag = "--depths" if args.depths else "--head_widths"
    try:
        sizes = [int(s) for s in (args.depths or args.head_widths).split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise UsageError(f"{flag} takes positive whole numbers separated by commas, e.g. {flag} 4,8,16,32")
    if len(set(sizes)) < 2:
        raise UsageError("give at least two different widths (or depths) to fit a slope, e.g. --head_widths 8,16,32,64")
    if len(set(sizes)) < len(sizes):
        raise UsageError(f"{flag} {','.join(map(str, sizes))} repeats a size: give each once")
    if not args.depths and any(s % 2 for s in sizes):
        raise UsageError(f"--head_widths must be even (use powers of 2), not {','.join(map(str, sizes))}")
    if args.steps < 3:  # step 1 is the initial model; the blocks first learn at step 3 with the zero readout
        raise UsageError(f"--steps {args.steps} leaves no step to judge: use --steps 4 or more")
    for name in ("seeds", "batch", "seq_len", "n_head", "n_layer", "head_width", "base_head_width"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1, not {getattr(args, name)}")
    if args.seq_len >= len(batch_text()):
        raise UsageError(f"--seq_len {args.seq_len} is longer than the check's text ({len(batch_text())} bytes): "
                         "give a shorter --seq_len (the default is 32)")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise UsageError(f"--lr must be a positive number, not {args.lr}")
    if not (math.isfinite(args.init_std) and args.init_std >= 0):
        raise UsageError(f"--init_std must be 0 or more, not {args.init_std}")
    if not math.isfinite(args.depth_alpha):
        raise UsageError(f"--depth_alpha must be a finite number, not {args.depth_alpha}")
    if args.query_zero_init not in (None, 0, 1):
        raise UsageError(f"--query_zero_init must be 0 or 1, not {args.query_zero_init}")
    return sizes


def check_out(out):
    """--out is a folder, created if missing: refused up front if it (or a folder above it) is a file."""
    if not out:
        raise UsageError("--out is empty: give a folder for coord.json and coord.png")
    path = Path(out).absolute()
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder: give a folder (it is created if missing)")
    above = next(p for p in path.parents if p.exists())
    if not above.is_dir():
        raise UsageError(f"--out {out}: {above} is a file, not a folder: give a folder (it is created if missing)")
    if not os.access(above if not path.exists() else path, os.W_OK):
        raise UsageError(f"--out {out}: {above if not path.exists() else path} is not writable: give another folder")


def check_shard_group(args, backend, sizes):
    """--shard_group_size as the trainer checks it. Under DeepSpeed it is refused: this check builds a model per
    size and seed in one process, and DeepSpeed makes its hierarchical-partitioning groups once per process
    (a second zero.Init asserts that they exist already)."""
    if args.shard_group_size and backend == "deepspeed":
        raise UsageError("--shard_group_size under DeepSpeed takes one model per process, and this check builds "
                         "several: use --backend fsdp under torchrun for a hybrid-sharded check")
    config_checks.check_shard_group(train_config(args, backend, sizes[0], 0, sizes), backend,
                                    int(os.environ.get("WORLD_SIZE", "1")))


def run(args, world=None):
    sizes = check_args(args)
    backend = args.backend
    if backend == "auto":
        several = int(os.environ.get("WORLD_SIZE", "1")) > 1
        backend = "deepspeed" if args.local_rank >= 0 else ("fsdp" if several else "single")
    check_shard_group(args, backend, sizes)
    runs, deltas = {}, {}
    for size in sizes:
        runs[size], deltas[size] = [], []
        for seed in range(args.seeds):
            cfg = train_config(args, backend, size, seed, sizes)
            ds_cfg = None
            if backend == "deepspeed":
                from mupgpt.engines.deepspeed_config import ds_config
                n = int(os.environ.get("WORLD_SIZE", "1"))
                ds_cfg = ds_config(cfg, "fp32", args.batch * n, 1, cfg.n_head * cfg.head_width)
            world = world or init_world(backend, "cpu" if not torch.cuda.is_available() else "cuda")
            engine = build(backend, cfg, model_config(cfg, VOCAB), world, "fp32", args.steps, ds_cfg)
            l1, delta = record(engine, local_batch(args, world), args.steps, bool(args.depths))
            runs[size].append(l1)
            deltas[size].append(delta)
    table, delta_table = slopes(sizes, runs), slopes(sizes, deltas)
    if args.depths:
        from_step = first_body_step(deltas)
        if from_step > args.steps:
            raise UsageError(f"the blocks had not learned by step {args.steps}: use --steps {from_step + 1} or more")
        judged = verdict(delta_table, runs, from_step, NOT_JUDGED_IN_DEPTH)
    else:
        judged = verdict(table, runs)
    result = {"arch": args.arch, "parametrization": args.parametrization, "optimizer": args.optimizer,
              "muon_scale": args.muon_scale if args.optimizer == "muon" else None, "backend": backend,
              "world_size": world.world_size,
              "vary": "depth" if args.depths else "head_width", "sizes": sizes,
              "depth_alpha": args.depth_alpha if args.depths else None, "query_zero_init": cfg.query_zero_init,
              "judged": "learned part" if args.depths else "mean |x|", **judged,
              "slopes": table, "delta_slopes": delta_table,
              "l1": {str(s): [[h[t] for t in range(args.steps)] for h in runs[s]] for s in sizes},
              "delta": {str(s): [[h[t] for t in range(args.steps)] for h in deltas[s]] for s in sizes}}
    return result, world


def batch_text():
    return Path(json.__file__).read_bytes() + Path(argparse.__file__).read_bytes()


def local_batch(args, world):
    """One fixed batch of real text (this Python's standard library), split between ranks."""
    tokens = torch.tensor(list(batch_text()), dtype=torch.long)
    n = args.batch * world.world_size
    starts = torch.arange(n) * (len(tokens) - args.seq_len - 1) // n
    rows = torch.stack([tokens[s:s + args.seq_len + 1] for s in starts])
    rows = rows[world.rank * args.batch:(world.rank + 1) * args.batch].to(world.device)
    return rows[:, :-1], rows[:, 1:]


def plot(result, path):
    """One panel per judged step (a depth check: the learned part), a curve per module."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams["axes.prop_cycle"] = plt.cycler(color=plt.get_cmap("tab20").colors)
    depth = result["vary"] == "depth"
    data = result["delta" if depth else "l1"]
    sizes = result["sizes"]
    steps = [t for t in range(len(result["slopes"])) if not depth or t + 1 >= result["judged_from_step"]]
    cols = min(5, len(steps))
    rows = -(-len(steps) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), sharey=True, squeeze=False)
    for ax, t in zip(axes.flat, steps):
        for module in data[str(sizes[0])][0][t]:
            ys = [np.mean([h[t][module] for h in data[str(s)]]) for s in sizes]
            if min(ys) > 0:
                ax.plot(sizes, ys, marker=".", label=module, ls=":" if module in result["not_judged"] else "-")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"step {t + 1}")
        ax.set_xlabel(result["vary"])
    for ax in axes.flat[len(steps):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("mean |x - x at step 1|" if depth else "mean |activation|")
    axes.flat[len(steps) - 1].legend(fontsize=5, loc="center left", bbox_to_anchor=(1, 0.5))
    status = "passes" if result["passes"] else "fails"
    kind = f"depth check, alpha {result['depth_alpha']:g}" if depth else "coordinate check"
    fig.suptitle(f"{result['parametrization']} {kind} ({result['backend']}, {result['world_size']} rank(s)): "
                 f"{status}, max |slope| {result['max_abs_slope']:.2f}" + ("  (dotted: not judged)" if depth else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser():
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parametrization", default="mup", choices=["mup", "sp"], help="muP, or SP to see it fail")
    p.add_argument("--arch", default="gpt2", choices=["gpt2", "llama"], help="the model's architecture")
    p.add_argument("--head_widths", default="16,32,64,128", help="comma-separated head widths (powers of 2)")
    p.add_argument("--depths", default="", help="comma-separated depths: a depth check instead of a width check")
    p.add_argument("--depth_alpha", type=float, default=1.0, help="with --depths: 1 CompleteP, 0.5 depth-muP")
    p.add_argument("--head_width", type=int, default=16, help="with --depths: the fixed head width")
    p.add_argument("--init_std", type=float, default=0.02, help="embedding init std (the trainer's default)")
    p.add_argument("--base_head_width", type=int, default=16, help="head width at which muP and SP coincide")
    p.add_argument("--n_head", type=int, default=2, help="attention heads")
    p.add_argument("--n_layer", type=int, default=2, help="transformer blocks (width check)")
    p.add_argument("--seq_len", type=int, default=32, help="tokens per sequence")
    p.add_argument("--batch", type=int, default=128,
                   help="sequences per rank; 4096 tokens in all keeps Adam's first-step noise below the signal")
    p.add_argument("--steps", type=int, default=4, help="Adam steps recorded (at least 3)")
    p.add_argument("--seeds", type=int, default=3, help="seeds averaged per width")
    p.add_argument("--lr", type=float, default=1e-2, help="AdamW base learning rate")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "muon"], help="muon: Muon for the hidden matrices")
    p.add_argument("--muon_scale", default="mup", choices=list(MUON_SCALES),
                   help="with --optimizer muon: the update's scale per matrix (see mup_model.py)")
    p.add_argument("--muon_lr", type=float, default=0.05, help="with --optimizer muon: base Muon learning rate")
    p.add_argument("--query_zero_init", type=int, default=None,
                   help="1: zero-initialised query, 0: random (default: the trainer's, zero; with a random query "
                        "q.k/d_head shrinks like d^-1/2 at init)")
    p.add_argument("--backend", default="auto", choices=["auto", "single", "fsdp", "deepspeed"],
                   help="auto: the launcher's (deepspeed or torchrun), else one process")
    p.add_argument("--shard_group_size", type=int, default=0,
                   help="fsdp: shard within groups of this many consecutive ranks, replicate across the groups "
                        "(0: all ranks)")
    p.add_argument("--out", default="coord_check", help="output folder: coord.json and coord.png go there")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    return p


def main():
    args = build_parser().parse_args()
    check_out(args.out)
    result, world = run(args)
    if world.is_main:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "coord.json"), "w") as f:
            json.dump(result, f, indent=1)
        plot(result, os.path.join(args.out, "coord.png"))
        alpha = f" (alpha {result['depth_alpha']:g})" if result["depth_alpha"] is not None else ""
        print(f"{result['parametrization']} {result['vary']} check{alpha}: {'PASSES' if result['passes'] else 'FAILS'} "
              f"(max |slope| of {result['judged']} from step {result['judged_from_step']}: "
              f"{result['max_abs_slope']:.3f}; "
              f"logits at step 1: {result['logits_at_step1']}) "
              f"-> {args.out}/coord.json, coord.png")


if __name__ == "__main__":
    exit_on_usage_error(main)
    exit_process(0)
