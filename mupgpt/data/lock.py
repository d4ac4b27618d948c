"""The lock around preparing a folder, and the clean-up of the folders a killed preparation leaves."""
import fcntl
import glob
import os
import shutil
import socket
from contextlib import contextmanager

from mupgpt.data.prepared import check_data_dir
from mupgpt.errors import UsageError


@contextmanager
def preparing(out_dir):
    """Hold out_dir.lock while preparing: a second process waits (and says so) rather than preparing the
    same folder again. Yields whether it waited. Where the filesystem has no locks, prepare()'s own
    folder and rename still keep the result whole."""
    check_data_dir(os.path.dirname(out_dir) or ".")
    try:
        os.makedirs(os.path.dirname(out_dir) or ".", exist_ok=True)
    except OSError as e:
        raise UsageError(f"can't make the folder {os.path.dirname(out_dir)} ({e.strerror}): give another "
                         "--data_dir") from None
    with open(out_dir + ".lock", "a") as f:
        waited = False
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process preparing {out_dir} (it holds {out_dir}.lock)", flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
            waited = True
        except OSError:
            yield waited  # no locks here (some network filesystems): another process's folders may be live
            return
        clear_stale(out_dir)
        yield waited


def owner():
    """host-pid: what a later preparation checks before it removes a folder this one leaves."""
    return f"{socket.gethostname()}-{os.getpid()}"


def _dead_here(folder, prefix):
    """Whether `folder` (PREFIX + HOST-PID-HEX) was made on this host by a process that has ended. A lock may
    be this host's alone (some network filesystems), so another host's folders are never judged."""
    parts = folder[len(prefix):].rsplit("-", 2)
    if len(parts) != 3 or parts[0] != socket.gethostname() or not parts[1].isdigit():
        return False
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's
        pass
    return False


def clear_stale(out_dir):
    """With out_dir.lock held, a .tmp-* or .old-* folder of out_dir made on this host by an ended process is a
    killed preparation's: remove it (an .old-* is the previous copy, put back if it was not replaced)."""
    tmp, old = out_dir + ".tmp-", out_dir + ".old-"
    for folder in glob.glob(glob.escape(tmp) + "*"):
        if _dead_here(folder, tmp):
            shutil.rmtree(folder, ignore_errors=True)
            print(f"note: removed {folder}, left by a preparation that was killed", flush=True)
    olds = [f for f in glob.glob(glob.escape(old) + "*") if _dead_here(f, old)]
    for folder in sorted(olds, key=os.path.getmtime):
        if not os.path.exists(out_dir) and os.path.exists(os.path.join(folder, "meta.json")):
            os.rename(folder, out_dir)
            print(f"note: put back {out_dir} from {folder}, moved aside by a preparation that was killed", flush=True)
        else:
            shutil.rmtree(folder, ignore_errors=True)

