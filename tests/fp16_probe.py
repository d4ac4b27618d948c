"""Launched by the tests under torchrun (2 ranks): FSDP2 in fp16 with dynamic loss scaling.

A first step at a loss scale of 2^40 overflows the fp16 gradients: every rank must skip it (weights
unchanged) and halve the scale alike. At a scale that fits, the next step updates the weights.
(An overflow in the loss head reaches every shard, so this cannot tell ShardedGradScaler's all-reduce
of found-inf from a plain GradScaler: it checks the skip and the backoff, not that agreement.)
Writes $PROBE_OUT/fp16.json from rank 0.
"""
import json
import os

import torch
import torch.distributed as dist

from mupgpt.config import parse_args
from mupgpt.engines.factory import build
from mupgpt.model_config import model_config
from mupgpt.world import exit_process, init_world

cfg = parse_args(["--backend", "fsdp", "--precision", "fp16", "--n_layer", "2", "--seq_len", "32",
                  "--per_device_train_batch_size", "2", "--train_batch_size", "4"])
world = init_world("fsdp", "cpu")
engine = build("fsdp", cfg, model_config(cfg, 257), world, "fp16", 10)
engine.scaler._init_scale = 2.0**40  # the scaler creates its scale on first use
x = torch.randint(0, 257, (2, 32), generator=torch.Generator().manual_seed(world.rank))
batch = [(x, x.roll(-1, 1))]


def step():
    before = engine.full_state_dict()
    loss, _ = engine.train_step(batch)
    after = engine.full_state_dict()
    scales = [None] * world.world_size
    dist.all_gather_object(scales, engine.scaler.get_scale())
    moved = any(not torch.equal(before[k], after[k]) for k in before) if world.is_main else None
    return {"moved": moved, "scales": scales, "loss": loss.item()}


overflow = step()
engine.scaler.update(new_scale=1024.0)
fits = step()
if world.is_main:
    with open(os.path.join(os.environ["PROBE_OUT"], "fp16.json"), "w") as f:
        json.dump({"overflow": overflow, "fits": fits}, f)
exit_process(0)
