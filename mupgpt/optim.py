"""Optimizer groups from the muP rules, AdamW over them, and the LR schedule.

The groups are built from parameter names (mup_model.GPT.param_rules), so they survive ZeRO-3's
(0,)-shaped partitions and FSDP2's DTensors. The schedule is transformers' get_scheduler, a LambdaLR:
it multiplies each group's own initial LR, so the muP ratios between groups hold at every step.
warmup_stable_decay (the schedule of scaling studies): linear warm-up over --num_warmup_steps from
min_lr_ratio to 1 (transformers' definition), constant, then a decay over the last --num_decay_steps
(default 20% of the steps) down to --min_lr_ratio, shaped by --decay_type: 1-sqrt (default:
1 - sqrt(progress), Hägele et al. 2024), linear or cosine. cosine_with_min_lr decays to --min_lr_ratio.
"""
import json
import os
from collections import defaultdict

import torch

from mupgpt.errors import UsageError

WRAPPER_PREFIXES = ("_orig_mod.", "module.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


def clean_name(name):
    """A parameter's name in the bare model: drop what compile, DDP and checkpoint wrappers add."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def param_groups(model, lr, weight_decay, eps=1e-8, run_dir=None, muon=None):
    """AdamW groups with their muP LR, decay and eps; writes run_dir/opt_config.json (name -> lr, wd, eps).
    muon: (muon_lr, muon_scale) from muon_settings: the hidden matrices become Muon groups ("muon", no eps)."""
    rules = model.param_rules(muon and muon[1])
    blocks = model.muon_blocks(muon[1]) if muon else {}
    buckets = defaultdict(list)
    table = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        cls, rule = rules[clean_name(name)]
        base, geps = (muon[0], 0.0) if cls == "muon" else (lr, eps * rule.eps_mult)
        key = (cls, base * rule.lr_mult, weight_decay * rule.wd_mult, geps, blocks.get(clean_name(name), ()))
        buckets[key].append(p)
        table[clean_name(name)] = dict(zip(("class", "lr", "weight_decay", "eps"), key))
    groups = [{"params": ps, "lr": glr, "weight_decay": gwd, "eps": geps, "name": cls, "blocks": blk}
              for (cls, glr, gwd, geps, blk), ps in sorted(buckets.items(), key=lambda kv: kv[0])]
    for group in groups:
        if group["name"] == "muon":
            del group["eps"]  # Muon's eps guards its normalisation: torch's default, not Adam's
        else:
            del group["blocks"]  # AdamW's groups stay as they were
    if run_dir is not None:
        with open(os.path.join(run_dir, "opt_config.json"), "w") as f:
            json.dump(table, f, indent=1)
    return groups


def muon_settings(cfg):
    """What param_groups needs for Muon's groups: None under AdamW."""
    return (cfg.muon_lr, cfg.muon_scale) if cfg.optimizer == "muon" else None


def optimizer(groups, cfg, fused=True, given_updates=False):
    """AdamW, or under --optimizer muon Muon for the "muon" groups and AdamW for the rest, as one optimizer
    (given_updates: see MuonWithAdamW)."""
    if cfg.optimizer != "muon":
        return adamw(groups, cfg, fused)
    from mupgpt.muon import MuonWithAdamW
    return MuonWithAdamW(groups, cfg, fused, given_updates)


def adamw(groups, cfg, fused=True):
    """torch's fused AdamW (one kernel per group, no temporaries) on CPU and GPU alike: it steps faster
    than the foreach version (bench/RESULTS.md)."""
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             eps=cfg.adam_eps, weight_decay=cfg.weight_decay, fused=fused)


MIN_LR_SCHEDULES = ("cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay")
DECAY_FRACTION = 0.2  # warmup_stable_decay's default decay: the last 20% of the steps


def schedule_kwargs(cfg, total_steps=None):
    """The schedule-specific arguments get_scheduler needs; bad schedule flags are a UsageError (the checks
    that need the run's length only when total_steps is given)."""
    name, ratio = cfg.lr_scheduler_type, cfg.min_lr_ratio
    if not 0 <= ratio <= 1:
        raise UsageError("--min_lr_ratio must be between 0 and 1 (the LR floor as a fraction of each group's LR), "
                         f"not {ratio}")
    if ratio and name not in MIN_LR_SCHEDULES:
        raise UsageError(f"--min_lr_ratio is for --lr_scheduler_type {', '.join(MIN_LR_SCHEDULES)}, not {name}: "
                         "drop it or pick one of those")
    if cfg.num_decay_steps < 0:
        raise UsageError(f"--num_decay_steps must be 0 (20% of the steps) or more, not {cfg.num_decay_steps}")
    if (cfg.num_decay_steps or cfg.decay_type != "1-sqrt") and name != "warmup_stable_decay":
        raise UsageError("--num_decay_steps and --decay_type are for --lr_scheduler_type warmup_stable_decay, not "
                         f"{name}")
    if name in ("cosine_with_min_lr", "cosine_warmup_with_min_lr"):
        return {"min_lr_rate": ratio}
    if name != "warmup_stable_decay":
        return {}
    kwargs = {"min_lr_ratio": ratio, "decay_type": cfg.decay_type, "num_decay_steps": cfg.num_decay_steps}
    if total_steps is not None:
        decay = cfg.num_decay_steps or max(1, round(DECAY_FRACTION * total_steps))
        if cfg.num_warmup_steps + decay > total_steps:
            raise UsageError(f"--num_warmup_steps {cfg.num_warmup_steps} + {decay} decay steps exceed the run's "
                             f"{total_steps} steps: lower them or train longer")
        kwargs["num_decay_steps"] = decay
    return kwargs


def lr_scheduler(optimizer, cfg, total_steps):
    from transformers import get_scheduler
    return get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=cfg.num_warmup_steps,
                         num_training_steps=total_steps, scheduler_specific_kwargs=schedule_kwargs(cfg, total_steps))
