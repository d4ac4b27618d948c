"""The table of a bench/gpu_profile.sh call (the engines on one GPU), from its folder of metrics and logs.

    python3 bench/gpu_summary.py /tmp/prof                      # markdown to stdout
    python3 bench/gpu_summary.py part1/ part2/ --out summary.md --json summary.json
    python3 bench/gpu_summary.py /tmp/prof --line zero3_eager_124m   # one job's line (the script prints these)

A folder is what the script packs into profile.tgz (jobs.tsv, env.txt, NAME.metrics.jsonl, NAME.log,
NAME.config.json, NAME.files.txt). Several folders (the parts of one run, one call each) are read together:
a job's baselines (single compiled for the ratio, single eager for the losses) come from its own folder
first, else from another folder whose device line is the same, else are left blank. Per job: median
tokens/s over steps 21-40 (the last half when the run is shorter), ms per step, MFU, the ratio to single
compiled at the same shape, the largest loss difference to single eager over steps 1-30, losses at
steps 1/10/20/30/40; for profiled jobs the GPU-busy time per step (the profile's self CUDA time over its
4 steps) against the step time; the throughput and loss targets (TARGETS); DeepCompile's whole-run checks (dc_full,
dc_resume). Plain Python, no torch: it runs on the CPU machine too.
"""
import argparse
import json
import math
import os
import re
import statistics
import sys

PROFILED_STEPS = 4  # run_trainer.py's profiler: steps 13-16
LOSS_STEPS = 30     # the loss target: losses over the first 30 steps within LOSS_TOL of single eager's
LOSS_TOL = 0.06
TARGETS = {  # shape -> (engine label, job names that count, minimum ratio to single compiled)
    "1.3b": [("ZeRO-3 (eager, the headline path)", ("zero3_eager", "zero3_eager_prof"), 0.9),
             ("FSDP2 --compile", ("fsdp_compile", "fsdp_compile_prof"), 0.9)],
    "124m": [("ZeRO-3 (eager, the headline path)", ("zero3_eager", "zero3_eager_prof"), 0.8),
             ("ZeRO-3 --compile (DeepCompile)", ("zero3_deepcompile",), 0.8),
             ("FSDP2 --compile", ("fsdp_compile", "fsdp_compile_prof"), 0.8)],
}
MFU_TARGET = ("124m", "single_compile", 0.45)


def read_jobs(folder):
    path = os.path.join(folder, "jobs.tsv")
    if not os.path.exists(path):
        return []
    lines = open(path).read().splitlines()
    jobs = []
    for line in lines[1:]:
        parts = line.split("\t")
        if len(parts) < 4:
            continue
        parts += [""] * (7 - len(parts))
        jobs.append({"name": parts[0], "job": parts[1], "shape": parts[2], "rc": parts[3], "wall_s": parts[4],
                     "env": parts[5], "flags": parts[6], "folder": folder})
    return jobs


def device_of(folder):
    """The env.txt line naming the device (the second line the script writes)."""
    try:
        lines = open(os.path.join(folder, "env.txt")).read().splitlines()
    except OSError:
        return ""
    return lines[1].strip() if len(lines) > 1 else ""


def metrics(folder, name):
    path = os.path.join(folder, f"{name}.metrics.jsonl")
    rows = []
    if os.path.exists(path):
        for line in open(path):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line cut by a timeout
    return rows


def losses(rows):
    return {r["step"]: r["loss"] for r in rows if "loss" in r and r.get("loss") is not None}


def speed(rows, lo=21, hi=None):
    """Median tokens/s and MFU of the logged steps in [lo, hi] (the last half when there are none)."""
    rows = [r for r in rows if r.get("tokens_per_s")]
    late = [r for r in rows if r["step"] >= lo and (hi is None or r["step"] <= hi)]
    if not late and hi is None:
        late = rows[len(rows) // 2:]
    if not late:
        return None, None, None
    tps = statistics.median(r["tokens_per_s"] for r in late)
    mfus = [r["mfu"] for r in late if r.get("mfu") is not None]
    mfu = statistics.median(mfus) if mfus else None
    per_step = late[-1]["tokens"] / late[-1]["step"]
    return tps, mfu, 1000 * per_step / tps if tps else None


_UNIT = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def profile_totals(folder, name):
    """(self CUDA ms, self CPU ms) over the profiled steps, from the profiler table's footer in the log."""
    try:
        text = open(os.path.join(folder, f"{name}.log"), errors="replace").read()
    except OSError:
        return None, None
    out = []
    for what in ("CUDA", "CPU"):
        m = re.findall(rf"Self {what} time total: ([0-9.]+)(us|ms|s)\b", text)
        out.append(float(m[-1][0]) * _UNIT[m[-1][1]] if m else None)
    return tuple(out)


class Runs:
    def __init__(self, folders):
        self.folders = folders
        self.jobs = [j for f in folders for j in read_jobs(f)]
        self.devices = {f: device_of(f) for f in folders}

    def find(self, job, shape, near):
        """A finished job's row: from `near`'s folder first, else a folder with the same device line."""
        same = [j for j in self.jobs if j["job"] == job and j["shape"] == shape and j["rc"] == "0"]
        for j in same:
            if j["folder"] == near:
                return j
        for j in same:
            if self.devices.get(j["folder"]) == self.devices.get(near) and self.devices.get(near):
                return j
        return None

    def row(self, j):
        rows = metrics(j["folder"], j["name"])
        tps, mfu, ms = speed(rows)
        r = {"name": j["name"], "job": j["job"], "shape": j["shape"], "rc": j["rc"], "wall_s": j["wall_s"],
             "env": j["env"], "device": self.devices.get(j["folder"], ""), "tokens_per_s": tps, "mfu": mfu,
             "ms_per_step": ms, "steps_logged": len(rows), "note": j["flags"] if j["rc"] == "skipped" else ""}
        base = self.find("single_compile", j["shape"], j["folder"])
        if base and tps:
            btps = speed(metrics(base["folder"], base["name"]))[0]
            r["vs_single_compile"] = tps / btps if btps else None
            r["baseline_from"] = "" if base["folder"] == j["folder"] else base["folder"]
        mine = losses(rows)
        r["losses"] = {s: mine[s] for s in (1, 10, 20, 30, 40) if s in mine}
        ref = self.find("single_eager", j["shape"], j["folder"])
        if ref and mine and j["job"] != "single_eager" and not j["job"].startswith("dc_"):
            theirs = losses(metrics(ref["folder"], ref["name"]))
            common = [s for s in mine if s in theirs and s <= LOSS_STEPS]
            if common:
                worst = max(common, key=lambda s: abs(mine[s] - theirs[s]))
                r["loss_max_diff"] = abs(mine[worst] - theirs[worst])
                r["loss_max_diff_step"] = worst
                r["loss_steps_compared"] = len(common)
        if j["job"].endswith("_prof"):
            cuda_ms, cpu_ms = profile_totals(j["folder"], j["name"])
            _, _, prof_ms = speed(rows, 13, 16)
            r["profile"] = {"gpu_busy_ms_per_step": cuda_ms / PROFILED_STEPS if cuda_ms is not None else None,
                            "host_self_ms_per_step": cpu_ms / PROFILED_STEPS if cpu_ms is not None else None,
                            "profiled_steps_ms_per_step": prof_ms}
        return r


def fmt(v, spec, empty=""):
    return empty if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def line(r):
    loss = " ".join(f"{v:.4f}" for v in r["losses"].values())
    diff = (f" maxdiff {r['loss_max_diff']:.4f}@{r['loss_max_diff_step']}" if "loss_max_diff" in r else "")
    return (f"{r['name']:28s} rc={r['rc']:>3} wall={r['wall_s']:>4}s tok/s={fmt(r['tokens_per_s'], ',.0f', '-'):>9} "
            f"mfu={fmt(r['mfu'] and 100 * r['mfu'], '.1f', '-')}% "
            f"x{fmt(r.get('vs_single_compile'), '.2f', '-')} losses@1,10,20,30,40: {loss}{diff}")


def dc_checks(runs):
    """DeepCompile's whole run: dc_full (eval every 10, accumulation 2, checkpoint at 20, export) and
    dc_resume (from dc_full's step-20 checkpoint)."""
    full = [j for j in runs.jobs if j["job"] == "dc_full"]
    res = [j for j in runs.jobs if j["job"] == "dc_resume"]
    if not full and not res:
        return None
    out = {}
    for tag, js in (("dc_full", full), ("dc_resume", res)):
        if not js:
            continue
        j = js[-1]
        rows = metrics(j["folder"], j["name"])
        files = ""
        try:
            files = open(os.path.join(j["folder"], f"{j['name']}.files.txt")).read()
        except OSError:
            pass
        try:
            cfg = json.load(open(os.path.join(j["folder"], f"{j['name']}.config.json")))["resolved"]
        except (OSError, ValueError, KeyError):
            cfg = {}
        try:
            log = open(os.path.join(j["folder"], f"{j['name']}.log"), errors="replace").read()
        except OSError:
            log = ""
        out[tag] = {"rc": j["rc"], "wall_s": j["wall_s"], "steps": max((r["step"] for r in rows), default=0),
                    "val_loss": {r["step"]: r["val_loss"] for r in rows if "val_loss" in r},
                    "gradient_accumulation_steps": cfg.get("gradient_accumulation_steps"),
                    "checkpoint_step_20": "checkpoints/step_00000020" in files,
                    "export": "model.safetensors" in files,
                    "resumed": bool(re.search(r"resumed from .* at step 20", log)),
                    "tokens_per_s": speed(rows)[0]}
    if full and res:
        a = losses(metrics(full[-1]["folder"], full[-1]["name"]))
        b = losses(metrics(res[-1]["folder"], res[-1]["name"]))
        common = [s for s in b if s in a and s > 20]
        if common:
            out["resume_max_loss_diff_steps_21_30"] = max(abs(a[s] - b[s]) for s in common)
            out["resume_steps_compared"] = len(common)
    return out


def targets(runs, rows):
    by = {(r["shape"], r["job"]): r for r in rows if r["rc"] == "0"}
    out = []
    for shape, items in TARGETS.items():
        for label, jobs, want in items:
            r = next((by[(shape, j)] for j in jobs if (shape, j) in by), None)
            got = r and r.get("vs_single_compile")
            out.append({"what": f"{shape}: {label} >= {want}x single compiled", "got": got,
                        "met": None if got is None else got >= want, "job": r and r["name"]})
    shape, job, want = MFU_TARGET
    r = by.get((shape, job))
    got = r and r["mfu"]
    out.append({"what": f"{shape}: single --compile MFU >= {100 * want:.0f}%", "got": got,
                "met": None if got is None else got >= want, "job": r and r["name"]})
    diffs = [r for r in rows if "loss_max_diff" in r]
    if diffs:
        worst = max(diffs, key=lambda r: r["loss_max_diff"])
        out.append({"what": f"every engine's losses over steps 1-{LOSS_STEPS} within {LOSS_TOL} of single eager's",
                    "got": worst["loss_max_diff"], "met": all(r["loss_max_diff"] <= LOSS_TOL for r in diffs),
                    "job": worst["name"]})
    return out


def markdown(runs, rows, tgt, dc):
    out = ["# bench/gpu_profile.sh summary", ""]
    for f in runs.folders:
        try:
            env = open(os.path.join(f, "env.txt")).read().strip()
        except OSError:
            env = "(no env.txt)"
        out += [f"`{f}`:", "```", env, "```", ""]
    out += ["Median tokens/s over steps 21-40; ms/step = tokens per step / that; 'x single' = tokens/s over single "
            "--compile's at the same shape (same call, or a call on the same device); loss diff = largest |loss - "
            f"single eager's| over steps 1-{LOSS_STEPS} (the step in brackets).", "",
            "| job | shape | rc | wall s | tokens/s | ms/step | MFU | x single compiled | loss diff vs single eager "
            "| losses @1/10/20/30/40 | GPU busy ms/step (profiled steps' ms/step) | env |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["rc"] == "skipped":
            out.append(f"| {r['job']} | {r['shape']} | skipped | | | | | | | | | {r['note']} |")
            continue
        p = r.get("profile") or {}
        busy = (f"{fmt(p.get('gpu_busy_ms_per_step'), '.1f', '-')} "
                f"({fmt(p.get('profiled_steps_ms_per_step'), '.1f', '-')})" if p else "")
        diff = (f"{r['loss_max_diff']:.4f} ({r['loss_max_diff_step']})" if "loss_max_diff" in r else "")
        ratio = fmt(r.get("vs_single_compile"), ".2f") + ("*" if r.get("baseline_from") else "")
        out.append(f"| {r['job']} | {r['shape']} | {r['rc']} | {r['wall_s']} | {fmt(r['tokens_per_s'], ',.0f')} "
                   f"| {fmt(r['ms_per_step'], '.1f')} "
                   f"| {fmt(r['mfu'] and 100 * r['mfu'], '.1f')}{'%' if r['mfu'] else ''} "
                   f"| {ratio} | {diff} | {' '.join(f'{v:.3f}' for v in r['losses'].values())} | {busy} | {r['env']} |")
    if any(r.get("baseline_from") for r in rows):
        out.append("\n\\* baseline from another call on the same device")
    out += ["", "## Targets", "", "| target | got | met | job |", "|---|---|---|---|"]
    for t in tgt:
        got = t["got"]
        shown = "" if got is None else (f"{100 * got:.1f}%" if "MFU" in t["what"] else
                                         f"{got:.3f}" if "losses" in t["what"] else f"{got:.3f}x")
        met = "not measured" if t["met"] is None else ("met" if t["met"] else "**not met**")
        out.append(f"| {t['what']} | {shown} | {met} | {t['job'] or ''} |")
    if dc:
        out += ["", "## DeepCompile's whole run (dc_full, dc_resume)", "", "```", json.dumps(dc, indent=1), "```"]
    return "\n".join(out) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", help="folders of gpu_profile.sh calls (unpacked profile.tgz)")
    p.add_argument("--line", default="", help="print this job's one line and stop")
    p.add_argument("--out", default="", help="also write the markdown here")
    p.add_argument("--json", default="", help="write the rows, targets and checks as JSON here")
    args = p.parse_args(argv)
    runs = Runs(args.folders)
    if args.line:
        js = [j for j in runs.jobs if j["name"] == args.line]
        if js:
            print(line(runs.row(js[-1])), flush=True)
        return 0
    rows = [runs.row(j) for j in runs.jobs]
    tgt, dc = targets(runs, rows), dc_checks(runs)
    text = markdown(runs, rows, tgt, dc)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "targets": tgt, "deepcompile_whole_run": dc}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
