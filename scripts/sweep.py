"""An LR x parametrization x seed grid of ordinary trainer runs along one more axis (width, depth, training
length or batch size), packed onto cores or hosts.

    python scripts/sweep.py --out sweeps/transfer --widths 8,16,32,64 --lrs 3e-4,1e-3,3e-3 \\
        --parametrizations mup,sp --seeds 0 -- --max_steps 300 --seq_len 64 --base_head_width 8
    python scripts/sweep.py --out sweeps/length --widths 32 --steps 200,800 --lrs 3e-4,1e-3,3e-3 \\
        --parametrizations mup -- --seq_len 64 --lr_scheduler_type warmup_stable_decay

The varied axis is the one of --widths (head widths), --depths (--n_layer), --steps (--max_steps) and
--batch_sizes (--train_batch_size, the global batch: sequences per optimizer step) given more than one
value; a sweep varies at most one of them (scripts/plot_mu_scaling.py plots the optimum's transfer
along it), so a steps or batch sweep names one width. A batch size is reached by accumulating micro
batches of --per_device_train_batch_size (set after `--`; each batch size must be a multiple of it), so
every run holds the same memory; at a fixed --max_steps a larger batch also sees more tokens.

Each grid point is `run_trainer.py` with its own run directory under <out>/runs/; a run whose
summary.json exists is skipped, and an interrupted one resumes from its checkpoint, so a sweep can
be re-run until done. Runs go out as slots free up: --jobs at a time here (one thread each by
default), or --slots_per_host at a time on each host of a DeepSpeed-style --hostfile over ssh (the
repository and the folder the sweep starts in must be at the same paths on every host, the sweep folder
on a shared filesystem).
Everything after `--` goes to every run unchanged (so --num_warmup_steps is the same number of steps at
every length; warmup_stable_decay's default decay is the last 20% of each run's steps). A flag the sweep
sets per run (--head_width, --learning_rate, --parametrization, --seed, --output_dir, --run_name, and
--n_layer, --max_steps or --train_batch_size when swept) is refused there: it would override the grid.
Results: <out>/results.jsonl, one row per run (its grid point: max_steps and train_batch_size are null
unless swept; steps: the steps it ran), read by scripts/plot_mu_scaling.py.
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
from mupgpt.config import build_parser as build_trainer_parser  # noqa: E402
from mupgpt.errors import UsageError, exit_on_usage_error  # noqa: E402
from mupgpt.metrics import duration  # noqa: E402


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
        example = {"lrs": "1e-3,3e-3", "widths": "8,16", "depths": "2,4", "seeds": "0,1", "steps": "200,800",
                   "batch_sizes": "16,64"}[flag]
        raise UsageError(f"--{flag} {text!r}: give comma-separated {'numbers' if kind is float else 'integers'}, "
                         f"e.g. --{flag} {example}") from None
    if kind is float and not all(math.isfinite(v) and v > 0 for v in values):
        raise UsageError(f"--{flag} {text!r}: learning rates must be finite and above 0")
    if flag in ("widths", "depths", "steps", "batch_sizes") and not all(v > 0 for v in values):
        raise UsageError(f"--{flag} {text!r}: must be positive integers")
    if not values and flag in ("lrs", "widths", "seeds"):
        raise UsageError(f"--{flag} is empty: give at least one value")
    return values


SIZE_AXES = ("widths", "depths", "steps", "batch_sizes")  # the sweep varies one of these besides the LR
# trainer flag (argparse dest) -> the sweep flag that sets it for each run; the axes only when given
OWNED = {"parametrization": "--parametrizations", "head_width": "--widths", "learning_rate": "--lrs",
         "seed": "--seeds", "output_dir": "--out", "run_name": "--out", "n_layer": "--depths",
         "max_steps": "--steps", "train_batch_size": "--batch_sizes"}


def grid(args):
    params = [p.strip() for p in args.parametrizations.split(",") if p.strip()]
    if not params:
        raise UsageError("--parametrizations is empty: use mup and/or sp")
    for p in params:
        if p not in ("mup", "sp"):
            raise UsageError(f"unknown parametrization {p!r}: use mup and/or sp")
    sizes = {flag: parse_list(flag, getattr(args, flag), int) for flag in SIZE_AXES}
    varied = [flag for flag in SIZE_AXES if len(sizes[flag]) > 1]
    if len(varied) > 1:
        a, b = varied[:2]
        keep = "--widths 32" if "widths" in varied else f"--{b} {sizes[b][0]}"
        raise UsageError(f"--{a} {getattr(args, a)} and --{b} {getattr(args, b)} both vary: a sweep varies one of "
                         f"width, depth, steps and batch size besides the LR: give the other one value, e.g. {keep}")
    axes = (params, sizes["widths"], sizes["depths"] or [None], sizes["steps"] or [None],
            sizes["batch_sizes"] or [None], parse_list("lrs", args.lrs, float), parse_list("seeds", args.seeds, int))
    return [dict(parametrization=p, width=w, depth=d, max_steps=t, train_batch_size=b, lr=lr, seed=s)
            for p, w, d, t, b, lr, s in itertools.product(*axes)]


def refuse_swept_flags(args, extra):
    """A flag after `--` that the sweep also sets per run would silently win over the grid (the last
    value of a flag counts), so every run of an axis would be the same run under different names."""
    parser = build_trainer_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    given = vars(parser.parse_args(extra))  # only what the command line after `--` sets
    for dest, flag in OWNED.items():
        optional = flag in ("--depths", "--steps", "--batch_sizes")  # set per run only when swept
        if dest in given and (not optional or getattr(args, flag[2:]).strip()):
            raise UsageError(f"--{dest} is given after -- and the sweep sets it for each run from {flag}: "
                             f"give its values to {flag} only")


def run_name(point):
    depth = f"_d{point['depth']}" if point["depth"] else ""
    steps = f"_steps{point['max_steps']}" if point["max_steps"] else ""
    batch = f"_batch{point['train_batch_size']}" if point["train_batch_size"] else ""
    return f"{point['parametrization']}_w{point['width']}{depth}{steps}{batch}_lr{point['lr']:g}_s{point['seed']}"


def trainer_flags(point, out, extra):
    flags = ["--parametrization", point["parametrization"], "--head_width", str(point["width"]),
             "--learning_rate", repr(point["lr"]), "--seed", str(point["seed"]), "--output_dir", str(out / "runs"),
             "--run_name", run_name(point), "--resume", "auto", "--log_interval", "10"]
    if point["depth"]:
        flags += ["--n_layer", str(point["depth"])]
    if point["max_steps"]:
        flags += ["--max_steps", str(point["max_steps"])]
    if point["train_batch_size"]:
        flags += ["--train_batch_size", str(point["train_batch_size"])]
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
    refuse_swept_flags(args, extra)
    out = Path(args.out).resolve()
    cfg = parse_args(trainer_flags(points[0], out, extra))  # checks the shared flags once, up front
    for b in sorted({p["train_batch_size"] for p in points if p["train_batch_size"]}):
        if b % cfg.per_device_train_batch_size:
            raise UsageError(f"--batch_sizes {args.batch_sizes}: {b} is not a multiple of the micro batch "
                             f"--per_device_train_batch_size {cfg.per_device_train_batch_size} (each run accumulates "
                             "micro batches up to its batch size): give multiples of it, or a smaller one after --")
    (out / "runs").mkdir(parents=True, exist_ok=True)
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


def build_parser():
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="sweep folder (runs/ and results.jsonl go here)")
    p.add_argument("--widths", default="8,16,32,64", help="head widths")
    p.add_argument("--depths", default="", help="n_layer values (a depth sweep); empty: the trainer's --n_layer")
    p.add_argument("--steps", default="", help="--max_steps values (a training-length sweep); empty: the trainer's")
    p.add_argument("--batch_sizes", default="",
                   help="global --train_batch_size values, sequences per optimizer step (a batch-size sweep; "
                        "multiples of --per_device_train_batch_size); empty: the trainer's")
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
