"""FSDP2 (torch.distributed.fsdp.fully_shard) behind the Engine interface.

Each block is sharded, then the root. fully_shard turns parameters into DTensors and drops custom
attributes, so the muP groups are built after sharding from parameter names (the model's
param_rules take fan-in from the config, i.e. from global shapes). Checkpoints are
torch.distributed.checkpoint (DCP) folders for exact resume plus the consolidated model.safetensors.
"""
import functools
import os

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint

from mupgpt.engines.base import Engine, checkpoint_blocks
from mupgpt.errors import UsageError
from mupgpt.optim import clean_name, param_groups

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class FSDPEngine(Engine):
    def __init__(self, cfg, model, world, precision, total_steps, run_dir=None):
        model.to(world.device)
        if cfg.gradient_checkpointing:
            checkpoint_blocks(model, functools.partial(checkpoint, use_reentrant=False))
        # fp32 master weights; compute in bf16, gradients reduced in fp32
        mp = MixedPrecisionPolicy(param_dtype=DTYPES.get(precision), reduce_dtype=torch.float32)
        for block in model.h:
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        groups = param_groups(model, cfg.learning_rate, cfg.weight_decay, cfg.adam_eps, run_dir)
        # fused AdamW takes ShardedGradScaler's found-inf in a shape it rejects (torch 2.11, H100)
        self.fused_adamw = precision != "fp16"
        super().__init__(cfg, model, groups, world, "fp32", total_steps)  # no autocast: FSDP casts itself
        self.precision = precision
        if precision == "fp16":  # dynamic loss scaling; ranks agree on skipping a step that overflowed
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
            self.scaler = ShardedGradScaler(self.device.type)

    def no_sync(self, last):
        self.model.set_requires_gradient_sync(last)
        return super().no_sync(last)

    def clip(self):
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

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
        dcp.load(state, checkpoint_id=os.path.join(path, "dcp"))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        sched = torch.load(os.path.join(path, "scheduler.pt"), weights_only=True)
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
