"""The one place a model gets built and wrapped for a backend."""
import json
import os

import torch

from mupgpt.errors import UsageError

BACKENDS = ("single", "ddp", "fsdp", "deepspeed")


def engine_class(backend):
    """The backend's Engine class, importing only its module (DeepSpeed only when it is used)."""
    if backend == "single":
        from mupgpt.engines.single import SingleEngine
        return SingleEngine
    if backend == "ddp":
        from mupgpt.engines.ddp import DDPEngine
        return DDPEngine
    if backend == "fsdp":
        from mupgpt.engines.fsdp import FSDPEngine
        return FSDPEngine
    from mupgpt.engines.deepspeed_zero import DeepSpeedEngine
    return DeepSpeedEngine


def build(backend, cfg, mcfg, world, precision, total_steps, ds_config=None, run_dir=None):
    """Model, muP optimizer groups and engine for one backend: the only place wrapping happens."""
    from mup_model import GPT
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r}: use single, ddp, fsdp or deepspeed")
    torch.manual_seed(cfg.seed)
    if backend == "deepspeed":
        from mupgpt.engines.deepspeed_zero import build_model
        if run_dir:
            with open(os.path.join(run_dir, "ds_config.json"), "w") as f:
                json.dump(ds_config, f, indent=2)
        model = build_model(mcfg, ds_config)  # under ZeRO-3, each rank builds only its shard
    else:
        model = GPT(mcfg)
    return engine_class(backend)(cfg, model, world, precision, total_steps, run_dir, ds_config)
