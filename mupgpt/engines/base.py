"""The Engine interface and what every backend shares; the Engine itself is the single-process backend.

The model (mup_model.GPT) knows nothing of parallelism; everything that wraps it (DDP, FSDP2,
DeepSpeed, activation checkpointing, torch.compile, autocast) happens in this package. An engine offers:
train_step(micro_batches) -> (this rank's mean loss, grad norm) as device tensors (no host sync, no
collective beyond the gradients' own), eval_loss (this rank's),
save(dir) / load(dir) of its native state, full_state_dict() for the consolidated export that
checkpoint.export writes, and world info (rank, world_size, device, is_main).
"""
import contextlib
import functools
import os
import pickle
import re

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.utils.checkpoint import checkpoint

from mupgpt.errors import UsageError
from mupgpt.optim import clean_name, lr_scheduler, optimizer


def untrusted(path, e):
    """A checkpoint file that holds Python objects beyond tensors and plain data is refused, never run."""
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
    what = found.group(1) if found else str(e).splitlines()[0][:200]
    return UsageError(f"{path} holds a Python object that is not tensors or plain data ({what}); it was not loaded "
                      "(a checkpoint is untrusted input): resume from a checkpoint this trainer wrote")


def safe_load(path, map_location=None, allowed=(), name=None):
    """torch.load of tensors and plain data only (weights_only), plus the few types in `allowed`."""
    name = name or path
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise untrusted(name, e) from None
    except (RuntimeError, EOFError, ValueError) as e:
        raise UsageError(f"{name} is damaged ({str(e).splitlines()[0][:200]}): resume from an earlier checkpoint") from None


def load_weights(path, device="cpu"):
    """A safetensors file (no code can be in one); a damaged one is one error line."""
    try:
        return load_file(path, device=str(device))
    except Exception as e:
        raise UsageError(f"{path} is damaged ({str(e).splitlines()[0][:200]}): resume from an earlier checkpoint") from None


def count_params(model):
    """Parameters without the position embeddings (as nanoGPT), also when ZeRO-3 has partitioned them."""
    return sum(getattr(p, "ds_numel", p.numel()) for n, p in model.named_parameters() if not n.endswith("wpe.weight"))


def checkpoint_blocks(model, checkpoint_fn):
    """Recompute each block's activations in backward. Names stay as they are (no wrapper module)."""
    for block in model.h:
        if "forward" not in vars(block):  # once only
            block.forward = functools.partial(checkpoint_fn, type(block).forward.__get__(block))


class Engine:
    """Single process (CPU or one GPU) and the base for the others."""
    fused_adamw = True

    def __init__(self, cfg, model, groups, world, precision, total_steps):
        self.cfg, self.model, self.world, self.precision = cfg, model, world, precision
        self.device = world.device
        self.grad_clip = cfg.grad_clip
        model.to(self.device)
        if cfg.gradient_checkpointing:
            checkpoint_blocks(model, functools.partial(checkpoint, use_reentrant=False))
        self.forward_model = self.compiled(model) if cfg.compile else model
        self.optimizer = optimizer(groups, cfg, fused=self.fused_adamw)
        self.scheduler = lr_scheduler(self.optimizer, cfg, total_steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision == "fp16")

    def compiled(self, model):
        return torch.compile(model)

    @property
    def rank(self):
        return self.world.rank

    @property
    def is_main(self):
        return self.world.is_main

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

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

    # --- checkpoints: every backend writes a consolidated model.safetensors (portable across
    # backends and world sizes) plus its native optimizer state; this one's is a torch-saved dict.
    def save(self, path):
        self.save_consolidated(path)
        if self.is_main:
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                        "scaler": self.scaler.state_dict()}, os.path.join(path, "optimizer.pt"))

    def load(self, path):
        self.load_model(load_weights(os.path.join(path, "model.safetensors"), self.device))
        state = safe_load(os.path.join(path, "optimizer.pt"), map_location=self.device)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.load_rng(path)

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

    def full_state_dict(self):
        """The whole model's weights as plain CPU tensors under bare names (rank 0 gets them)."""
        return {clean_name(k): v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}

    def load_model(self, state):
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise UsageError(f"checkpoint does not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]}): "
                             "resume with the same --head_width, --n_head, --n_layer and --seq_len")


