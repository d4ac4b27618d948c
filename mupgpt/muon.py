"""Muon for the hidden matrices and AdamW for the rest, as one torch optimizer.

One optimizer, so the schedule (a LambdaLR over every group), the grad scaler, the checkpoints (its
state_dict holds both halves' state) and DCP's get_state_dict see what they see under AdamW alone.
The groups come from optim.param_groups: "muon" groups carry their LR and decay from the muP rules
table (mup_model.py: muon_lr times the --muon_scale factor s), the others are AdamW's groups unchanged.

The Muon step is torch.optim.Muon's: momentum by lerp, Nesterov, torch's Newton-Schulz (in fp32 on a CPU:
zeropower), decoupled decay. It is written out here rather than called, for two reasons: torch's Muon
multiplies the LR by its own shape factor (adjust_lr_fn: "original" or "match_rms_adamw", no
sqrt(fan_out/fan_in) and no "none"), while the rules table already holds the factor in each group's LR;
and under FSDP2 each rank holds a slice of the matrix, but the orthogonalization needs the whole of it.
So a DTensor's update is gathered whole (full_tensor) and orthogonalized by the one rank that owns the
matrix, which scatters the shards (owners; on a 2-D hybrid mesh every rank orthogonalizes it and keeps
its own slice). Under DeepSpeed the gradients are flat partitions, so Muon runs before DeepSpeed's step
instead (engines/deepspeed_muon.py) and the step here only applies it (given_updates). The gradient is
already the whole batch's: accumulation and the data-parallel average finish before the step, so Muon
runs once per optimizer step.
"""
import torch
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.optim._muon import DEFAULT_NS_STEPS, EPS, _zeropower_via_newtonschulz

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # torch's (Keller Jordan's quintic)


def zeropower(matrix, ns_steps, eps):
    """torch's Newton-Schulz, returned in the matrix's dtype. torch computes it in bf16, which a CPU
    without bf16 matrix units multiplies many times slower than fp32 (bench/RESULTS.md), so on a CPU
    the same iteration (torch's coefficients and steps) runs in the matrix's own dtype."""
    if matrix.device.type != "cpu":
        return _zeropower_via_newtonschulz(matrix, NS_COEFFICIENTS, ns_steps, eps).to(matrix.dtype)
    a, b, c = NS_COEFFICIENTS
    tall = matrix.size(0) > matrix.size(1)
    x = matrix.T if tall else matrix
    x = x / x.norm().clamp(min=eps)
    for _ in range(ns_steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def newton_schulz(matrix, ns_steps, eps, blocks):
    """The orthogonalized matrix (zeropower); with blocks (rows, scales) each block of rows on its own,
    times its scale (the fused q, k, v: mup_model.GPT.muon_blocks)."""
    if not blocks:
        return zeropower(matrix, ns_steps, eps)
    rows, scales = blocks
    return torch.cat([zeropower(part, ns_steps, eps) * scale for part, scale in zip(matrix.split(list(rows)), scales)])


def nesterov(grad, buf, group):
    """Muon's momentum (by lerp into buf, in place) and the Nesterov update it gives, not yet orthogonalized."""
    buf.lerp_(grad, 1 - group["momentum"])
    return grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf


def muon_update(grad, buf, group):
    """Muon's update from a whole gradient: momentum, Nesterov, orthogonalized."""
    return newton_schulz(nesterov(grad, buf, group), group["ns_steps"], group["eps"], group.get("blocks", ()))


def owners(params):
    """Who orthogonalizes each sharded matrix: matrix i on rank i mod the mesh's size, so the ranks split
    the Newton-Schulz work (as torchtitan's distributed Muon). Only on 1-D meshes: on FSDP2's 2-D hybrid
    mesh every rank still orthogonalizes every matrix."""
    sharded = [p for p in params if isinstance(p, DTensor) and p.device_mesh.ndim == 1]
    return {id(p): i % p.device_mesh.size() for i, p in enumerate(sharded)}


def orthogonalize_sharded(items):
    """items: (update DTensor, group, owner rank or None) -> the orthogonalized DTensors, in order. In three
    passes, so that the owners' Newton-Schulz runs at the same time: each update is gathered whole and kept
    by its owner (by every rank where it has none), the kept ones are orthogonalized, and each owner
    scatters its result's shards (where there is no owner, each rank keeps its own slice)."""
    kept = []
    for u, _, o in items:  # the gathers, in the same order on every rank
        whole = u.full_tensor()
        kept.append(whole if o is None or u.device_mesh.get_local_rank() == o else None)
    done = [w if w is None else newton_schulz(w, g["ns_steps"], g["eps"], g.get("blocks", ()))
            for w, (_, g, _) in zip(kept, items)]
    out = []
    for w, (u, _, o) in zip(done, items):  # the scatters: only the owner's tensor is read
        w = torch.empty(u.shape, dtype=u.dtype, device=u.device) if w is None else w
        out.append(distribute_tensor(w, u.device_mesh, u.placements, src_data_rank=o))
    return out


@torch.no_grad()
def muon_step(groups, state, owner):
    """One Muon step over the Muon groups, as torch.optim.Muon's _single_tensor_muon with the LR taken as
    given. owner: id(param) -> the rank that orthogonalizes it (owners), for sharded matrices."""
    sharded = []
    for group in groups:
        for p in group["params"]:
            if p.grad is None:
                continue
            buf = state[p].get("momentum_buffer")
            if buf is None:  # made once: setdefault would allocate a zero buffer every step
                buf = state[p]["momentum_buffer"] = torch.zeros_like(p.grad)
            update = nesterov(p.grad, buf, group)
            if isinstance(update, DTensor):
                sharded.append((p, group, update))
            else:
                apply(p, newton_schulz(update, group["ns_steps"], group["eps"], group.get("blocks", ())), group)
    results = orthogonalize_sharded([(u, g, owner.get(id(p))) for p, g, u in sharded])
    for (p, group, _), update in zip(sharded, results):
        apply(p, update, group)


@torch.no_grad()
def apply(p, update, group):
    """Decoupled decay, then the update times the group's LR."""
    p.mul_(1 - group["lr"] * group["weight_decay"])
    p.add_(update, alpha=-group["lr"])


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon over the "muon" groups, torch's AdamW (fused where the engine asks) over the others.

    The AdamW half is a torch.optim.AdamW holding the same group dicts and the same state dict, so
    hyperparameters the schedule writes reach it and this optimizer's state_dict is the whole state."""

    def __init__(self, groups, cfg, fused=True, given_updates=False):
        """given_updates: the Muon groups' gradients already hold Muon's update (under DeepSpeed, whose flat
        partitions are no matrices: engines/deepspeed_muon.py), so their step only applies it."""
        self.given_updates = given_updates
        for group in groups:
            if group["name"] == "muon":
                group.update(momentum=cfg.muon_momentum, nesterov=True, ns_steps=DEFAULT_NS_STEPS, eps=EPS)
        super().__init__(groups, {})
        self.owners = owners([p for g in self.param_groups if g["name"] == "muon" for p in g["params"]])
        adam = [g for g in self.param_groups if g["name"] != "muon"]
        self.adamw = torch.optim.AdamW(adam, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                       eps=cfg.adam_eps, weight_decay=cfg.weight_decay, fused=fused)
        self._link()

    def _link(self):
        """The AdamW half on this optimizer's own group dicts and state (again after load_state_dict,
        which replaces both)."""
        self.adamw.param_groups = [g for g in self.param_groups if g["name"] != "muon"]
        self.adamw.state = self.state

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self._link()

    @torch.no_grad()
    def step(self, closure=None):
        muon = [g for g in self.param_groups if g["name"] == "muon"]
        if self.given_updates:
            for p, group in ((p, g) for g in muon for p in g["params"] if p.grad is not None):
                apply(p, p.grad, group)
        else:
            muon_step(muon, self.state, self.owners)
        if self.adamw.param_groups:
            self.adamw.step()
