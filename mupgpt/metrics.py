"""What a run reports: log lines, metrics.jsonl, summary.json, optional wandb, MFU and peak memory."""
import json
import os
import resource
import sys

import torch

# dense bf16 peak FLOP/s per device, from the vendors' data sheets (no sparsity)
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "A10G": 125e12, "L4": 121e12, "V100": 125e12,
              "RTX 4090": 165e12, "RTX 3090": 71e12}


def flops_per_token(cfg):
    """6N over the matmul weights plus the attention scores and values (PaLM appendix B, as nanoGPT).

    N counts the blocks' projections and the readout; the embeddings are lookups (nanoGPT's N holds
    the token embedding once, as the readout it is tied to; here the readout is its own matrix)."""
    attn = cfg.width * (2 * cfg.width + 2 * cfg.n_kv_head * cfg.head_width)  # q, k, v and out (gpt2: 4 width^2)
    mlp = (3 if cfg.arch == "llama" else 2) * cfg.width * cfg.mlp_hidden  # SwiGLU's gate, up, down (gpt2: 8 width^2)
    n_matmul = cfg.n_layer * (attn + mlp) + cfg.vocab_size * cfg.width
    return 6 * n_matmul + 12 * cfg.n_layer * cfg.width * cfg.block_size


def duration(seconds):
    """42s, 1m23s, 1h05m: elapsed times and ETAs in step lines and sweep progress."""
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def peak_flops(device):
    """The device's peak, or 0 where none is known: then no MFU is shown. On a CPU a matmul rate timed at
    start-up stood in for the peak, but on a busy machine it came out low and MFU read 300-600%."""
    if device.type != "cuda":
        return 0.0
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
