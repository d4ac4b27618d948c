"""Launched by the tests under deepspeed / torchrun: the muP init and per-group LRs on every shard.

$PROBE_RUNS names the backends to probe, as JSON {name: [flags]}; the command line holds the flags they share.
One launch probes them one after another (a launch costs seconds of start-up; each engine is built afresh,
from the same seed). For each it writes $PROBE_OUT/<name>/init.safetensors (the gathered weights as built,
under zero.Init for ZeRO-3) and $PROBE_OUT/<name>/step1.safetensors (after one Adam step on a fixed batch)
from rank 0, in --precision (fp32 or bf16; the gathered weights are the fp32 master copies).
"""
import json
import os
import sys

import torch
from safetensors.torch import save_file

from mupgpt.config import parse_args
from mupgpt.engines.factory import build
from mupgpt.model_config import model_config
from mupgpt.world import exit_process, init_world, resolve_backend


def probe(argv, out):
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
    world.barrier()


for name, flags in json.loads(os.environ["PROBE_RUNS"]).items():
    probe([*flags, *sys.argv[1:]], os.path.join(os.environ["PROBE_OUT"], name))
exit_process(0)
