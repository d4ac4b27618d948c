"""Muon under DeepSpeed ZeRO-0/1/2/3: each hidden matrix's whole gradient orthogonalized once a step, by one rank.

DeepSpeed 0.19.8 ships a ZeRO Muon (deepspeed/runtime/zero/muon) that is not one process's Muon: it
clips by the norm of the orthogonalized updates instead of the gradient's, multiplies each update by its
own shape factor sqrt(max(1, rows / cols)) on top of the rules table's, and under ZeRO-1/2 orthogonalizes
the fused q, k, v as one matrix. So DeepSpeed runs plain ZeRO here, with an optimizer whose Muon groups
only apply a given update (MuonWithAdamW(given_updates=True)), and ZeroMuon runs Muon itself between the
last backward of a step and DeepSpeed's step, through DeepSpeed's public gradient API (safe_get_full_grad,
safe_set_full_grad):
1. The gradient norm, the same on every rank (norm_and_own_grads), clips every gradient as clip_grad_norm_
   does; DeepSpeed's own clipping is off (deepspeed_config), since it would clip by the norm of what it
   is handed.
2. Muon parameter i belongs to rank i mod world size: that rank alone keeps its momentum and runs its
   Newton-Schulz (memory and work split by parameter, as torchtitan's distributed Muon does), then
   broadcasts the update, and every rank writes its own shard of it where DeepSpeed keeps the gradient.
The momentum is saved by name, a file per rank; on resume each rank takes the names it owns from
whichever file holds them.
"""
import glob
import os

import torch
import torch.distributed as dist

from mupgpt.errors import UsageError
from mupgpt.muon import muon_update
from mupgpt.optim import clean_name
from mupgpt.safe_load import safe_load

CLIP_EPS = 1e-6  # clip_grad_norm_'s: max_norm / (norm + 1e-6)


def momentum_file(path, rank):
    return os.path.join(path, f"muon_momentum_rank{rank}.pt")


class ZeroMuon:
    def __init__(self, model, groups, grad_clip, device):
        """groups: the client optimizer's param groups before deepspeed.initialize (their params are the
        model's then; DeepSpeed swaps in its flat partitions after)."""
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        muon_group = {id(p): g for g in groups if g["name"] == "muon" for p in g["params"]}
        named = [(clean_name(n), p) for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        self.muon = [(i % self.world_size, name, p, muon_group[id(p)])
                     for i, (name, p) in enumerate([(n, p) for n, p in named if id(p) in muon_group])]
        self.is_muon = {id(p) for _, _, p, _ in self.muon}
        self.mine = {id(p) for owner, _, p, _ in self.muon if owner == self.rank}
        self.momentum = {}  # name -> fp32 buffer, for the Muon parameters this rank owns
        self.grad_clip, self.device = grad_clip, device

    @torch.no_grad()
    def prepare(self):
        """Between a step's last backward and DeepSpeed's step: the gradient norm (returned, before clipping),
        every gradient clipped by it, and each Muon gradient replaced by its update. Every rank calls it."""
        norm, grads = self.norm_and_own_grads()
        scale = min(1.0, self.grad_clip / (norm.item() + CLIP_EPS)) if self.grad_clip > 0 else 1.0
        if scale < 1.0:
            for p in self.params:
                if id(p) not in self.is_muon:  # the Muon gradients are scaled below, then replaced
                    scale_grad(p, scale)
        updates = {}  # all of this rank's first, so the owners' Newton-Schulz runs at the same time
        for owner, name, p, group in self.muon:
            if owner == self.rank:
                grad = grads.pop(id(p)) * scale
                if name not in self.momentum:
                    self.momentum[name] = torch.zeros_like(grad)
                updates[id(p)] = muon_update(grad, self.momentum[name], group).contiguous()  # to broadcast
        for owner, _, p, _ in self.muon:
            update = updates.pop(id(p), None)
            if update is None:
                update = torch.empty(shape(p), dtype=torch.float32, device=self.device)
            dist.broadcast(update, src=owner)
            set_grad(p, update)
        return norm

    def norm_and_own_grads(self):
        """The whole gradient's norm (the same on every rank) and the whole gradients of this rank's Muon
        parameters. Each Muon gradient is gathered whole once and let go at once on the ranks that do not
        own it; the others are too, except under ZeRO-3, where each rank sums the squares of its own
        shards and one all-reduce adds them up, so the norm adds no gathers there."""
        whole = torch.zeros((), dtype=torch.float64, device=self.device)
        shards, grads = torch.zeros_like(whole), {}
        for p in self.params:
            if id(p) not in self.is_muon and hasattr(p, "ds_id"):
                shards += own_shard(p).double().square().sum()
                continue
            grad = full_grad(p)
            whole += grad.double().square().sum()
            if id(p) in self.mine:
                grads[id(p)] = grad
        dist.all_reduce(shards)
        return (whole + shards).sqrt().float(), grads

    def save(self, path):
        torch.save({name: buf.cpu() for name, buf in self.momentum.items()}, momentum_file(path, self.rank))

    def load(self, path):
        """Each rank takes the momentum of the parameters it owns from whichever rank's file holds it."""
        saved = {}
        for f in sorted(glob.glob(momentum_file(path, "*"))):
            saved.update(safe_load(f))
        mine = [(name, p) for owner, name, p, _ in self.muon if owner == self.rank]
        missing = [name for name, _ in mine if name not in saved]
        if not saved:
            raise UsageError(f"{path} was not written by --optimizer muon: resume it with the optimizer that wrote it")
        if missing:
            raise UsageError(f"{path} holds no Muon momentum for {missing[0]}: resume it with the model that wrote it")
        self.momentum = {name: saved[name].to(self.device) for name, _ in mine}


def full_grad(p):
    """p's whole gradient, in fp32, as a copy: under ZeRO-0 DeepSpeed hands back p.grad itself, which set_grad
    then overwrites."""
    from deepspeed.utils import safe_get_full_grad
    return safe_get_full_grad(p).to(torch.float32, copy=True).reshape(shape(p))


def set_grad(p, value):
    """Write value as p's gradient; each rank keeps its own shard of it. ZeRO-3 reads its shard at rank x
    shard size, so the last shard's padding is added."""
    from deepspeed.utils import safe_set_full_grad
    if hasattr(p, "ds_id"):
        flat = value.flatten()
        value = torch.cat([flat, flat.new_zeros(p.partition_numel() * dist.get_world_size() - flat.numel())])
    safe_set_full_grad(p, value)


def own_shard(p):
    """This rank's shard of a ZeRO-3 parameter's gradient, without the padding of the last shard."""
    from deepspeed.utils import safe_get_local_grad
    shard = safe_get_local_grad(p).flatten()
    start = shard.numel() * dist.get_rank()
    return shard[:max(0, min(shard.numel(), p.ds_numel - start))]


def scale_grad(p, scale):
    """p's gradient times scale: under ZeRO-3 each rank scales its own shard, elsewhere the whole is rewritten."""
    if hasattr(p, "ds_id"):
        from deepspeed.utils import safe_get_local_grad, safe_set_local_grad
        safe_set_local_grad(p, safe_get_local_grad(p) * scale)
    else:
        set_grad(p, full_grad(p) * scale)


def shape(p):
    """A parameter's whole shape (ZeRO-3 leaves a (0,)-shaped placeholder in the module)."""
    return getattr(p, "ds_shape", p.shape)
