"""The run directory: a plain folder name inside --output_dir, held by one live run at a time."""
import contextlib
import errno
import fcntl
import json
import os
import re
import socket

from mupgpt.errors import UsageError


def run_directory(cfg, backend):
    """<output_dir>/<run name>; a name that could point anywhere else is refused."""
    name = cfg.run_dir_name(backend)
    if not re.fullmatch(r"[A-Za-z0-9._=+-]+", name) or ".." in name or name == ".":
        raise UsageError(f"--run_name {name!r} is not a plain folder name: use only letters, digits and . _ = + - "
                         "(no '/', no '..'); the run directory is always inside --output_dir")
    run_dir = os.path.join(cfg.output_dir, name)
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise UsageError(f"{run_dir} is a file, not a run directory: pass another --run_name or --output_dir")
    # the run directory is created later (under the lock): a place it cannot be made fails here, before anything
    existing = os.path.abspath(run_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f"--output_dir {cfg.output_dir}: {existing} is a file, so {run_dir} cannot be created: "
                         "give a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--output_dir {cfg.output_dir}: {existing} is not writable, so {run_dir} cannot be "
                         "written: give a writable --output_dir")
    return run_dir


def read_summary(run_dir):
    """summary.json as a dict ({} when absent or unreadable)."""
    try:
        with open(os.path.join(run_dir, "summary.json")) as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}


def refuse_a_branch(run_dir, resume_path, step, later):
    """A resume from an earlier checkpoint of this run directory would start a second history in it:
    keep-last-K would remove the branch's checkpoints for the old ones and --resume auto would follow the
    old branch. A branch goes into its own run directory."""
    if later > step:
        raise UsageError(f"--resume {resume_path} is step {step} of {run_dir}, which already went on to step {later}: "
                         "to branch from it, keep --resume and pass a new --run_name or --output_dir (a run "
                         "directory holds one history)")


def refuse_a_second_run(run_dir, has_checkpoints):
    """A new run (no --resume) in a directory that holds one: say what is there and what to do."""
    summary_path = os.path.join(run_dir, "summary.json")
    if os.path.exists(summary_path):
        try:
            with open(summary_path) as f:
                summary = json.load(f)
        except (OSError, ValueError):
            summary = {}
        if summary.get("completed"):
            raise UsageError(f"{run_dir} already holds a finished run ({summary.get('steps')} steps): pick another "
                             "--run_name or --output_dir (--resume auto would only reload it)")
        if summary.get("diverged"):
            raise UsageError(f"{run_dir} holds a run that diverged at step {summary.get('steps')}: pick another "
                             "--run_name, or resume its last good checkpoint with --resume PATH and a lower "
                             "--learning_rate")
    if has_checkpoints or os.path.exists(summary_path):
        raise UsageError(f"{run_dir} already holds an unfinished run: pass --resume auto to continue it, "
                         "or another --run_name")


# what a start writes before training: a start that fails before more leaves no run directory behind
START_FILES = {".lock", "opt_config.json", "config.json", "ds_config.json"}


@contextlib.contextmanager
def run_lock(run_dir, world):
    """Rank 0 holds an exclusive flock on <run_dir>/.lock for the whole run (the kernel drops it at exit).

    A run refused or failed before it trained leaves no run directory behind when it created it."""
    created = not os.path.exists(run_dir)
    fd = world.together(lambda: _lock(run_dir, created) if world.is_main else None)
    try:
        yield
    except BaseException:
        # refused or failed before the run trained (a bad flag, a model too large, a full disk): leave no
        # run directory that holds only what this start wrote
        if fd is not None:
            _remove_start(run_dir, created)
        raise
    finally:
        if fd is not None:
            os.close(fd)


def _lock(run_dir, created):
    """The lock's fd; a run directory that is locked, or cannot be made or written, is one line."""
    try:
        os.makedirs(run_dir, exist_ok=True)
        fd = os.open(os.path.join(run_dir, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        _remove_start(run_dir, created)
        raise UsageError(f"cannot create the run directory {run_dir} ({e.strerror}"
                         f"{': ' + e.filename if e.filename and e.filename != run_dir else ''}): "
                         + ("free space or give another --output_dir" if e.errno in (errno.ENOSPC, errno.EDQUOT)
                            else "give a writable --output_dir")) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    except BlockingIOError:
        held_by = os.read(fd, 200).decode(errors="replace").strip() or "pid unknown"
        os.close(fd)
        raise UsageError(f"{run_dir} is in use by another run ({held_by}): wait for it or pick another --run_name")
    except OSError as e:
        os.close(fd)
        _remove_start(run_dir, created)
        raise UsageError(f"cannot write {run_dir}/.lock ({e.strerror}): "
                         + ("free space or give another --output_dir" if e.errno in (errno.ENOSPC, errno.EDQUOT)
                            else "give a writable --output_dir")) from None
    return fd


def _remove_start(run_dir, created):
    try:
        if created and os.path.isdir(run_dir) and set(os.listdir(run_dir)) <= START_FILES:
            for name in os.listdir(run_dir):
                os.remove(os.path.join(run_dir, name))
            os.rmdir(run_dir)
    except OSError:
        pass
