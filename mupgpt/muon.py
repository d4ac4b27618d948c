"""Muon for the hidden matrices and AdamW for the rest, as one torch optimizer.

One optimizer, so the schedule (a LambdaLR over every group), the grad scaler, the checkpoints (its
state_dict holds both halves' state) and DCP's get_state_dict see what they see under AdamW alone.
The groups come from optim.param_groups: "muon" groups carry their LR and decay from the muP rules
table (mup_model.py: muon_lr times the --muon_scale factor s), the others are AdamW's groups unchanged.

The Muon step is torch.optim.Muon's: momentum by lerp, Nesterov, torch's Newton-Schulz (in fp32 on a
CPU: zeropower), decoupled decay. It is written out here rather than called, for two reasons: torch's
Muon multiplies the LR by its own shape factor (adjust_lr_fn: "original" or "match_rms_adamw", no
sqrt(fan_out/fan_in) and no "none"), while the rules table already holds the factor in each group's LR;
and under FSDP2 each rank holds a slice of the matrix, but the orthogonalization needs the whole of it.
So a DTensor's update is gathered whole (full_tensor) and orthogonalized by the one rank that owns the
matrix, which scatters the shards (owners; on a 2-D hybrid mesh every rank orthogonalizes it and keeps
its own slice). Under DeepSpeed the gradients are flat partitions, so Muon runs before DeepSpeed's step
instead (engines/deepspeed_muon.py) and the step here only applies it (given_updates). The gradient is already the whole batch's: accumulation
and the data-parallel average finish before the step, so Muon runs once per optimizer step.
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


def orthogonalize(update, ns_steps, eps, blocks=(), owner=None):
    """The orthogonalized update. A DTensor's is computed on the whole matrix and sliced back to its shard:
    by owner alone (its rank in a 1-D mesh), which scatters the shards, or else by every rank alike."""
    if not isinstance(update, DTensor):
        return newton_schulz(update, ns_steps, eps, blocks)
    whole, mesh = update.full_tensor(), update.device_mesh
    if owner is None:
        return distribute_tensor(newton_schulz(whole, ns_steps, eps, blocks), mesh, update.placements,
                                 src_data_rank=None)
    if mesh.get_local_rank() == owner:
        whole = newton_schulz(whole, ns_steps, eps, blocks)
    return distribute_tensor(whole, mesh, update.placements, src_data_rank=owner)


def muon_update(grad, buf, group, owner=None):
    """Muon's update from a whole gradient: momentum by lerp into buf (in place), Nesterov, orthogonalized."""
    buf.lerp_(grad, 1 - group["momentum"])
    update = grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
    return orthogonalize(update, group["ns_steps"], group["eps"], group.get("blocks", ()), owner)


def owners(params):
    """Who orthogonalizes each sharded matrix: matrix i on rank i mod the mesh's size, so the ranks split
    the Newton-Schulz work (as torchtitan's distributed Muon). Only on 1-D meshes: on FSDP2's 2-D hybrid
    mesh every rank still orthogonalizes every matrix."""
    sharded = [p for p in params if isinstance(p, DTensor) and p.device_mesh.ndim == 1]
    return {id(p): i % p.device_mesh.size() for i, p in enumerate(sharded)}


@torch.no_grad()
def muon_step(group, state, owner=None):
    """One Muon step over a group, as torch.optim.Muon's _single_tensor_muon with the LR taken as given.
    owner: id(param) -> the rank that orthogonalizes it (owners), for sharded matrices."""
    for p in group["params"]:
        if p.grad is None:
            continue
        buf = state[p].get("momentum_buffer")
        if buf is None:  # made once: setdefault would allocate a zero buffer every step
            buf = state[p]["momentum_buffer"] = torch.zeros_like(p.grad)
        apply(p, muon_update(p.grad, buf, group, (owner or {}).get(id(p))), group)


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
        for group in self.param_groups:
            if group["name"] == "muon" and self.given_updates:
                for p in group["params"]:
                    if p.grad is not None:
                        apply(p, p.grad, group)
            elif group["name"] == "muon":
                muon_step(group, self.state, self.owners)
        if self.adamw.param_groups:
            self.adamw.step()
