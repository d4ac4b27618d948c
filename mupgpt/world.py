"""The process world: which backend, device and precision a run gets, its process group, and its exit.

Launchers (deepspeed, torchrun, none) are detected from the environment they set; init_world starts
torch.distributed when there are several ranks and pins each rank to its GPU.
"""
import os
import sys
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mupgpt.errors import UsageError


@dataclass
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self):
        return self.rank == 0

    def barrier(self):
        if self.world_size > 1:
            dist.barrier()

    def together(self, work):
        """work() on this rank, then every rank hears whether any rank's failed (a collective, so no rank
        waits in the next one for a rank that has stopped). A failed rank raises its own error; the others
        raise a UsageError with the first failed rank's line. Work for rank 0 alone is a no-op elsewhere."""
        result, error = None, None
        try:
            result = work()
        except Exception as e:
            error = e
        line = None if error is None else failure_line(error, self.rank)
        lines = [line]
        if self.world_size > 1:
            lines = [None] * self.world_size
            dist.all_gather_object(lines, line)
        if error is not None:
            raise error
        failed = [line for line in lines if line is not None]
        if failed:
            raise UsageError(failed[0])
        return result


def failure_line(error, rank):
    """What the other ranks say when a rank fails: its own line for bad input, else what failed where."""
    if isinstance(error, UsageError):
        return str(error)
    first = (str(error).splitlines() or [""])[0][:200]
    return f"rank {rank} stopped ({error.__class__.__name__}: {first}): its output says why"


def check_launcher(backend):
    # one process could run either, but a user who asks for them meant several (and forgot the launcher)
    if backend in ("ddp", "fsdp") and "RANK" not in os.environ:
        raise UsageError(f"--backend {backend} runs one process per GPU: launch it with torchrun --nproc_per_node N "
                         "run_trainer.py ... (or use --backend single for one process)")


def resolve_backend(cfg):
    backend = cfg.backend
    if backend == "auto":
        launched_by_deepspeed = (cfg.local_rank >= 0 and "LOCAL_RANK" in os.environ
                                 and "TORCHELASTIC_RUN_ID" not in os.environ)
        several = int(os.environ.get("WORLD_SIZE", "1")) > 1
        backend = "deepspeed" if launched_by_deepspeed else "ddp" if several else "single"
    else:
        check_launcher(backend)
    if backend != "deepspeed" and (cfg.offload != "none" or cfg.ds_config):
        flag = f"--offload {cfg.offload}" if cfg.offload != "none" else "--ds_config"
        raise UsageError(f"{flag} is a DeepSpeed setting but the backend is {backend}: add --backend deepspeed "
                         "(one process works) or launch with deepspeed")
    return backend


def resolve_device(cfg):
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but no GPU is visible: use --device cpu")
    return cfg.device


def resolve_precision(cfg, backend, device_type):
    if cfg.precision != "auto":
        if cfg.precision == "fp16" and device_type == "cpu" and backend == "deepspeed":
            raise UsageError(f"{backend} has no fp16 on CPU: use --precision bf16 or fp32 (fp16 needs a GPU)")
        if cfg.precision == "bf16" and device_type == "cuda" and not torch.cuda.is_bf16_supported():
            raise UsageError("this GPU has no bf16: use --precision fp16 or fp32")
        return cfg.precision
    if device_type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "bf16" if backend == "deepspeed" else "fp32"


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_environment(device_type):
    """What DeepSpeed should find when it is first imported (its accelerator is chosen then)."""
    if device_type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's choice, without its warning
        # DeepSpeed's CPU accelerator counts its devices by running `numactl --hardware` in a subprocess
        # unless LOCAL_SIZE is set (its launcher sets it; one process or torchrun do not), and ZeRO-3 asks
        # many times a step: set, the count costs nothing
        os.environ.setdefault("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1"))
    # DeepSpeed calls torch.distributed's old collective names: six FutureWarnings a run that are not the user's
    warnings.filterwarnings("ignore", category=FutureWarning, message=r"`torch\.distributed\.\w+` is deprecated")


def init_world(backend, device_type):
    """Start torch.distributed when launched with several ranks; pin each rank to its GPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if backend == "deepspeed":
        deepspeed_environment(device_type)
    check_launcher(backend)
    if backend == "single" and world_size > 1:
        raise UsageError(f"--backend single was launched with {world_size} processes: use ddp, fsdp or deepspeed")
    if backend == "deepspeed" and "RANK" not in os.environ:  # one process without a launcher
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if backend in ("ddp", "fsdp", "deepspeed") and not dist.is_initialized() and "RANK" in os.environ:
        if device_type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if backend == "deepspeed":
            import deepspeed
            deepspeed.init_distributed(dist_backend="nccl" if device_type == "cuda" else "gloo")
            if device_type == "cpu":
                unlink_shm_buffer()
        else:
            dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    if dist.is_initialized():
        global _started_process_group
        _started_process_group = True
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local) if device_type == "cuda" else torch.device("cpu")
        return World(dist.get_rank(), dist.get_world_size(), local, device)
    return World(device=torch.device(device_type))


_started_process_group = False


def unlink_shm_buffer():
    """DeepSpeed's CPU all-reduce maps a shared-memory file per rank (/dev/shm, about 69 MB each) and never
    unlinks it, so every run on another port leaves its files in RAM until /dev/shm is full. Once every rank
    has mapped every other's (the barrier), each removes its own name; the mappings last as long as the process.
    Called where DeepSpeed's comm starts: init_world, and the engine (when torch.distributed came first)."""
    if os.environ.get("LOCAL_SIZE") != os.environ.get("WORLD_SIZE"):
        return  # DeepSpeed makes the files only when every rank is on this machine
    dist.barrier()
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    if os.path.exists(name):
        os.unlink(name)


def exit_process(code=0):
    """End a process, skipping Python's finalization if it ran collectives.

    gloo's worker threads outlive destroy_process_group (a group's destructor joins them, and
    DeepSpeed keeps references to its groups), and one may still be releasing a finished
    collective's tensors. Releasing a tensor's Python object takes the GIL, which a thread cannot do
    while the interpreter finalizes: the process then aborts with "terminate called without an
    active exception" (about 1 DeepSpeed run in 15 on a 2-core CPU). Call it last: the ranks meet
    here, and the process ends without running atexit handlers."""
    if not _started_process_group:
        sys.exit(code)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
