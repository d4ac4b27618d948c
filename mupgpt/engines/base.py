"""The Engine interface and what every backend shares.

The model (mup_model.GPT) knows nothing of parallelism; everything that wraps it (DDP, FSDP2,
DeepSpeed, activation checkpointing, torch.compile, autocast) happens in this package. An engine offers:
train_step(micro_batches) -> (this rank's mean loss, grad norm) as device tensors (no host sync, no
collective beyond the gradients' own), eval_loss (this rank's),
save(dir) / load(dir) of its native state, full_state_dict() for the consolidated export that
checkpoint.export writes, load_model(state) of consolidated weights, and world info (rank, world_size,
device, is_main).
"""
import contextlib
import functools
import os

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.utils.checkpoint import checkpoint

from mupgpt.errors import UsageError
from mupgpt.optim import lr_scheduler, muon_settings, optimizer, param_groups
from mupgpt.safe_load import safe_load

# the dtype of each half precision, for autocast and for FSDP2's mixed precision policy
HALF_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def count_params(model):
    """Parameters without the position embeddings (as nanoGPT), also when ZeRO-3 has partitioned them."""
    return sum(getattr(p, "ds_numel", p.numel()) for n, p in model.named_parameters() if not n.endswith("wpe.weight"))


def checkpoint_blocks(model, checkpoint_fn):
    """Recompute each block's activations in backward. Names stay as they are (no wrapper module)."""
    for block in model.h:
        if "forward" not in vars(block):  # once only
            block.forward = functools.partial(checkpoint_fn, type(block).forward.__get__(block))


def check_fits(names, state):
    """Consolidated weights load only into the model they were saved from: the same parameter names, no
    more and no fewer (each backend passes its parameters' bare names)."""
    names, given = set(names), set(state)
    missing, unexpected = sorted(names - given), sorted(given - names)
    if missing or unexpected:
        raise UsageError(f"checkpoint does not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]}): "
                         "resume with the same --head_width, --n_head, --n_layer and --seq_len")


class Engine:
    """What every backend offers and shares. Each backend's constructor takes these same arguments and
    calls this one first, then wraps the model and makes self.optimizer and self.scheduler."""

    def __init__(self, cfg, model, world, precision, total_steps, run_dir=None, ds_config=None):
        """run_dir gets the optimizer groups' table (opt_config.json); ds_config is DeepSpeed's
        effective config, which only the deepspeed backend reads."""
        self.cfg, self.model, self.world, self.precision = cfg, model, world, precision
        self.total_steps, self.run_dir, self.ds_config = total_steps, run_dir, ds_config
        self.device, self.grad_clip = world.device, cfg.grad_clip
        self.forward_model = model  # what train_step calls: the model, or its compiled or wrapped self
        self.optimizer = self.scheduler = self.scaler = None

    def param_groups(self):
        """The muP optimizer groups of the model as it is now (written to run_dir/opt_config.json)."""
        cfg = self.cfg
        return param_groups(self.model, cfg.learning_rate, cfg.weight_decay, cfg.adam_eps, self.run_dir,
                            muon_settings(cfg))

    def start_optimizer(self, groups, fused=True):
        """The optimizer over the muP groups (AdamW, or Muon with AdamW: optim.optimizer) and the LR schedule."""
        self.optimizer = optimizer(groups, self.cfg, fused=fused)
        self.scheduler = lr_scheduler(self.optimizer, self.cfg, self.total_steps)

    def checkpoint_activations(self):
        if self.cfg.gradient_checkpointing:
            checkpoint_blocks(self.model, functools.partial(checkpoint, use_reentrant=False))

    @property
    def rank(self):
        return self.world.rank

    @property
    def is_main(self):
        return self.world.is_main

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=HALF_DTYPES[self.precision])

    def no_sync(self, last):
        return contextlib.nullcontext()

    def train_step(self, micro_batches):
        total = torch.zeros((), device=self.device)
        for i, (x, y) in enumerate(micro_batches):
            with self.no_sync(i == len(micro_batches) - 1), self.autocast():
                loss = self.forward_model(x, y) / len(micro_batches)
            self.scaler.scale(loss).backward()
            total += loss.detach()
        self.scaler.unscale_(self.optimizer)
        norm = self.clip()
        self.step_optimizer()
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total, norm

    def step_optimizer(self):
        self.scaler.step(self.optimizer)

    def clip(self):
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.grad_clip > 0:
            return torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))

    @torch.no_grad()
    def eval_loss(self, x, y):
        self.model.eval()
        with self.autocast():
            loss = self.forward_model(x, y)
        self.model.train()
        return loss.float()

    def reduce_mean(self, t):
        if self.world.world_size > 1:
            t = t.clone()
            dist.all_reduce(t)
            t /= self.world.world_size
        return t

    def lr(self):
        """The schedule's current base LR (what a multiplier-1 group gets)."""
        return self.cfg.learning_rate * self.scheduler.get_last_lr()[0] / self.scheduler.base_lrs[0]

    # --- checkpoints: every backend writes a consolidated model.safetensors (portable across backends and
    # world sizes) and each rank's RNG state (save_consolidated), plus its own native optimizer state.
    def save(self, path):
        raise NotImplementedError

    def load(self, path):
        raise NotImplementedError

    def full_state_dict(self):
        """The whole model's weights as plain CPU tensors under bare names (rank 0 gets them)."""
        raise NotImplementedError

    def load_model(self, state):
        """Consolidated weights (bare names, full shapes), checked with check_fits."""
        raise NotImplementedError

    def save_consolidated(self, path):
        state = self.full_state_dict()  # a collective under the sharded backends
        if self.is_main:
            save_file(state, os.path.join(path, "model.safetensors"))
        torch.save({"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state() if self.device.type == "cuda" else torch.zeros(0)},
                   os.path.join(path, f"rng_rank{self.rank}.pt"))

    def load_rng(self, path):
        rng_file = os.path.join(path, f"rng_rank{self.rank}.pt")
        if os.path.exists(rng_file):
            rng = safe_load(rng_file)
            torch.set_rng_state(rng["torch"])
            if self.device.type == "cuda" and rng["cuda"].numel():
                torch.cuda.set_rng_state(rng["cuda"])
