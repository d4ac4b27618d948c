"""A width x LR x parametrization x seed (x depth) grid of ordinary trainer runs, packed onto cores or hosts.

    python scripts/sweep.py --out sweeps/transfer --widths 8,16,32,64 --lrs 3e-4,1e-3,3e-3 \\
        --parametrizations mup,sp --seeds 0 -- --max_steps 300 --seq_len 64 --base_head_width 8

Each grid point is `run_trainer.py` with its own run directory under <out>/runs/; a run whose
summary.json exists is skipped, and an interrupted one resumes from its checkpoint, so a sweep can
be re-run until done. Runs go out as slots free up: --jobs at a time here (one thread each by
default), or --slots_per_host at a time on each host of a DeepSpeed-style --hostfile over ssh (the
repository and the folder the sweep starts in must be at the same paths on every host, the sweep folder
on a shared filesystem).
Everything after `--` goes to every run unchanged, so steps, batch, warmup and schedule are the same
at every width. Results: <out>/results.jsonl, one row per run, read by scripts/plot_mu_scaling.py.
"""
import argparse
import itertools
import json
import math
import os
import queue
import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mupgpt.config import _Parser, parse_args  # noqa: E402
from mupgpt.errors import UsageError, exit_on_usage_error  # noqa: E402


HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|[0-9A-Fa-f:]+")


def read_hostfile(path):
    """DeepSpeed's format: `host slots=N` per line, # comments."""
    if not os.path.isfile(path):
        raise UsageError(f"hostfile {path!r} not found: write one `host slots=N` line per node")
    hosts = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        words = line.split("#")[0].split()
        if not words:
            continue
        if not HOST.fullmatch(words[0]):  # a leading '-' would be an ssh option
            raise UsageError(f"{path} line {n}: {words[0]!r} is not a plain host name or address")
        if words[0] in hosts:
            raise UsageError(f"{path} line {n}: host {words[0]!r} is listed twice")
        hosts.append(words[0])
    if not hosts:
        raise UsageError(f"{path} names no hosts: write one `host slots=N` line per node")
    return hosts


def parse_list(flag, text, kind):
    """Comma-separated values of one grid axis; every one usable as that flag's value."""
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        example = {"lrs": "1e-3,3e-3", "widths": "8,16", "depths": "2,4", "seeds": "0,1"}[flag]
        raise UsageError(f"--{flag} {text!r}: give comma-separated {'numbers' if kind is float else 'integers'}, "
                         f"e.g. --{flag} {example}") from None
    if kind is float and not all(math.isfinite(v) and v > 0 for v in values):
        raise UsageError(f"--{flag} {text!r}: learning rates must be finite and above 0")
    if flag in ("widths", "depths") and not all(v > 0 for v in values):
        raise UsageError(f"--{flag} {text!r}: must be positive integers")
    if not values and flag != "depths":
        raise UsageError(f"--{flag} is empty: give at least one value")
    return values


def grid(args):
    axes = ([p.strip() for p in args.parametrizations.split(",") if p.strip()], parse_list("widths", args.widths, int),
            parse_list("depths", args.depths, int) or [None], parse_list("lrs", args.lrs, float),
            parse_list("seeds", args.seeds, int))
    if not axes[0]:
        raise UsageError("--parametrizations is empty: use mup and/or sp")
    for p in axes[0]:
        if p not in ("mup", "sp"):
            raise UsageError(f"unknown parametrization {p!r}: use mup and/or sp")
    return [dict(parametrization=p, width=w, depth=d, lr=lr, seed=s) for p, w, d, lr, s in itertools.product(*axes)]


def run_name(point):
    depth = f"_d{point['depth']}" if point["depth"] else ""
    return f"{point['parametrization']}_w{point['width']}{depth}_lr{point['lr']:g}_s{point['seed']}"


def trainer_flags(point, out, extra):
    flags = ["--parametrization", point["parametrization"], "--head_width", str(point["width"]),
             "--learning_rate", repr(point["lr"]), "--seed", str(point["seed"]), "--output_dir", str(out / "runs"),
             "--run_name", run_name(point), "--resume", "auto", "--log_interval", "10"]
    if point["depth"]:
        flags += ["--n_layer", str(point["depth"])]
    return flags + extra


def result_row(point, run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(l) for l in open(run_dir / "metrics.jsonl")]
    train = [r["loss"] for r in rows if "loss" in r]
    tail = train[-max(1, len(train) // 4):]  # the last quarter of logged steps
    finite = all(math.isfinite(x) for x in tail)
    return {**point, "run": run_dir.name, "final_train_loss": summary["final_train_loss"],
            "mean_train_loss": sum(tail) / len(tail) if finite else float("nan"),
            "val_loss": summary["final_val_loss"], "diverged": bool(summary["diverged"]) or not finite,
            "steps": summary["steps"]}


def launch(slot, flags, log):
    """A run on a slot: ('local', threads) runs here, (host, None) over ssh. Runs start in this process's
    folder, so relative paths after `--` (--config, --dataset, --data_dir) mean what they meant here,
    where the sweep prepared the data."""
    host, threads = slot
    cmd = [sys.executable, str(ROOT / "run_trainer.py"), *flags]
    if host == "local":
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        return subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    # the forwarded variables go in on stdin, so no value (an API key) is on a command line here or there
    remote = (f"while IFS= read -r l; do export \"$l\"; done; cd {shlex.quote(os.getcwd())} && "
              f"{' '.join(shlex.quote(c) for c in cmd)}")
    ssh = ["ssh", "-o", "BatchMode=yes", *shlex.split(os.environ.get("SSH_ARGS", "")), host, remote]
    return subprocess.run(ssh, input=remote_env().encode(), stdout=log, stderr=subprocess.STDOUT).returncode


def remote_env():
    """The variables run_multi_node.sh forwards (its private env file), as NAME=value lines."""
    path = os.environ.get("MUPGPT_SSH_ENV")
    lines = Path(path).read_text().splitlines() if path and os.path.exists(path) else []
    pairs = dict(line.split("=", 1) for line in lines if "=" in line)
    pairs.setdefault("OMP_NUM_THREADS", "1")
    return "".join(f"{k}={v}\n" for k, v in pairs.items())


def run_sweep(args, extra):
    if args.jobs is not None and args.jobs < 1:
        raise UsageError(f"--jobs {args.jobs}: give at least 1 (default: one per core)")
    if args.slots_per_host < 1:
        raise UsageError(f"--slots_per_host {args.slots_per_host}: give at least 1")
    hosts = read_hostfile(args.hostfile) if args.hostfile else None
    points = grid(args)
    out = Path(args.out).resolve()
    (out / "runs").mkdir(parents=True, exist_ok=True)
    cfg = parse_args(trainer_flags(points[0], out, extra))  # checks the shared flags once, up front
    from mupgpt.data import load_data
    load_data(cfg.dataset, cfg.tokenizer, cfg.data_dir)  # prepare once, not in every run at the same time
    todo = [p for p in points if not (out / "runs" / run_name(p) / "summary.json").exists()]
    if hosts:
        slots = [(h, None) for h in hosts for _ in range(args.slots_per_host)]
    else:
        jobs = args.jobs or os.cpu_count() or 1
        slots = [("local", max(1, (os.cpu_count() or 1) // jobs))] * jobs
    print(f"{len(points)} runs in the grid, {len(points) - len(todo)} already done, {len(todo)} to run "
          f"on {len(slots)} slot(s)", flush=True)
    free, failed, finished, lock, start = queue.Queue(), [], [], threading.Lock(), time.time()
    for slot in slots:
        free.put(slot)

    def work(point):
        slot = free.get()
        try:
            with open(out / "runs" / f"{run_name(point)}.log", "a") as log:
                rc = launch(slot, trainer_flags(point, out, extra), log)
            summary = out / "runs" / run_name(point) / "summary.json"
            diverged = rc == 1 and summary.exists() and json.loads(summary.read_text()).get("diverged")
            status = ("done" if rc == 0 else "diverged (a result, not a failure)" if diverged
                      else f"failed (exit {rc}, see runs/{run_name(point)}.log)")
            with lock:
                finished.append(run_name(point))
                if rc != 0 and not diverged:
                    failed.append(run_name(point))
                left = len(todo) - len(finished)
                eta = (time.time() - start) / len(finished) * left  # runs so far set the pace
                print(f"{run_name(point)} on {slot[0]}: {status}; {len(finished)} of {len(todo)} finished, "
                      f"{len(failed)} failed, ETA {duration(eta) if left else 'now'}", flush=True)
        finally:
            free.put(slot)

    threads = [threading.Thread(target=work, args=(p,)) for p in todo]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows = [result_row(p, out / "runs" / run_name(p)) for p in points
            if (out / "runs" / run_name(p) / "summary.json").exists()]
    with open(out / "results.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"{len(rows)} of {len(points)} runs finished -> {out / 'results.jsonl'}", flush=True)
    return rows, failed


def duration(seconds):
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def build_parser():
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="sweep folder (runs/ and results.jsonl go here)")
    p.add_argument("--widths", default="8,16,32,64", help="head widths")
    p.add_argument("--depths", default="", help="n_layer values (a depth sweep); empty: the trainer's --n_layer")
    p.add_argument("--lrs", required=True, help="learning rates, e.g. 1e-3,2e-3,4e-3")
    p.add_argument("--parametrizations", default="mup,sp", help="mup and/or sp")
    p.add_argument("--seeds", default="0", help="seeds, e.g. 0,1,2")
    p.add_argument("--jobs", type=int, default=None, help="runs at once on this machine (default: one per core)")
    p.add_argument("--hostfile", default="", help="run over ssh on these hosts instead (DeepSpeed hostfile format)")
    p.add_argument("--slots_per_host", type=int, default=1, help="runs at once on each --hostfile host")
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = build_parser().parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    _, failed = run_sweep(args, extra)
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    exit_on_usage_error(main)
