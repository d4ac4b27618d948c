"""torch's cpp_extension builds DeepSpeed's ops under a lock file that a killed build leaves behind: find it."""
import glob
import os
import sys
import time

import torch

STALE_BUILD_S = 300


def extensions_root():
    """Where torch's cpp_extension builds DeepSpeed's ops (torch.utils.cpp_extension._get_build_directory)."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return os.environ["TORCH_EXTENSIONS_DIR"]
    from torch.utils.cpp_extension import get_default_build_root
    accel = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
    if torch.version.hip:
        accel = f"rocm{torch.version.hip.replace('.', '')}"
    python = f"py{sys.version_info.major}{sys.version_info.minor}{sys.abiflags}"
    return os.path.join(get_default_build_root(), f"{python}_{accel}")


def folder_in_use(folder):
    """Whether a process on this host has a file in the folder open or works in it (what a build does)."""
    folder = os.path.realpath(folder)
    for link in glob.glob("/proc/[0-9]*/cwd") + glob.glob("/proc/[0-9]*/fd/*"):
        try:
            target = os.readlink(link)
        except OSError:
            continue
        if target == folder or target.startswith(folder + os.sep):
            return True
    return False


def check_op_build_locks():
    """torch's cpp_extension waits, silently and forever, while an op's build folder holds a `lock` file
    (torch/utils/file_baton.py); a build killed half-way leaves one behind. Say so, and clear a stale one."""
    if os.environ.get("LOCAL_RANK", "0") != "0":
        return
    for lock in glob.glob(os.path.join(glob.escape(extensions_root()), "*", "lock")):
        try:
            age = time.time() - os.path.getmtime(lock)
        except OSError:
            continue  # gone meanwhile: a build just finished
        if age > STALE_BUILD_S and not folder_in_use(os.path.dirname(lock)):
            try:
                os.remove(lock)
                print(f"note: removed a stale DeepSpeed op build lock {lock} ({age / 60:.0f} min old and no process "
                      "uses its folder: a build was killed)", flush=True)
                continue
            except OSError:
                pass
        print(f"note: DeepSpeed's op build waits while {lock} exists ({age:.0f}s old); "
              "if no other process is building DeepSpeed's ops, delete it", flush=True)
