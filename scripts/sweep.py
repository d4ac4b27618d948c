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
be re-run until done. Each value of an axis is given once. <out>/sweep.json records the flags the runs
share; a later sweep of that folder with other ones is refused (another --out holds them). Two sweeps of
one folder at once run each run once (runs/<run>.lock) and both report it finished. Ctrl-C or SIGTERM
stops the sweep: the running runs save a checkpoint and stop, none starts after, results.jsonl holds the
finished ones, and the same command continues. Runs go out as slots free up: --jobs at a time here (one thread each by
default), or --slots_per_host at a time on each host of a DeepSpeed-style --hostfile over ssh (the
repository and the folder the sweep starts in must be at the same paths on every host, the sweep folder
on a shared filesystem).
Everything after `--` goes to every run unchanged (so --num_warmup_steps is the same number of steps at
every length; warmup_stable_decay's default decay is the last 20% of each run's steps). A flag the sweep
sets per run (--head_width, --learning_rate, --parametrization, --seed, --output_dir, --run_name, and
--n_layer, --max_steps or --train_batch_size when swept) is refused there: it would override the grid.
Under --optimizer muon, --lr_flag muon_lr makes --lrs the hidden matrices' Muon LR (--muon_lr) instead, and
--learning_rate after `--` sets the AdamW groups' (embeddings, vectors, readout) for every run.
Results: <out>/results.jsonl, one row per run (its grid point: max_steps and train_batch_size are null
unless swept; steps: the steps it ran), read by scripts/plot_mu_scaling.py.
"""
import argparse
import contextlib
import dataclasses
import fcntl
import itertools
import json
import math
import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path


def _stopped_early(signum, frame):
    """A signal while the modules load: nothing has started, so the sweep just ends (main() replaces this)."""
    print(f"{signal.Signals(signum).name}: the sweep stopped before any run started; run the same command again to "
          "start it", file=sys.stderr, flush=True)
    sys.exit(128 + signum)


if __name__ == "__main__":
    for _sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(_sig, _stopped_early)

ROOT = Path(__file__).resolve().parent.parent

from mupgpt.config import build_parser as build_trainer_parser  # noqa: E402
from mupgpt.config import parse_args  # noqa: E402
from mupgpt.errors import ArgumentParser, UsageError, exit_on_usage_error  # noqa: E402
from mupgpt.metrics import duration  # noqa: E402
from mupgpt.sweep_runs import result_row, run_name  # noqa: E402

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
OWNED = {"parametrization": "--parametrizations", "head_width": "--widths", "seed": "--seeds", "output_dir": "--out",
         "run_name": "--out", "n_layer": "--depths", "max_steps": "--steps", "train_batch_size": "--batch_sizes"}


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
    lrs, seeds = parse_list("lrs", args.lrs, float), parse_list("seeds", args.seeds, int)
    for flag, values, label in (("parametrizations", params, str), *((f, sizes[f], str) for f in SIZE_AXES),
                                ("lrs", lrs, lambda v: f"{v:g}"), ("seeds", seeds, str)):
        refuse_repeats(flag, getattr(args, flag), [label(v) for v in values])
    axes = (params, sizes["widths"], sizes["depths"] or [None], sizes["steps"] or [None],
            sizes["batch_sizes"] or [None], lrs, seeds)
    return [dict(parametrization=p, width=w, depth=d, max_steps=t, train_batch_size=b, lr=lr, seed=s,
                 lr_flag=args.lr_flag) for p, w, d, t, b, lr, s in itertools.product(*axes)]


def refuse_repeats(flag, text, labels):
    """A value given twice would be one run launched twice at once into one run directory (a run is named by
    its values, learning rates to 6 significant digits), so each value goes in once."""
    twice = sorted({v for v in labels if labels.count(v) > 1})
    if twice:
        raise UsageError(f"--{flag} {text!r} gives {twice[0]} more than once"
                         f"{' (learning rates are told apart to 6 significant digits)' if flag == 'lrs' else ''}: "
                         "give each value once")


def refuse_swept_flags(args, extra):
    """A flag after `--` that the sweep also sets per run would silently win over the grid (the last
    value of a flag counts), so every run of an axis would be the same run under different names."""
    parser = build_trainer_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    given = vars(parser.parse_args(extra))  # only what the command line after `--` sets
    for dest, flag in {args.lr_flag: "--lrs", **OWNED}.items():
        optional = flag in ("--depths", "--steps", "--batch_sizes")  # set per run only when swept
        if dest in given and (not optional or getattr(args, flag[2:]).strip()):
            raise UsageError(f"--{dest} is given after -- and the sweep sets it for each run from {flag}: "
                             f"give its values to {flag} only")


def trainer_flags(point, out, extra):
    flags = ["--parametrization", point["parametrization"], "--head_width", str(point["width"]),
             f"--{point['lr_flag']}", repr(point["lr"]), "--seed", str(point["seed"]),
             "--output_dir", str(out / "runs"),
             "--run_name", run_name(point), "--resume", "auto", "--log_interval", "10"]
    if point["depth"]:
        flags += ["--n_layer", str(point["depth"])]
    if point["max_steps"]:
        flags += ["--max_steps", str(point["max_steps"])]
    if point["train_batch_size"]:
        flags += ["--train_batch_size", str(point["train_batch_size"])]
    return flags + extra


# What the sweep sets per run, and what only changes how a run is watched or saved: neither defines a run's
# result.
NOT_SHARED = {"head_width", "parametrization", "seed", "output_dir", "run_name", "resume",
              "local_rank", "log_interval", "save", "save_interval", "keep_checkpoints", "wandb", "debug",
              "print_profile_results"}


def shared_settings(cfg, points):
    """Every trainer setting the runs share, paths made absolute (runs start in this folder): with the grid point
    it defines a run, so a sweep folder holds runs of one set of them."""
    swept = {"n_layer": "depth", "max_steps": "max_steps", "train_batch_size": "train_batch_size"}
    settings = {k: v for k, v in dataclasses.asdict(cfg).items()
                if k not in NOT_SHARED and k != points[0]["lr_flag"]
                and not (k in swept and points[0][swept[k]] is not None)}
    for key in ("data_dir", "ds_config", "nvme_path"):
        if settings.get(key):
            settings[key] = os.path.abspath(settings[key])
    if os.path.exists(settings["dataset"]):
        settings["dataset"] = os.path.abspath(settings["dataset"])
    return settings


def check_settings(out, settings):
    """<out>/sweep.json records the shared settings of the sweep's first start; a later start with other ones would
    skip finished runs that are not the runs it asks for (or resume them under other settings), so it is refused."""
    path = out / "sweep.json"
    if not path.exists():
        tmp = out / f".sweep.json.{os.getpid()}"
        tmp.write_text(json.dumps({"shared": settings}, indent=2) + "\n")
        try:
            os.link(tmp, path)  # the first of two sweeps starting at once records its settings; the other compares
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    try:
        before = json.loads(path.read_text())["shared"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(f"{path} is unreadable: delete it if the runs in {out} were run with these flags, "
                         "or give another --out") from None
    changed = sorted(k for k in before.keys() | settings.keys() if before.get(k) != settings.get(k))
    if changed:
        k = changed[0]
        raise UsageError(f"{out} holds runs made with other shared flags ({len(changed)} differ, e.g. --{k} "
                         f"{before.get(k)!r} there, {settings.get(k)!r} now): give another --out for these runs, "
                         "or the flags after -- that it was run with")


def check_out(out):
    """Refuse a sweep folder that cannot be made or written, before anything starts."""
    d = out
    while not d.exists() and not d.is_symlink():
        d = d.parent
    if not d.is_dir():
        raise UsageError(f"--out {out}: {d} is {'a file' if d.exists() else 'a broken link'}, not a folder: "
                         "give a folder path")
    try:
        (out / "runs").mkdir(parents=True, exist_ok=True)
        probe = out / "runs" / f".write-test.{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"--out {out}: can't write there ({e.strerror}): give a folder you can write to") from None


class Stop:
    """SIGINT (Ctrl-C) and SIGTERM stop the sweep: no run starts after, each running one gets SIGTERM (the trainer
    saves a checkpoint and exits) and a second signal kills them. Before any run starts, the signal ends the sweep."""

    def __init__(self):
        self.event, self.signum, self.children = threading.Event(), None, {}
        self.lock, self.running = threading.Lock(), False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.handle)

    def handle(self, signum, frame):
        first = self.signum is None
        self.signum = self.signum or signum
        if not self.running:
            raise Stopped()
        if first:
            print(f"{signal.Signals(signum).name}: stopping the sweep; the running runs save a checkpoint "
                  "(again: stop them at once)", flush=True)
        self.event.set()
        with self.lock:
            for proc, soft in self.children.items():
                soft(proc) if first else send(proc, signal.SIGKILL)

    def start(self, cmd, soft=None, **kw):
        """Popen in a session of its own (a terminal's Ctrl-C reaches only the sweep, which stops the child once);
        `soft(proc)` asks it to stop (default: SIGTERM)."""
        with self.lock:
            if self.event.is_set():
                return None
            proc = subprocess.Popen(cmd, start_new_session=True, **kw)
            self.children[proc] = soft or (lambda proc: send(proc, signal.SIGTERM))
            return proc

    def wait(self, proc):
        try:
            return proc.wait()
        finally:
            with self.lock:
                self.children.pop(proc, None)


class Stopped(Exception):
    pass


def send(proc, sig):
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def launch(slot, flags, log, stop, stdin_text=None):
    """A run on a slot: ('local', threads) runs here, (host, None) over ssh. Runs start in this process's
    folder, so relative paths after `--` (--config, --dataset, --data_dir) mean what they meant here,
    where the sweep prepared the data. None: stopped before it started."""
    host, threads = slot
    cmd = [sys.executable, str(ROOT / "run_trainer.py"), *flags]
    if host == "local":
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        proc = stop.start(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        return None if proc is None else stop.wait(proc)
    # The forwarded variables go in on stdin, up to an empty line, so no value (an API key) is on a command line
    # here or there. ssh's stdin stays open: when it closes (the sweep stops the run, or dies), the remote trainer
    # gets SIGTERM, as a local one would.
    remote = (f"while IFS= read -r l && [ -n \"$l\" ]; do export \"$l\"; done; cd {shlex.quote(os.getcwd())} && "
              f"{{ exec 3<&0; {' '.join(shlex.quote(c) for c in cmd)} </dev/null & pid=$!; "
              "{ cat <&3 >/dev/null 2>&1; kill -TERM $pid 2>/dev/null; } >/dev/null 2>&1 & w=$!; "
              "wait $pid; rc=$?; kill $w 2>/dev/null; exit $rc; }")
    ssh = ["ssh", "-o", "BatchMode=yes", *shlex.split(os.environ.get("SSH_ARGS", "")), host, remote]
    proc = stop.start(ssh, soft=lambda proc: close(proc.stdin), stdin=subprocess.PIPE, stdout=log,
                      stderr=subprocess.STDOUT)
    if proc is None:
        return None
    try:
        proc.stdin.write((remote_env() + "\n").encode())
        proc.stdin.flush()
    except (OSError, ValueError):  # ended already, or stopped (stdin closed) meanwhile
        pass
    return stop.wait(proc)


def close(f):
    try:
        f.close()
    except OSError:
        pass


def remote_env():
    """The variables run_multi_node.sh forwards (its private env file), as NAME=value lines."""
    path = os.environ.get("MUPGPT_SSH_ENV")
    lines = Path(path).read_text().splitlines() if path and os.path.exists(path) else []
    pairs = dict(line.split("=", 1) for line in lines if "=" in line)
    pairs.setdefault("OMP_NUM_THREADS", "1")
    return "".join(f"{k}={v}\n" for k, v in pairs.items())


@contextlib.contextmanager
def run_lock(path, stop):
    """Hold runs/<run>.lock while a run is checked and launched: two sweeps of one folder (or a repeated grid
    point) never run one run at once, and the second finds it finished. Waits, and gives up if the sweep stops."""
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            while not stop.event.is_set():
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    time.sleep(0.2)
            else:
                yield False
                return
        except OSError:  # a filesystem without locks: the summary check below still skips most finished runs
            pass
        yield True


def write_results(out, rows):
    """results.jsonl whole or not at all: written beside it and renamed into place."""
    tmp = out / f".results.jsonl.{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        os.replace(tmp, out / "results.jsonl")
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UsageError(f"can't write {out / 'results.jsonl'} ({e.strerror}): make it writable and run the sweep "
                         "again (finished runs are kept)") from None


def prepare_sweep(args, extra):
    """Every flag and the sweep folder checked, and the data prepared once (not by every run at the same
    time): (grid points, sweep folder, hosts or None)."""
    if args.jobs is not None and args.jobs < 1:
        raise UsageError(f"--jobs {args.jobs}: give at least 1 (default: one per core)")
    if args.slots_per_host < 1:
        raise UsageError(f"--slots_per_host {args.slots_per_host}: give at least 1")
    if not args.out.strip():
        raise UsageError("--out is empty: give the sweep folder (runs/ and results.jsonl go there)")
    hosts = read_hostfile(args.hostfile) if args.hostfile else None
    points = grid(args)
    refuse_swept_flags(args, extra)
    out = Path(os.path.abspath(args.out))
    cfg = parse_args(trainer_flags(points[0], out, extra))  # checks the shared flags once, up front
    if args.lr_flag == "muon_lr" and cfg.optimizer != "muon":
        raise UsageError("--lr_flag muon_lr sweeps the Muon LR, which only --optimizer muon uses: add "
                         "--optimizer muon after --, or sweep --lr_flag learning_rate")
    if cfg.shard_group_size:  # each run is one process (run_trainer.py, no torchrun): one rank has nothing to group
        raise UsageError(f"--shard_group_size {cfg.shard_group_size}: the sweep runs each point as one process, "
                         "which has no ranks to group: drop it (hybrid sharding runs under torchrun --backend fsdp)")
    for b in sorted({p["train_batch_size"] for p in points if p["train_batch_size"]}):
        if b % cfg.per_device_train_batch_size:
            raise UsageError(f"--batch_sizes {args.batch_sizes}: {b} is not a multiple of the micro batch "
                             f"--per_device_train_batch_size {cfg.per_device_train_batch_size} (each run accumulates "
                             "micro batches up to its batch size): give multiples of it, or a smaller one after --")
    check_out(out)
    check_settings(out, shared_settings(cfg, points))
    from mupgpt.data import load_data
    load_data(cfg.dataset, cfg.tokenizer, cfg.data_dir)
    return points, out, hosts


def slots_for(args, hosts):
    """(host, threads per run) for every run that may go at once."""
    if hosts:
        return [(h, None) for h in hosts for _ in range(args.slots_per_host)]
    jobs = args.jobs or os.cpu_count() or 1
    return [("local", max(1, (os.cpu_count() or 1) // jobs))] * jobs


class Progress:
    """One line per finished run, with the count, the failures and an ETA from the runs so far."""

    def __init__(self, total):
        self.total, self.finished, self.failed = total, [], []
        self.lock, self.start = threading.Lock(), time.time()

    def report(self, name, where, status, failure=False):
        with self.lock:
            self.finished.append(name)
            if failure:
                self.failed.append(name)
            left = self.total - len(self.finished)
            eta = (time.time() - self.start) / len(self.finished) * left
            print(f"{name}{where}: {status}; {len(self.finished)} of {self.total} finished, "
                  f"{len(self.failed)} failed, ETA {duration(eta) if left else 'now'}", flush=True)


def report_outcome(progress, name, host, rc, summary, stop):
    """A run that exited: done, diverged (a result), stopped by the sweep's stop, or failed."""
    done = summary.exists()
    try:
        diverged = rc == 1 and done and json.loads(summary.read_text()).get("diverged")
    except (OSError, ValueError, AttributeError):
        diverged = False
    if rc == 0 and done:
        progress.report(name, f" on {host}", "done")
    elif diverged:
        progress.report(name, f" on {host}", "diverged (a result, not a failure)")
    elif stop.event.is_set():
        print(f"{name} on {host}: stopped (it resumes from its checkpoint when the sweep runs again)", flush=True)
    else:
        why = f"exit {rc}" if rc else "it ended without a summary.json"
        progress.report(name, f" on {host}", f"failed ({why}, see runs/{name}.log)", failure=True)


def run_point(point, out, extra, free, progress, stop):
    """One run, under its lock (another sweep of this folder may hold it), in the next free slot."""
    name = run_name(point)
    summary = out / "runs" / name / "summary.json"
    with run_lock(out / "runs" / f"{name}.lock", stop) as held:
        if not held or stop.event.is_set():
            return
        if summary.exists():  # another sweep of this folder ran it meanwhile: its own summary is the result
            return progress.report(name, "", "done (by another sweep of this folder)")
        slot = None
        while slot is None and not stop.event.is_set():
            try:
                slot = free.get(timeout=0.2)
            except queue.Empty:
                pass
        if slot is None:
            return
        try:
            with open(out / "runs" / f"{name}.log", "a") as log:
                rc = launch(slot, trainer_flags(point, out, extra), log, stop)
        finally:
            free.put(slot)
        if rc is not None:
            report_outcome(progress, name, slot[0], rc, summary, stop)


def run_sweep(args, extra, stop):
    points, out, hosts = prepare_sweep(args, extra)
    todo = [p for p in points if not (out / "runs" / run_name(p) / "summary.json").exists()]
    slots = slots_for(args, hosts)
    print(f"{len(points)} runs in the grid, {len(points) - len(todo)} already done, {len(todo)} to run "
          f"on {len(slots)} slot(s)", flush=True)
    free, progress = queue.Queue(), Progress(len(todo))
    for slot in slots:
        free.put(slot)
    threads = [threading.Thread(target=run_point, args=(p, out, extra, free, progress, stop)) for p in todo]
    stop.running = True
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():
            t.join(0.2)
    rows = [result_row(p, out / "runs" / run_name(p)) for p in points
            if (out / "runs" / run_name(p) / "summary.json").exists()]
    write_results(out, rows)
    print(f"{len(rows)} of {len(points)} runs finished -> {out / 'results.jsonl'}", flush=True)
    return rows, progress.failed


def build_parser():
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="sweep folder (runs/ and results.jsonl go here)")
    p.add_argument("--widths", default="8,16,32,64", help="head widths")
    p.add_argument("--depths", default="", help="n_layer values (a depth sweep); empty: the trainer's --n_layer")
    p.add_argument("--steps", default="", help="--max_steps values (a training-length sweep); empty: the trainer's")
    p.add_argument("--batch_sizes", default="",
                   help="global --train_batch_size values, sequences per optimizer step (a batch-size sweep; "
                        "multiples of --per_device_train_batch_size); empty: the trainer's")
    p.add_argument("--lrs", required=True, help="learning rates, e.g. 1e-3,2e-3,4e-3")
    p.add_argument("--lr_flag", default="learning_rate", choices=["learning_rate", "muon_lr"],
                   help="the trainer flag --lrs sets: learning_rate (AdamW's), or muon_lr (the Muon LR of the hidden "
                        "matrices under --optimizer muon; --learning_rate after -- then sets the AdamW groups' LR)")
    p.add_argument("--parametrizations", default="mup,sp", help="mup and/or sp")
    p.add_argument("--seeds", default="0", help="seeds, e.g. 0,1,2")
    p.add_argument("--jobs", type=int, default=None, help="runs at once on this machine (default: one per core)")
    p.add_argument("--hostfile", default="", help="run over ssh on these hosts instead (DeepSpeed hostfile format)")
    p.add_argument("--slots_per_host", type=int, default=1, help="runs at once on each --hostfile host")
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    stop = Stop()
    try:
        args = build_parser().parse_args(argv[:argv.index("--")] if "--" in argv else argv)
        _, failed = run_sweep(args, extra, stop)
    except Stopped:
        print(f"{signal.Signals(stop.signum).name}: the sweep stopped before any run started; run the same command "
              "again to start it", file=sys.stderr, flush=True)
        sys.exit(128 + stop.signum)
    if stop.signum:
        print(f"{signal.Signals(stop.signum).name}: the sweep stopped; results.jsonl holds the finished runs; run the "
              "same command again to continue (stopped runs resume from their checkpoints)", file=sys.stderr,
              flush=True)
        sys.exit(128 + stop.signum)
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    exit_on_usage_error(main)
