"""Packs scripts/sweep.py runs onto one GPU until a deadline (bench/gpu_transfer.sh calls this).

The grid is split into groups, one (parametrization, width, seed) each with all its learning rates, run
as `scripts/sweep.py --out ROOT/parts/GROUP --jobs J` (J runs at a time inside it). Groups start in
priority order (seed 0 before seed 1, widest first within a seed, so the long runs are not the tail;
--extra_head_widths last, seed 0 only) while the runs in flight stay under --max_procs processes and
--mem_gb of estimated device memory, and only when the group's estimated time still fits before
--launch_stop_s; at --hard_stop_s every sweep still running is stopped (its unfinished runs leave no
summary.json and so no results row). Each group writes its own results.jsonl; bench/gpu_transfer.sh
joins them. Prints one line per start, finish and skip; writes ROOT/driver.json.
"""
import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mupgpt.sweep_runs import result_row, run_name

ROOT = Path(__file__).resolve().parent.parent


def lr_list(text):
    """'-11:-5' -> 2^-11 ... 2^-5 (a factor 2 apart), or comma-separated rates."""
    if ":" in text:
        lo, hi = (int(x) for x in text.split(":"))
        return [2.0 ** k for k in range(lo, hi + 1)]
    return [float(x) for x in text.split(",") if x.strip()]


def mem_gb(width, n_layer, seq_len, micro_batch, vocab=320):
    """Rough device memory of one run: fp32 weights, grads and two Adam moments (16 bytes a parameter),
    bf16 activations (~24 values per token, layer and unit of width, generous) and a CUDA context."""
    params = 12 * n_layer * width * width + 2 * vocab * width + seq_len * width
    acts = micro_batch * seq_len * n_layer * 24 * width * 2
    return (16 * params + acts) / 1e9 + 0.8


def collect_stopped(root, groups, lrs, log):
    """sweep.py writes a group's results.jsonl only when all its runs are done; for a group stopped at the
    hard stop (or failed), write it from the runs that did finish (their summary.json), with sweep.py's
    own run_name and result_row, so the figure keeps every finished run."""
    total = 0
    for g in groups:
        par, rest = g["name"].split("_w")
        hw, seed = (int(x) for x in rest.split("_s"))
        folder = root / "parts" / g["name"]
        rows = []
        for lr in lrs[par]:
            point = dict(parametrization=par, width=hw, depth=None, max_steps=None, train_batch_size=None, lr=lr,
                         seed=seed)
            run_dir = folder / "runs" / run_name(point)
            if (run_dir / "summary.json").exists():
                rows.append(result_row(point, run_dir))
        with open(folder / "results.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        log(f"{g['name']}: {len(rows)} of {len(lrs[par])} runs finished before it stopped")
        total += len(rows)
    return total


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--root", required=True)
    p.add_argument("--head_widths", default="256,128,64,32", help="the grid's head widths (run widest first)")
    p.add_argument("--extra_head_widths", default="", help="run last, seed 0 only, if time is left (e.g. 512)")
    p.add_argument("--n_head", type=int, default=8)
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--micro_batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--mup_lrs", default="-12:-5")
    p.add_argument("--sp_lrs", default="-13:-6")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--jobs", type=int, default=4, help="runs at once inside one group's sweep")
    p.add_argument("--max_procs", type=int, default=8, help="runs at once in all")
    p.add_argument("--mem_gb", type=float, default=0, help="device memory to fill (0: no limit)")
    p.add_argument("--step_ms", default="32:1.5,64:2.5,128:5,256:15,512:55",
                   help="head width -> device ms per step, to estimate a group's time (an H100, bf16, eager)")
    p.add_argument("--startup_s", type=float, default=10, help="a run's start and end: imports, data, eval")
    p.add_argument("--min_step_ms", type=float, default=4, help="a run's host-bound floor per step")
    p.add_argument("--launch_stop_s", type=float, required=True, help="start no group expected to end after this")
    p.add_argument("--hard_stop_s", type=float, required=True, help="stop every sweep still running at this")
    args, extra = p.parse_known_args()
    extra = extra[1:] if extra[:1] == ["--"] else extra
    t0 = time.time()
    root = Path(args.root)
    (root / "parts").mkdir(parents=True, exist_ok=True)
    step_ms = {int(k): float(v) for k, v in (x.split(":") for x in args.step_ms.split(","))}
    lrs = {"mup": lr_list(args.mup_lrs), "sp": lr_list(args.sp_lrs)}
    seeds = [int(s) for s in args.seeds.split(",")]
    widths = sorted((int(w) for w in args.head_widths.split(",")), reverse=True)
    groups = [(par, hw, s) for s in seeds for hw in widths for par in ("mup", "sp")]
    groups += [(par, int(hw), seeds[0]) for hw in args.extra_head_widths.split(",") if hw.strip()
               for par in ("mup", "sp")]

    def est(par, hw):
        n, j = len(lrs[par]), min(args.jobs, len(lrs[par]))
        ms = step_ms.get(hw, max(step_ms.values()) * (hw / max(step_ms)) ** 2)
        wall = math.ceil(n / j) * (args.startup_s + args.steps * args.min_step_ms / 1000)
        return max(wall, n * args.steps * ms / 1000)  # the device's serial work, when it is the bound

    def jobs_for(par, hw):
        j = min(args.jobs, len(lrs[par]), args.max_procs)
        if args.mem_gb:
            each = mem_gb(args.n_head * hw, args.n_layer, args.seq_len, args.micro_batch)
            j = max(1, min(j, int(args.mem_gb // each)))
        return j

    def log(msg):
        print(f"[{time.time() - t0:6.1f}s] {msg}", flush=True)

    running, done, skipped, scale = [], [], [], 1.0
    pending = list(groups)
    while pending or running:
        now = time.time() - t0
        for g in list(running):
            if g["proc"].poll() is not None:
                running.remove(g)
                g["wall_s"] = time.time() - t0 - g["start_s"]
                g["rc"] = g["proc"].returncode
                done.append(g)
                log(f"finished {g['name']} (rc {g['rc']}, {g['wall_s']:.0f}s, estimated {g['est_s']:.0f}s)")
        ok = [g for g in done if g["rc"] == 0]
        if ok:  # how far off the estimates were so far (the runs share the device, so it is rough)
            scale = min(3.0, max(0.5, sum(g["wall_s"] for g in ok) / sum(g["est_s"] for g in ok)))
        if now >= args.hard_stop_s:
            for g in running:
                log(f"hard stop: stopping {g['name']}")
                os.killpg(g["proc"].pid, signal.SIGTERM)
            deadline = time.time() + 15
            for g in running:
                try:
                    g["proc"].wait(max(0.1, deadline - time.time()))
                except subprocess.TimeoutExpired:
                    os.killpg(g["proc"].pid, signal.SIGKILL)
                g["rc"], g["wall_s"] = "stopped", time.time() - t0 - g["start_s"]
                done.append(g)
            running = []
            skipped += [f"{par}_w{hw}_s{s}: hard stop" for par, hw, s in pending]
            break
        while pending:
            par, hw, s = pending[0]
            j = jobs_for(par, hw)
            need = est(par, hw) * scale
            if now + need > args.launch_stop_s:
                pending.pop(0)
                skipped.append(f"{par}_w{hw}_s{s}: would end at ~{now + need:.0f}s, after the launch stop "
                               f"{args.launch_stop_s:.0f}s")
                log(f"skipped {skipped[-1]}")
                continue
            procs = sum(g["jobs"] for g in running)
            mem = sum(g["jobs"] * g["mem_gb"] for g in running)
            m = mem_gb(args.n_head * hw, args.n_layer, args.seq_len, args.micro_batch)
            if running and (procs + j > args.max_procs or (args.mem_gb and mem + j * m > args.mem_gb)):
                break
            pending.pop(0)
            name = f"{par}_w{hw}_s{s}"
            cmd = [sys.executable, str(ROOT / "scripts" / "sweep.py"), "--out", str(root / "parts" / name),
                   "--widths", str(hw), "--lrs", ",".join(repr(x) for x in lrs[par]), "--parametrizations", par,
                   "--seeds", str(s), "--jobs", str(j), "--", *extra]
            out = open(root / "parts" / f"{name}.sweep.log", "w")
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            running.append({"name": name, "proc": proc, "jobs": j, "mem_gb": m, "est_s": need / scale,
                            "start_s": now, "runs": len(lrs[par])})
            log(f"started {name}: {len(lrs[par])} runs, {j} at a time, ~{m:.1f} GB each, estimated {need:.0f}s")
        time.sleep(0.5)
    recovered = collect_stopped(root, [g for g in done if g["rc"] != 0], lrs, log)
    summary = {"groups_done": [{k: g[k] for k in ("name", "rc", "wall_s", "est_s", "runs", "jobs")} for g in done],
               "skipped": skipped, "rows_recovered_from_stopped_groups": recovered, "wall_s": time.time() - t0,
               "lrs": lrs, "head_widths": widths,
               "extra_head_widths": args.extra_head_widths, "seeds": seeds, "trainer_flags": extra}
    (root / "driver.json").write_text(json.dumps(summary, indent=1))
    log(f"{len(done)} group(s) ran, {len(skipped)} skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
