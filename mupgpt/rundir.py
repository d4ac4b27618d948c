"""The run directory: a plain folder name inside --output_dir, held by one live run at a time."""
import contextlib
import fcntl
import os
import re
import socket

import torch

from mupgpt.errors import UsageError


def run_directory(cfg):
    """<output_dir>/<run name>; a name that could point anywhere else is refused."""
    name = cfg.name
    if not re.fullmatch(r"[A-Za-z0-9._=+-]+", name) or ".." in name or name == ".":
        raise UsageError(f"--run_name {name!r} is not a plain folder name: use only letters, digits and . _ = + - "
                         "(no '/', no '..'); the run directory is always inside --output_dir")
    return os.path.join(cfg.output_dir, name)


@contextlib.contextmanager
def run_lock(run_dir, world):
    """Rank 0 holds an exclusive flock on <run_dir>/.lock for the whole run (the kernel drops it at exit).

    A run refused with a UsageError before it wrote anything leaves no run directory behind."""
    fd, held_by = None, ""
    created = not os.path.exists(run_dir)
    if world.is_main:
        os.makedirs(run_dir, exist_ok=True)
        fd = os.open(os.path.join(run_dir, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        except BlockingIOError:
            held_by = os.read(fd, 200).decode(errors="replace").strip() or "pid unknown"
            os.close(fd)
            fd = None
    if world.world_size > 1:
        msg = [held_by]
        torch.distributed.broadcast_object_list(msg, src=0)
        held_by = msg[0]
    if held_by:
        raise UsageError(f"{run_dir} is in use by another run ({held_by}): wait for it or pick another --run_name")
    try:
        yield
    except UsageError:
        # refused before the run wrote anything (e.g. --vocab_size too small): leave no empty run directory
        if fd is not None and created and os.listdir(run_dir) == [".lock"]:
            os.remove(os.path.join(run_dir, ".lock"))
            os.rmdir(run_dir)
        raise
    finally:
        if fd is not None:
            os.close(fd)
