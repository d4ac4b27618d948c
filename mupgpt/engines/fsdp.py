"""FSDP2 (torch.distributed.fsdp.fully_shard) behind the Engine interface.

Each block is sharded, then the root. fully_shard turns parameters into DTensors and drops custom
attributes, so the muP groups are built after sharding from parameter names (the model's
param_rules take fan-in from the config, i.e. from global shapes). Checkpoints are
torch.distributed.checkpoint (DCP) folders for exact resume plus the consolidated model.safetensors.
"""
import functools
import io
import os
import pickle

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from mupgpt.engines.base import Engine, checkpoint_blocks, safe_load, untrusted
from mupgpt.errors import UsageError
from mupgpt.optim import clean_name, muon_settings, param_groups

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
METADATA_TYPES = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
                  ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath")}


class MetadataUnpickler(pickle.Unpickler):
    """DCP's .metadata is a pickle: only its own dataclasses, sizes, dtypes and paths may come out of it."""

    def find_class(self, module, name):
        value = getattr(__import__(module, fromlist=[name]), name, None) if module.startswith(("torch", "pathlib")) else None
        if ((module, name) in METADATA_TYPES or isinstance(value, torch.dtype)
                or (module == "torch.distributed.checkpoint.metadata" and isinstance(value, type))):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name}")


class SafeReader(dcp.FileSystemReader):
    def __init__(self, path):
        super().__init__(path)
        self.metadata = None

    def read_metadata(self, *args, **kwargs):
        if self.metadata is None:
            path = self._get_metadata_path(kwargs.get("rank"))
            try:
                with open(path, "rb") as f:
                    self.metadata = MetadataUnpickler(f).load()
            except pickle.UnpicklingError as e:
                raise untrusted(path, e) from None
            except (OSError, EOFError, ValueError, AttributeError, TypeError) as e:
                raise UsageError(f"{path} is damaged ({e}): resume from an earlier checkpoint") from None
            if getattr(self.metadata, "storage_meta", None) is None:
                from torch.distributed.checkpoint.metadata import StorageMeta
                self.metadata.storage_meta = StorageMeta()
        self.metadata.storage_meta.load_id = self.load_id
        return self.metadata


class SafePlanner(dcp.DefaultLoadPlanner):
    """Non-tensor values (LRs, betas) are torch-saved bytes that DCP loads with weights_only=False."""

    def __init__(self, dcp_dir):
        super().__init__()
        self.dcp_dir, self.refused = dcp_dir, None

    def load_bytes(self, read_item, value):
        try:
            value = safe_load(value, "cpu", name=f"{self.dcp_dir} (value {read_item.dest_index.fqn})")
        except UsageError as e:
            self.refused = e  # DCP wraps what its steps raise: load() raises this one instead
            raise
        checked = io.BytesIO()
        torch.save(value, checked)
        checked.seek(0)
        super().load_bytes(read_item, checked)


class LocalShardStep:
    """The optimizer's arithmetic on each rank's local shards, its bookkeeping on the DTensors.

    FSDP2's parameters are DTensors, and torch's fused AdamW dispatched on DTensors spends most of its
    host time propagating shardings, per group and step. So a twin AdamW over the same storage (each
    parameter's local shard and its moments' local shards) does the step, while the optimizer the
    engine hands out keeps the DTensor parameters and state: its state_dict, the checkpoints and the
    schedule see exactly what they see without the twin. The twin takes each group's hyperparameters
    from it at every step."""

    def __init__(self, optimizer):
        self.optimizer, self.twin, self.pairs, self.shared = optimizer, None, [], False

    def reset(self):
        """After the optimizer's state was replaced (a checkpoint load): share the new state."""
        self.twin, self.shared = None, False

    def _build(self):
        groups, self.pairs = [], []
        for group in self.optimizer.param_groups:
            local = [torch.nn.Parameter(p.to_local(), requires_grad=False) for p in group["params"]]
            self.pairs += list(zip(group["params"], local))
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": local})
        self.twin = torch.optim.AdamW(groups, fused=True)
        for p, q in self.pairs:
            if p in self.optimizer.state:
                self.twin.state[q] = {k: v.to_local() if isinstance(v, DTensor) else v
                                      for k, v in self.optimizer.state[p].items()}
        self.shared = all(p in self.optimizer.state for p, _ in self.pairs)

    def _share_new_state(self):
        """The moments the twin's first step made, as DTensors over the same storage in the optimizer."""
        for p, q in self.pairs:
            if p not in self.optimizer.state and q in self.twin.state:
                self.optimizer.state[p] = {
                    k: DTensor.from_local(v, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                          stride=p.stride()) if v.shape == q.shape and v.dim() else v
                    for k, v in self.twin.state[q].items()}
        self.shared = all(p in self.optimizer.state for p, _ in self.pairs)

    @torch.no_grad()
    def step(self):
        if self.twin is None:
            self._build()
        for group, twin in zip(self.optimizer.param_groups, self.twin.param_groups):
            twin.update({k: v for k, v in group.items() if k != "params"})
        for p, q in self.pairs:
            q.grad = None if p.grad is None else p.grad.to_local()
        self.twin.step()
        self.twin.zero_grad(set_to_none=True)  # the gradients stay FSDP2's to free
        if not self.shared:
            self._share_new_state()


def reshard_after_forward(index, n_blocks, world):
    """Whether a block frees its gathered parameters after forward, to gather them again in backward.

    On one rank a block's shard is the whole block and a second gather saves nothing. The last block's
    backward starts right after its forward, so it keeps them (as FSDP2 keeps the root's)."""
    return world.world_size > 1 and index < n_blocks - 1


class FSDPEngine(Engine):
    def __init__(self, cfg, model, world, precision, total_steps, run_dir=None):
        model.to(world.device)
        if cfg.gradient_checkpointing:
            checkpoint_blocks(model, functools.partial(checkpoint, use_reentrant=False))
        # fp32 master weights; compute in bf16, gradients reduced in fp32
        mp = MixedPrecisionPolicy(param_dtype=DTYPES.get(precision), reduce_dtype=torch.float32)
        for i, block in enumerate(model.h):
            fully_shard(block, mp_policy=mp, reshard_after_forward=reshard_after_forward(i, len(model.h), world))
        fully_shard(model, mp_policy=mp)  # the root keeps its parameters gathered from forward to backward
        groups = param_groups(model, cfg.learning_rate, cfg.weight_decay, cfg.adam_eps, run_dir, muon_settings(cfg))
        # fused AdamW takes ShardedGradScaler's found-inf in a shape it rejects (torch 2.11, H100)
        self.fused_adamw = precision != "fp16"
        super().__init__(cfg, model, groups, world, "fp32", total_steps)  # no autocast: FSDP casts itself
        self.precision = precision
        if precision == "fp16":  # dynamic loss scaling; ranks agree on skipping a step that overflowed
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
            self.scaler = ShardedGradScaler(self.device.type)
        # the twin is an AdamW: under Muon the optimizer itself steps the DTensors (mupgpt/muon.py)
        self.local_step = LocalShardStep(self.optimizer) if self.fused_adamw and cfg.optimizer != "muon" else None

    def step_optimizer(self):
        if self.local_step is None:  # fp16: the sharded scaler steps (or skips) the DTensor optimizer
            return super().step_optimizer()
        self.local_step.step()

    def compiled(self, model):
        """Each block on its own and the head (final norm, readout, loss), as torchtitan compiles under FSDP2:
        torch.compile(model) breaks the graph at FSDP2's hooks in GPT.forward's loop over the blocks and gives
        up on that frame, so what runs compiled would rest on dynamo's fallback. When the loss ran eagerly
        this way, compiling it cut the GPU's busy time per step from 43.0 to 32.6 ms on an H200 (GPT-2 124M,
        bench/RESULTS.md)."""
        for block in model.h:
            block.compile()  # in place: parameter names stay bare
        model.head = torch.compile(model.head)
        return model

    def no_sync(self, last):
        self.model.set_requires_gradient_sync(last)
        return super().no_sync(last)

    @torch.no_grad()  # to_local() is an autograd op: 0.75 ms for 149 parameters with grad mode on, 0.05 without
    def clip(self):
        """The global grad norm from each rank's local shards (one all-reduce of a scalar) and the clip
        applied to them: clip_grad_norm_ on the DTensors themselves dispatched every op per parameter and
        took 2.0-2.8 ms a step on the bench's tiny model (149 parameters, CPU), this 0.8 ms."""
        grads = [p.grad.to_local() for p in self.model.parameters() if p.grad is not None]
        squares = torch.nn.utils.get_total_norm(grads).square()
        if self.world.world_size > 1:
            dist.all_reduce(squares)
        norm = squares.sqrt()
        if self.grad_clip > 0:
            torch._foreach_mul_(grads, torch.clamp(self.grad_clip / (norm + 1e-6), max=1.0))
        return norm

    def save(self, path):
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=os.path.join(path, "dcp"))
        if self.is_main:
            torch.save({"scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()},
                       os.path.join(path, "scheduler.pt"))
        self.save_consolidated(path)

    def load(self, path):
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        state = {"model": model_state, "optimizer": optim_state}
        planner = SafePlanner(os.path.join(path, "dcp"))
        reader = SafeReader(planner.dcp_dir)
        reader.read_metadata()  # refused here, before DCP's own fallbacks and wrapping
        try:
            dcp.load(state, storage_reader=reader, planner=planner)
        except CheckpointException:  # a BaseException
            if planner.refused:
                raise planner.refused from None
            raise
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        if self.local_step is not None:
            self.local_step.reset()
        sched = safe_load(os.path.join(path, "scheduler.pt"))
        self.scheduler.load_state_dict(sched["scheduler"])
        if "scaler" in sched:
            self.scaler.load_state_dict(sched["scaler"])
        self.load_rng(path)

    def full_state_dict(self):
        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {clean_name(k): v.contiguous() for k, v in state.items()}

    def load_model(self, state):
        names = {clean_name(n): n for n in get_model_state_dict(self.model)}
        missing = sorted(set(names) - set(state))
        if missing:
            raise UsageError(f"checkpoint does not fit this model (missing {missing[:3]}): use the same model flags")
        full = {names[k]: v for k, v in state.items() if k in names}
        set_model_state_dict(self.model, full, options=StateDictOptions(full_state_dict=True))
