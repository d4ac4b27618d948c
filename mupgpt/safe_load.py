"""Loading a checkpoint runs no code from it: tensors and plain data only.

A checkpoint is untrusted input (it may come from another machine or person), and Python's pickle,
which torch.save, DCP's metadata and DeepSpeed's files use, can run any code while loading. So every
file the trainer reads back goes through one of these loaders, each of which lets out tensors, plain
data (numbers, strings, lists, dicts) and a short, named list of library types, and refuses the rest
with one error line before anything is built from it:

    load_weights   safetensors files (the format holds tensors only)
    safe_load      torch.load with weights_only=True, plus the types a caller names
    safe_ds_load   DeepSpeed's ZeRO files: safe_load with the DeepSpeed types they hold
    load_dcp       torch.distributed.checkpoint folders: the pickled metadata through an unpickler that
                   knows DCP's own types only, and each non-tensor value through safe_load

A damaged file is refused in one line too, naming it.
"""
import functools
import io
import pickle
import re

import torch
from safetensors.torch import load_file

from mupgpt.errors import UsageError

# the types DCP's .metadata pickle holds besides those of torch.distributed.checkpoint.metadata and dtypes
METADATA_TYPES = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
                  ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath")}


def untrusted(path, e):
    """A checkpoint file that holds Python objects beyond tensors and plain data is refused, never run."""
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
    what = found.group(1) if found else str(e).splitlines()[0][:200]
    return UsageError(f"{path} holds a Python object that is not tensors or plain data ({what}); it was not loaded "
                      "(a checkpoint is untrusted input): resume from a checkpoint this trainer wrote")


def damaged(path, e):
    return UsageError(f"{path} is damaged ({str(e).splitlines()[0][:200]}): resume from an earlier checkpoint")


def safe_load(path, map_location=None, allowed=(), name=None):
    """torch.load of tensors and plain data only (weights_only), plus the few types in `allowed`."""
    name = name or path
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise untrusted(name, e) from None
    except (RuntimeError, EOFError, ValueError) as e:
        raise damaged(name, e) from None


def load_weights(path, device="cpu"):
    """A safetensors file (no code can be in one); a damaged one is one error line."""
    try:
        return load_file(path, device=str(device))
    except Exception as e:
        raise damaged(path, e) from None


def safe_ds_load(path, map_location=None):
    """DeepSpeed's checkpoint engine loads with torch.load(weights_only=False), which would run a planted
    object: the engine's load is replaced by this. Its ZeRO-0/1/2/3 (and offload) files need tensors,
    plain data and these types only."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return safe_load(path, map_location, allowed=[LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address])


class MetadataUnpickler(pickle.Unpickler):
    """DCP's .metadata is a pickle: only its own dataclasses, sizes, dtypes and paths may come out of it."""

    def find_class(self, module, name):
        known = module.startswith(("torch", "pathlib"))
        value = getattr(__import__(module, fromlist=[name]), name, None) if known else None
        if ((module, name) in METADATA_TYPES or isinstance(value, torch.dtype)
                or (module == "torch.distributed.checkpoint.metadata" and isinstance(value, type))):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name}")


def read_dcp_metadata(path):
    """A DCP folder's .metadata file through MetadataUnpickler."""
    try:
        with open(path, "rb") as f:
            metadata = MetadataUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise untrusted(path, e) from None
    except (OSError, EOFError, ValueError, AttributeError, TypeError) as e:
        raise UsageError(f"{path} is damaged ({e}): resume from an earlier checkpoint") from None
    if getattr(metadata, "storage_meta", None) is None:
        from torch.distributed.checkpoint.metadata import StorageMeta
        metadata.storage_meta = StorageMeta()
    return metadata


@functools.cache
def dcp_loaders():
    """(SafeReader, SafePlanner): DCP's reader and planner with the checks above. Made on first use, so
    that importing this module does not import torch.distributed.checkpoint."""
    import torch.distributed.checkpoint as dcp

    class SafeReader(dcp.FileSystemReader):
        """Reads .metadata through read_dcp_metadata instead of pickle.load."""

        def __init__(self, path):
            super().__init__(path)
            self.metadata = None

        def read_metadata(self, *args, **kwargs):
            if self.metadata is None:
                self.metadata = read_dcp_metadata(self._get_metadata_path(kwargs.get("rank")))
            self.metadata.storage_meta.load_id = self.load_id
            return self.metadata

    class SafePlanner(dcp.DefaultLoadPlanner):
        """Non-tensor values (LRs, betas) are torch-saved bytes that DCP loads with weights_only=False:
        each goes through safe_load first, and DCP gets it back re-saved."""

        def __init__(self, dcp_dir):
            super().__init__()
            self.dcp_dir, self.refused = dcp_dir, None

        def load_bytes(self, read_item, value):
            try:
                value = safe_load(value, "cpu", name=f"{self.dcp_dir} (value {read_item.dest_index.fqn})")
            except UsageError as e:
                self.refused = e  # DCP wraps what its steps raise: load_dcp raises this one instead
                raise
            checked = io.BytesIO()
            torch.save(value, checked)
            checked.seek(0)
            super().load_bytes(read_item, checked)

    return SafeReader, SafePlanner


def load_dcp(state, dcp_dir):
    """dcp.load of the folder `dcp_dir` into `state`, in place, with its metadata and values checked."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    reader_type, planner_type = dcp_loaders()
    planner, reader = planner_type(dcp_dir), reader_type(dcp_dir)
    reader.read_metadata()  # refused here, before DCP's own fallbacks and wrapping
    try:
        dcp.load(state, storage_reader=reader, planner=planner)
    except CheckpointException:  # a BaseException
        if planner.refused:
            raise planner.refused from None
        raise
