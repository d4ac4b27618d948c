"""What a run reports: log lines, metrics.jsonl, summary.json, optional wandb, MFU and peak memory."""
import json
import os
import resource
import sys
import time

import torch

# dense bf16 peak FLOP/s per device, from the vendors' data sheets (no sparsity)
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "A10G": 125e12, "L4": 121e12, "V100": 125e12,
              "RTX 4090": 165e12, "RTX 3090": 71e12}


def flops_per_token(cfg):
    """6N over the matmul weights plus the attention scores and values (PaLM appendix B, as nanoGPT).

    N counts the blocks' projections and the readout; the embeddings are lookups (nanoGPT's N holds
    the token embedding once, as the readout it is tied to; here the readout is its own matrix)."""
    n_matmul = cfg.n_layer * 12 * cfg.width**2 + cfg.vocab_size * cfg.width
    return 6 * n_matmul + 12 * cfg.n_layer * cfg.width * cfg.block_size


_cpu_peak = None


def measured_cpu_flops():
    """CPU has no data sheet here: the best of several timed fp32 matmuls stands in for the peak."""
    global _cpu_peak
    if _cpu_peak is None:
        a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
        a @ b
        best = 0.0
        for _ in range(8):
            t0 = time.perf_counter()
            for _ in range(3):
                a @ b
            best = max(best, 3 * 2 * 1024**3 / (time.perf_counter() - t0))
        _cpu_peak = best
    return _cpu_peak


def peak_flops(device):
    if device.type != "cuda":
        return measured_cpu_flops()
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), 0.0)


def peak_memory(device):
    host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    dev = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return {"peak_host_bytes": host, "peak_device_bytes": dev}


class Reporter:
    """Rank 0 writes metrics.jsonl and the log lines; every logged dict also goes to wandb if on."""

    def __init__(self, run_dir, cfg, is_main, resume_step):
        self.is_main, self.run = is_main, None
        self.path = os.path.join(run_dir, "metrics.jsonl")
        if is_main and os.path.exists(self.path):
            self._truncate_after(resume_step)  # rows past the checkpoint are redone (all of them from step 0)
        if is_main and cfg.wandb:
            self.run = start_wandb(run_dir, cfg)

    def _truncate_after(self, step):
        rows = [l for l in open(self.path) if l.strip() and json.loads(l)["step"] <= step]
        with open(self.path, "w") as f:
            f.writelines(rows)

    def log(self, row, line=None):
        if not self.is_main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if line:
            print(line, flush=True)
        if self.run is not None:
            self.run.log(row, step=row["step"])

    def finish(self, summary):
        if self.run is not None:
            self.run.summary.update(summary)
            self.run.finish()


def start_wandb(run_dir, cfg):
    """Online when an API key is configured; otherwise offline, so it never blocks or prompts."""
    import dataclasses
    import wandb
    netrc = os.path.expanduser("~/.netrc")
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (os.path.exists(netrc) and "api.wandb.ai" in open(netrc).read())
    mode = os.environ.get("WANDB_MODE") or ("online" if has_key else "offline")
    if mode == "offline" and "WANDB_MODE" not in os.environ:
        print("note: no wandb API key; logging offline (wandb sync later)", file=sys.stderr)
    return wandb.init(project=os.environ.get("WANDB_PROJECT", "mupgpt"), name=os.path.basename(run_dir),
                      dir=run_dir, config=dataclasses.asdict(cfg), mode=mode, reinit=True)
