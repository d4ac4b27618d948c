"""Throughput, MFU and peak memory of the trainer per backend, and side by side with a reference trainer.

    python bench/bench.py --name cpu_small --backends single,deepspeed_zero3 --steps 40 --warmup 10 --repeats 3
    python bench/bench.py --name vs_nanogpt --backends single --reference /path/to/nanoGPT   # its train.py
    python bench/bench.py --name cpu_overhead --host_overhead      # each engine's per-step host overhead
    python bench/bench.py --name cpu_counts --host_overhead --counts --repeats 0  # per-step counts only

--host_overhead measures what an engine costs per step beyond the model's own math: a model whose math
is tiny (12 layers, 2 heads of width 16, sequence 16, batch 1, fp32, one thread) on every engine, and
each engine's median step time minus the single backend's. That is the engine's own per-step work
(hooks, bookkeeping, launches), the part that on a GPU shows up as ZeRO's and FSDP2's gap to the
single backend, measurable here without one.

Each measurement is a real `run_trainer.py` run (launched as a user would) logging every
--log_interval steps (each logged row's tokens/s covers the steps since the previous one); the rows of
the first --warmup steps are dropped and the median over the rest, then over --repeats runs, is
reported with the logged MFU and the run's peak memory. --counts also runs each backend once under
bench/step_counts.py and reports its host work per step: collectives by kind, ZeRO-3 fetches and
releases, engine hooks, optimizer (sub-)steps and device-to-host read-backs, on an ordinary step and
on a logged one. A reference checkout's train.py (nanoGPT's
command line) runs the identical model, batch, sequence, precision and compile setting on the same
tokens; its per-iteration times give its tokens/s. Results: bench/results/<name>.json and a Markdown table.
"""
import argparse
import json
import os
import pickle
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from mupgpt.errors import ArgumentParser, UsageError, exit_on_usage_error

ROOT = Path(__file__).resolve().parent.parent

# backend name -> (launcher prefix, trainer flags)
BACKENDS = {
    "single": ([], ["--backend", "single"]),
    "ddp2": (["torchrun", "--nproc_per_node", "2"], ["--backend", "ddp"]),
    "fsdp": (["torchrun", "--nproc_per_node", "1"], ["--backend", "fsdp"]),
    "fsdp2": (["torchrun", "--nproc_per_node", "2"], ["--backend", "fsdp"]),
    "deepspeed_zero1": ([], ["--backend", "deepspeed", "--zero_stage", "1"]),
    "deepspeed_zero3": ([], ["--backend", "deepspeed", "--zero_stage", "3"]),
    "deepspeed_zero2": ([], ["--backend", "deepspeed", "--zero_stage", "2"]),
    "deepspeed_zero3_offload_cpu": ([], ["--backend", "deepspeed", "--zero_stage", "3", "--offload", "cpu"]),
}
DEEPSPEED_2 = ["deepspeed", "--num_gpus", "2", "--master_port", "29671"]
for _name in [b for b in BACKENDS if b.startswith("deepspeed")]:
    BACKENDS[f"{_name}_2ranks"] = (DEEPSPEED_2, BACKENDS[_name][1])
BACKENDS["single_ddp"] = (["torchrun", "--nproc_per_node", "1"], ["--backend", "ddp"])


# the host-overhead configuration (flags given on the command line still win)
HOST_OVERHEAD = {"n_layer": 12, "n_head": 2, "head_width": 16, "seq_len": 16, "batch": 1, "precision": "fp32",
                 "threads": 1, "steps": 120, "warmup": 60, "log_interval": 20, "repeats": 2,
                 "backends": "single,deepspeed_zero1,deepspeed_zero2,deepspeed_zero3,fsdp"}


def model_flags(args):
    return ["--n_layer", str(args.n_layer), "--n_head", str(args.n_head), "--head_width", str(args.head_width),
            "--base_head_width", str(args.head_width), "--seq_len", str(args.seq_len),
            "--per_device_train_batch_size", str(args.batch), "--precision", args.precision,
            "--tokenizer", "bytes", "--dataset", args.dataset, "--data_dir", args.data_dir,
            "--vocab_size", str(args.vocab_size)]


def launch(backend, args, out, script):
    launcher, flags = BACKENDS[backend]
    cmd = [*launcher, *([sys.executable] if not launcher else []), *script, *flags,
           *model_flags(args), "--max_steps", str(args.steps), "--log_interval", str(args.log_interval),
           "--eval_interval", "0", "--eval_iters", "1", "--lr_scheduler_type", "constant", "--output_dir", str(out),
           "--run_name", backend, "--save", "false"]
    if args.compile:
        cmd.append("--compile")
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **args.env})
    if res.returncode != 0:
        raise RuntimeError(f"{backend} failed:\n{res.stderr[-3000:]}")


def run_counts(backend, args, out):
    """Rank 0's host work per step (bench/step_counts.py): the median ordinary step and the last logged one."""
    launch(backend, args, out, [str(ROOT / "bench" / "step_counts.py"), str(out / "counts"), "--"])
    steps = json.loads((out / "counts.rank0.json").read_text())[:-1]  # the last one holds the teardown
    logged = [s for i, s in enumerate(steps, start=2) if i % args.log_interval == 0]
    plain = [s for i, s in enumerate(steps, start=2) if i % args.log_interval and i > 2]
    names = sorted({k for s in steps for k in s})
    return {"step": {k: statistics.median(s.get(k, 0) for s in plain) for k in names},
            "logged_step": {k: logged[-1].get(k, 0) for k in names} if logged else {}}


def run_ours(backend, args, out):
    launch(backend, args, out, [str(ROOT / "run_trainer.py")])
    rows = [json.loads(line) for line in open(out / backend / "metrics.jsonl")]
    rows = [r for r in rows if "tokens_per_s" in r and r["step"] > args.warmup]
    summary = json.loads((out / backend / "summary.json").read_text())
    tokens_per_step = args.batch * args.seq_len
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows),
            "step_ms": statistics.median(1000 * tokens_per_step / r["tokens_per_s"] for r in rows),
            "mfu": statistics.median(r["mfu"] for r in rows) if rows[0]["mfu"] is not None else None,
            "peak_host_mib": summary["peak_host_bytes_per_rank"] / 2**20,
            "peak_device_mib": summary["peak_device_bytes_per_rank"] / 2**20}


def run_reference(path, args, work):
    """The reference's train.py (nanoGPT's flags) on our prepared tokens: same dims, precision and compile."""
    path = Path(path).resolve()
    train_py = path / "train.py"
    prepared = Path(args.data_dir) / f"{args.dataset}-bytes"
    data = work / "data" / "bench"
    data.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        shutil.copy(prepared / f"{split}.bin", data / f"{split}.bin")
    if (path / "configurator.py").exists():  # nanoGPT reads it from its working directory
        shutil.copy(path / "configurator.py", work)
    with open(data / "meta.pkl", "wb") as f:  # our vocabulary as the model sees it (padded to 64)
        pickle.dump({"vocab_size": 64 * -(-max(257, args.vocab_size) // 64)}, f)
    cmd = [sys.executable, str(train_py), "--dataset=bench", f"--n_layer={args.n_layer}", f"--n_head={args.n_head}",
           f"--n_embd={args.n_head * args.head_width}", f"--block_size={args.seq_len}", f"--batch_size={args.batch}",
           "--gradient_accumulation_steps=1", "--dropout=0.0", "--bias=True", f"--compile={args.compile}",
           f"--dtype={'float32' if args.precision == 'fp32' else 'bfloat16'}", f"--device={args.device}",
           "--eval_interval=1000000", "--eval_iters=1", "--log_interval=1", f"--max_iters={args.steps}",
           "--always_save_checkpoint=False", "--decay_lr=False", f"--out_dir={work / 'out'}"]
    res = subprocess.run(cmd, cwd=work, capture_output=True, text=True, env={**os.environ, **args.env})
    if res.returncode != 0:
        raise RuntimeError(f"reference failed:\n{res.stderr[-3000:]}")
    iters = re.finditer(r"iter (\d+): loss \S+, time ([\d.]+)ms", res.stdout)
    times = [(int(m.group(1)), float(m.group(2))) for m in iters]
    times = [t for i, t in times if i > args.warmup]
    return {"tokens_per_s": statistics.median(args.batch * args.seq_len / (t / 1000) for t in times)}


def environment():
    import torch
    info = {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine()}
    try:
        import deepspeed
        info["deepspeed"] = deepspeed.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    else:
        cpu = [line for line in open("/proc/cpuinfo") if line.startswith("model name")]
        name = cpu[0].split(':', 1)[1].strip() if cpu else platform.processor()
        info["device"] = f"CPU: {name}, {os.cpu_count()} cores"
    info["load_1min"] = os.getloadavg()[0]
    return info


def check_args(args):
    """Bad flags fail here, before any run and before anything is written."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", args.name):
        raise UsageError(f"--name {args.name!r} must be a plain file name (letters, digits, '.', '_', '-'): "
                         "the results go to bench/results/<name>.json")
    for name in ("n_layer", "n_head", "head_width", "seq_len", "batch", "steps", "log_interval"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1, not {getattr(args, name)}")
    for name in ("warmup", "threads", "vocab_size", "repeats"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name} must be 0 or more, not {getattr(args, name)} (see --help for what 0 means)")
    if args.repeats == 0 and not args.counts:
        raise UsageError("--repeats 0 measures nothing: give --repeats 1 or more, or --counts")
    if args.warmup >= args.steps:
        raise UsageError(f"--warmup {args.warmup} drops every one of the --steps {args.steps}: "
                         f"use --steps {args.warmup + 1} or more, or a smaller --warmup")
    if 0 < args.vocab_size < 257:
        raise UsageError(f"--vocab_size {args.vocab_size} is below the byte tokenizer's 257: use 0 or at least 257")
    unknown = [b for b in args.backends.split(",") if b not in BACKENDS]
    if unknown:
        raise UsageError(f"unknown backend(s) {unknown}: use {', '.join(BACKENDS)}")
    if args.reference and not (Path(args.reference) / "train.py").exists():
        raise UsageError(f"--reference {args.reference} has no train.py: point it at a nanoGPT checkout")
    from mupgpt.config import parse_args
    parse_args([*model_flags(args), "--max_steps", str(args.steps)])  # the rest as the trainer checks it


def measure(args, results, work):
    """{backend: [one dict per repeat]}. Repeats interleave the backends (and the reference), so drift on
    the machine over the minutes a benchmark takes falls on every side of a ratio alike; a backend that
    fails is recorded and skipped, not the end of the others' figures."""
    runs = {b: [] for b in args.backends.split(",")}
    if args.reference:
        runs["reference"] = []
    for r in range(args.repeats):
        for backend, reps in runs.items():
            if backend in results["backends"]:
                continue
            try:
                if backend == "reference":
                    reps.append(run_reference(args.reference, args, work / f"ref{r}"))
                else:
                    reps.append(run_ours(backend, args, work / f"{backend}{r}"))
            except RuntimeError as e:
                print(e, file=sys.stderr)
                results["backends"][backend] = {"error": str(e)[-2000:]}
    return runs


def summarise(args, results, runs):
    """Medians over repeats, each backend against the single backend (paired by repeat) and the reference."""
    for backend, reps in runs.items():
        if backend == "reference" or backend in results["backends"] or not reps:
            continue
        results["backends"][backend] = {k: statistics.median(r[k] for r in reps) if reps[0][k] is not None else None
                                        for k in reps[0]}
        results["backends"][backend]["repeats_tokens_per_s"] = [r["tokens_per_s"] for r in reps]
        results["backends"][backend]["repeats_step_ms"] = [r["step_ms"] for r in reps]
    single = results["backends"].get("single", {})
    for b in results["backends"].values():
        if "step_ms" in b and "step_ms" in single:
            b["overhead_ms"] = b["step_ms"] - single["step_ms"]
            b["step_time_vs_single"] = b["step_ms"] / single["step_ms"]
            b["paired_vs_single"] = [x / y for x, y in zip(b["repeats_step_ms"], single["repeats_step_ms"])]
    if args.reference and "reference" not in results["backends"]:
        reps = runs["reference"]
        ref = statistics.median(r["tokens_per_s"] for r in reps)
        results["reference"] = {"path": os.path.abspath(args.reference), "tokens_per_s": ref,
                                "repeats_tokens_per_s": [r["tokens_per_s"] for r in reps]}
        for b in results["backends"].values():
            if "tokens_per_s" in b:
                b["ratio_to_reference"] = b["tokens_per_s"] / ref


def main():
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="results go to bench/results/NAME.json")
    p.add_argument("--backends", default="single", help=f"comma-separated: {', '.join(BACKENDS)}")
    p.add_argument("--reference", default="", help="a nanoGPT checkout to run side by side (never committed)")
    p.add_argument("--n_layer", type=int, default=4, help="transformer blocks")
    p.add_argument("--n_head", type=int, default=4, help="attention heads")
    p.add_argument("--head_width", type=int, default=64, help="width of each head")
    p.add_argument("--seq_len", type=int, default=256, help="tokens per sequence")
    p.add_argument("--batch", type=int, default=8, help="micro batch per rank")
    p.add_argument("--vocab_size", type=int, default=0,
                   help="model vocabulary (0: the byte tokenizer's 257, padded to 320)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="the trainer's --precision")
    p.add_argument("--compile", action="store_true", help="the trainer's --compile (and the reference's)")
    p.add_argument("--steps", type=int, default=40, help="steps per run")
    p.add_argument("--warmup", type=int, default=10, help="first steps left out of the median")
    p.add_argument("--log_interval", type=int, default=1, help="the trainer's --log_interval: steps per timed interval")
    p.add_argument("--counts", action="store_true", help="also count each backend's host work per step (one run)")
    p.add_argument("--repeats", type=int, default=3, help="runs per backend, interleaved across backends")
    p.add_argument("--dataset", default="stdlib", help="the trainer's --dataset (byte tokens)")
    p.add_argument("--data_dir", default="data", help="the trainer's --data_dir")
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS for every run (0: leave as is)")
    p.add_argument("--host_overhead", action="store_true",
                   help="per-step engine overhead: the tiny model above on every engine, one thread, fp32")
    args = p.parse_args()
    if args.host_overhead:
        given = {a.split("=")[0] for a in sys.argv[1:]}
        for key, value in HOST_OVERHEAD.items():
            if f"--{key}" not in given:
                setattr(args, key, value)
    check_args(args)
    args.env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}
    import torch
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    from mupgpt.data import load_data
    load_data(args.dataset, "bytes", args.data_dir)
    results = {"name": args.name, "config": {k: v for k, v in vars(args).items() if k != "env"},
               "environment": environment(), "backends": {}}
    work = Path(tempfile.mkdtemp(prefix="mupgpt-bench-"))
    try:
        runs = measure(args, results, work)
        summarise(args, results, runs)
        if args.counts:
            for backend in (b for b in runs if b != "reference"):
                try:
                    results["backends"].setdefault(backend, {})["counts"] = run_counts(backend, args,
                                                                                      work / f"{backend}_counts")
                except RuntimeError as e:
                    print(e, file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    out = ROOT / "bench" / "results" / f"{args.name}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    if args.counts:
        print(counts_table(results))
    print(f"-> {out}")


def counts_table(results):
    rows = {name: b["counts"] for name, b in results["backends"].items() if "counts" in b}
    names = sorted({k for c in rows.values() for part in c.values() for k in part})
    lines = ["| backend | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for backend, c in rows.items():
        cells = [f"{c['step'].get(k, 0):g} / {c['logged_step'].get(k, 0):g}" for k in names]
        lines.append(f"| {backend} | " + " | ".join(cells) + " |")
    return "per step, rank 0 (ordinary step / logged step):\n" + "\n".join(lines)


def table(results):
    lines = ["| backend | tokens/s | step ms | overhead ms (vs single) | MFU | peak host MiB/rank | peak device MiB "
             "| vs reference |", "|---|---|---|---|---|---|---|---|"]
    for name, b in results["backends"].items():
        if "tokens_per_s" not in b and "error" not in b:
            continue
        if "error" in b:
            lines.append(f"| {name} | failed: {b['error'].strip().splitlines()[-1][:120]} | | | | | | |")
            continue
        ratio = f"{b['ratio_to_reference']:.2f}x" if "ratio_to_reference" in b else "-"
        overhead = f"{b['overhead_ms']:+.2f} ({b['step_time_vs_single']:.2f}x)" if "overhead_ms" in b else "-"
        mfu = "-" if b["mfu"] is None else f"{100 * b['mfu']:.1f}%"
        lines.append(f"| {name} | {b['tokens_per_s']:,.0f} | {b['step_ms']:.2f} | {overhead} | {mfu} "
                     f"| {b['peak_host_mib']:,.0f} | {b['peak_device_mib']:,.0f} | {ratio} |")
    if "reference" in results:
        lines.append(f"| reference train.py | {results['reference']['tokens_per_s']:,.0f} | | | | | | 1.00x |")
    return "\n".join(lines)


if __name__ == "__main__":
    exit_on_usage_error(main)
