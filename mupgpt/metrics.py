"""What a run reports: log lines, metrics.jsonl, summary.json, optional wandb, MFU and peak memory."""
import errno
import json
import os
import resource
import shutil
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
    """The device's peak, or 0 where none is known: then no MFU is shown. A CPU has no peak to look up,
    and a rate timed at start-up depends on what else the machine runs, so an MFU from it would mislead."""
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), 0.0)


def peak_memory(device):
    host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    dev = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return {"peak_host_bytes": host, "peak_device_bytes": dev}


def disk_error(e, path):
    """An OSError writing a run's file: a full disk (or an unwritable place) is one error line that keeps
    what was written; anything else is raised as it is."""
    from mupgpt.errors import UsageError
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return UsageError(f"the disk is full: could not write {path}; what was written before is kept: free space "
                          "and rerun with --resume auto")
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return UsageError(f"cannot write {path} ({e.strerror}): give a writable --output_dir")
    return e


def write_atomic(path, data):
    """Written beside and renamed into place: a full disk or a kill leaves the old file whole."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise disk_error(e, path) from None


class Reporter:
    """Rank 0 writes metrics.jsonl and the log lines; every logged dict also goes to wandb if on."""

    def __init__(self, run_dir, cfg, is_main, resume_step):
        self.is_main, self.run = is_main, None
        self.last = {}  # the latest loss and val_loss kept from before the resume step
        self.path = os.path.join(run_dir, "metrics.jsonl")
        if is_main and os.path.exists(self.path):
            self._truncate_after(resume_step)  # rows past the checkpoint are redone (all of them from step 0)
        if is_main and cfg.wandb:
            self.run = start_wandb(run_dir, cfg)

    def _truncate_after(self, step):
        """Keeps the rows up to `step`. A torn last line (a write cut short by a full disk or a kill) is
        dropped, saying so; other unreadable lines are dropped too, and the file as it was is kept beside as
        metrics.jsonl.damaged. A damaged file never stops the run directory from starting."""
        with open(self.path, "rb") as f:
            lines = f.read().split(b"\n")
        rows, bad = [], []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                keep = int(row["step"]) <= step
            except (ValueError, KeyError, TypeError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
                bad.append(n)
                continue
            if keep:
                rows.append(line + b"\n")
                self.last.update({k: row[k] for k in ("loss", "val_loss") if k in row})
        torn = bad == [len(lines)]  # only the last line, with no newline after it
        if bad and not torn:
            shutil.copyfile(self.path, self.path + ".damaged")
        write_atomic(self.path, b"".join(rows))
        if torn:
            print(f"note: {self.path} ended mid-record (a write cut short): dropped its torn last line", flush=True)
        elif bad:
            print(f"warning: {self.path} had unreadable lines ({', '.join(map(str, bad[:5]))}"
                  f"{', ...' if len(bad) > 5 else ''}): dropped them; the file as it was is kept as "
                  f"{self.path}.damaged", flush=True)

    def log(self, row, line=None):
        if not self.is_main:
            return
        data = (json.dumps(row) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        size = os.fstat(fd).st_size
        try:
            while data:
                data = data[os.write(fd, data):]
        except OSError as e:
            os.ftruncate(fd, size)  # no torn record: the file ends with the last whole row
            raise disk_error(e, self.path) from None
        finally:
            os.close(fd)
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
