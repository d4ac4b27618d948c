"""Launched by the tests under deepspeed / torchrun: the muP init and per-group LRs on every shard.

Writes $PROBE_OUT/init.safetensors (the gathered weights as built, under zero.Init for ZeRO-3) and
$PROBE_OUT/step1.safetensors (after one Adam step on a fixed batch) from rank 0, in --precision
(fp32 or bf16; the gathered weights are the fp32 master copies).
"""
import os
import sys

import torch
from safetensors.torch import save_file

from mupgpt.config import parse_args
from mupgpt.engines.factory import build
from mupgpt.model_config import model_config
from mupgpt.world import exit_process, init_world, resolve_backend

out, argv = os.environ["PROBE_OUT"], sys.argv[1:]  # the deepspeed launcher puts --local_rank first
cfg = parse_args(argv)
backend = resolve_backend(cfg)
micro = cfg.per_device_train_batch_size
precision = cfg.precision
ds_cfg = None
if backend == "deepspeed":
    from mupgpt.engines.deepspeed_config import ds_config
    ds_cfg = ds_config(cfg, precision, micro * int(os.environ["WORLD_SIZE"]), 1, cfg.n_head * cfg.head_width)
world = init_world(backend, "cpu")
engine = build(backend, cfg, model_config(cfg, 257), world, precision, 10, ds_cfg)
init = {k: v.clone() for k, v in engine.full_state_dict().items()}  # on CPU DDP's are the live parameters
g = torch.Generator().manual_seed(0)
x = torch.randint(0, 257, (micro * world.world_size, cfg.seq_len), generator=g)
mine = x[world.rank * micro:(world.rank + 1) * micro]
engine.train_step([(mine, mine.roll(-1, 1))])
step1 = engine.full_state_dict()
if world.is_main:
    os.makedirs(out, exist_ok=True)
    save_file(init, os.path.join(out, "init.safetensors"))
    save_file(step1, os.path.join(out, "step1.safetensors"))
exit_process(0)
