"""The one place a model gets built and wrapped for a backend."""
import json
import os

import torch

from mupgpt.engines.base import Engine
from mupgpt.errors import UsageError
from mupgpt.optim import muon_settings, param_groups


def build(backend, cfg, mcfg, world, precision, total_steps, ds_config=None, run_dir=None):
    """Model, muP optimizer groups and engine for one backend: the only place wrapping happens."""
    from mup_model import GPT
    torch.manual_seed(cfg.seed)
    if backend == "deepspeed":
        from mupgpt.engines.deepspeed_zero import DeepSpeedEngine, build_model
        if run_dir:
            with open(os.path.join(run_dir, "ds_config.json"), "w") as f:
                json.dump(ds_config, f, indent=2)
        model = build_model(mcfg, ds_config)
        groups = param_groups(model, cfg.learning_rate, cfg.weight_decay, cfg.adam_eps, run_dir, muon_settings(cfg))
        return DeepSpeedEngine(cfg, model, groups, world, precision, total_steps, ds_config)
    model = GPT(mcfg)
    if backend == "fsdp":  # FSDP2 builds its groups after sharding
        from mupgpt.engines.fsdp import FSDPEngine
        return FSDPEngine(cfg, model, world, precision, total_steps, run_dir)
    groups = param_groups(model, cfg.learning_rate, cfg.weight_decay, cfg.adam_eps, run_dir, muon_settings(cfg))
    if backend == "single":
        return Engine(cfg, model, groups, world, precision, total_steps)
    if backend == "ddp":
        from mupgpt.engines.ddp import DDPEngine
        return DDPEngine(cfg, model, groups, world, precision, total_steps)
    raise UsageError(f"unknown backend {backend!r}: use single, ddp, fsdp or deepspeed")
