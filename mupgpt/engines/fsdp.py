"""FSDP2 (torch.distributed.fsdp.fully_shard) behind the Engine interface.

Consecutive blocks are sharded in groups (block_groups), then the root. fully_shard turns parameters into
DTensors and drops custom attributes, so the muP groups are built after sharding from parameter names (the model's
param_rules take fan-in from the config, i.e. from global shapes). Checkpoints are
torch.distributed.checkpoint (DCP) folders for exact resume plus the consolidated model.safetensors.
With --shard_group_size K below the world size the mesh is 2-D, (replicate, shard) = (world / K, K): each
group of K consecutive ranks shards the model and the groups hold replicas (hybrid sharding, HSDP).
"""
import contextlib
import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from mupgpt.engines.base import HALF_DTYPES, Engine, check_fits
from mupgpt.optim import clean_name
from mupgpt.safe_load import load_dcp, safe_load


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


# the most a group of blocks may hold gathered at once when grouping puts more than one block in it
GROUP_GATHER_BYTES = 2**28


def gathered_bytes(numel, half):
    """What a gathered block of numel parameters holds: each weight in the compute precision, its gradient and
    that gradient's fp32 copy for the reduce-scatter (fp32: the weight and its gradient)."""
    return numel * (2 + 2 + 4 if half else 8)


def blocks_per_group(block_bytes):
    """The memory rule for FSDP2's groups: consecutive blocks go two to a fully_shard call when the pair's
    gathered bytes are at most GROUP_GATHER_BYTES, else one. A group runs its pre- and post-forward and pre-
    and post-backward hooks, an unshard and a reshard each way and a reduce-scatter every step, whatever its
    size, so pairs halve that host work; FSDP2 then holds up to two groups gathered (one computing, the next
    prefetched), four blocks instead of two, which the rule bounds to 2 x GROUP_GATHER_BYTES."""
    return 2 if 2 * block_bytes <= GROUP_GATHER_BYTES else 1


def block_groups(blocks, block_bytes):
    k = blocks_per_group(block_bytes)
    return [list(blocks[i:i + k]) for i in range(0, len(blocks), k)]


def reshard_after_forward(index, n_groups, shard_ranks):
    """Whether a group frees its gathered parameters after forward, to gather them again in backward.

    On one rank of a shard group a block's shard is the whole block and a second gather saves nothing. The last
    group's backward starts right after its forward, so it keeps them (as FSDP2 keeps the root's)."""
    return shard_ranks > 1 and index < n_groups - 1


def hybrid_mesh(device_type, world_size, group_size):
    """The 2-D (replicate, shard) mesh of hybrid sharding, or None for FSDP2's own 1-D mesh over every rank
    (group size 0 or the whole world). Shard groups are consecutive ranks, so on nodes of K GPUs the gathers
    and reduce-scatters stay inside a node and only the replicas' all-reduce crosses nodes."""
    if group_size in (0, world_size):
        return None
    return init_device_mesh(device_type, (world_size // group_size, group_size),
                            mesh_dim_names=("replicate", "shard"))


class FSDPEngine(Engine):
    def __init__(self, cfg, model, world, precision, total_steps, run_dir=None, ds_config=None):
        super().__init__(cfg, model, world, precision, total_steps, run_dir, ds_config)
        model.to(self.device)
        self.checkpoint_activations()
        # fp32 master weights; compute in the run's precision, gradients reduced in fp32
        mp = MixedPrecisionPolicy(param_dtype=HALF_DTYPES.get(precision), reduce_dtype=torch.float32)
        self.mesh = hybrid_mesh(self.device.type, world.world_size, cfg.shard_group_size)
        shard_ranks = world.world_size if self.mesh is None else self.mesh["shard"].size()
        block_bytes = gathered_bytes(sum(p.numel() for p in model.h[0].parameters()), precision in HALF_DTYPES)
        groups = block_groups(model.h, block_bytes)
        for i, blocks in enumerate(groups):
            fully_shard(blocks, mesh=self.mesh, mp_policy=mp,
                        reshard_after_forward=reshard_after_forward(i, len(groups), shard_ranks))
        fully_shard(model, mesh=self.mesh, mp_policy=mp)  # the root keeps its parameters gathered to backward
        groups = self.param_groups()  # after sharding (the DTensors), before compiling (the bare names)
        self.forward_model = self.compiled(model) if cfg.compile else model
        # fp16 steps the DTensor optimizer through ShardedGradScaler, whose found-inf tensor fused AdamW
        # rejects: that optimizer is the unfused one, and the local-shard step serves the other precisions
        fused = precision != "fp16"
        self.start_optimizer(groups, fused=fused)
        if precision == "fp16":  # dynamic loss scaling; ranks agree on skipping a step that overflowed
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
            self.scaler = ShardedGradScaler(self.device.type)
        else:
            self.scaler = torch.amp.GradScaler(self.device.type, enabled=False)
        # the twin is an AdamW: under Muon the optimizer itself steps the DTensors (mupgpt/muon.py)
        self.local_step = LocalShardStep(self.optimizer) if fused and cfg.optimizer != "muon" else None

    def autocast(self):
        """None: FSDP2 casts the parameters to the compute dtype itself (the MixedPrecisionPolicy)."""
        return contextlib.nullcontext()

    def step_optimizer(self):
        if self.local_step is None:  # fp16: the sharded scaler steps (or skips) the DTensor optimizer
            return super().step_optimizer()
        self.local_step.step()

    def compiled(self, model):
        """Each block on its own and the head (final norm, readout, loss), as torchtitan compiles under FSDP2:
        torch.compile(model) breaks the graph at FSDP2's hooks in GPT.forward's loop over the blocks and gives
        up on that frame, so what runs compiled would rest on dynamo's fallback. The head is compiled too: run
        eagerly, its loss takes more of the GPU's time per step (bench/RESULTS.md)."""
        for block in model.h:
            block.compile()  # in place: parameter names stay bare
        model.head = torch.compile(model.head)
        return model

    def no_sync(self, last):
        self.model.set_requires_gradient_sync(last)
        return super().no_sync(last)

    @torch.no_grad()  # to_local() is an autograd op: without grad mode it records nothing
    def clip(self):
        """The global grad norm from each rank's local shards (one all-reduce of a scalar) and the clip
        applied to them: clip_grad_norm_ on the DTensors themselves dispatches every op per parameter, a
        host cost that grows with the number of parameters (bench/RESULTS.md). Under hybrid sharding the
        sum runs over one shard group: the other groups hold the same gradients."""
        grads = [p.grad.to_local() for p in self.model.parameters() if p.grad is not None]
        squares = torch.nn.utils.get_total_norm(grads).square()
        if self.mesh is not None:
            dist.all_reduce(squares, group=self.mesh.get_group("shard"))
        elif self.world.world_size > 1:
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
        load_dcp(state, os.path.join(path, "dcp"))
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
        check_fits(names, state)
        full = {names[k]: v for k, v in state.items()}
        set_model_state_dict(self.model, full, options=StateDictOptions(full_state_dict=True))
