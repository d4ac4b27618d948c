"""LR schedules: warmup_stable_decay and cosine_with_min_lr against their definitions, every muP group alike."""
import json
import math
import re

import pytest
import torch

from conftest import run_cli, trainer_args
from mup_model import GPT, GPTConfig
from mupgpt.config import parse_args
from mupgpt.errors import UsageError
from mupgpt.optim import lr_scheduler, param_groups, schedule_kwargs


def wsd(step, total, warmup, decay, floor, shape):
    """Warm-up from the floor to 1, constant, then the decay over the last `decay` steps down to the floor."""
    if step < warmup:
        return floor + (1 - floor) * step / warmup
    if step < total - decay:
        return 1.0
    if step >= total:
        return floor
    progress = (step - (total - decay)) / decay
    f = {"1-sqrt": 1 - math.sqrt(progress), "linear": 1 - progress, "cosine": 0.5 * (1 + math.cos(math.pi * progress))}
    return floor + (1 - floor) * f[shape]


def cosine_with_min_lr(step, total, warmup, floor):
    if step < warmup:
        return step / warmup
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def group_lrs(flags, total):
    """Each step's LR of each muP group (m = 4), from the trainer's own scheduler."""
    cfg = parse_args(["--learning_rate", "1e-2", *flags])
    model = GPT(GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=2, head_width=32, base_head_width=8))
    opt = torch.optim.AdamW(param_groups(model, cfg.learning_rate, 0.1), lr=cfg.learning_rate)
    sched = lr_scheduler(opt, cfg, total)
    out = []
    for _ in range(total + 1):
        out.append({g["name"]: g["lr"] for g in opt.param_groups})
        opt.step()
        sched.step()
    return out


CASES = {
    "wsd default decay (20%), 1-sqrt": (["--lr_scheduler_type", "warmup_stable_decay", "--num_warmup_steps", "5",
                                         "--min_lr_ratio", "0.1"], lambda s: wsd(s, 50, 5, 10, 0.1, "1-sqrt")),
    "wsd 20 linear decay steps": (["--lr_scheduler_type", "warmup_stable_decay", "--num_warmup_steps", "4",
                                   "--num_decay_steps", "20", "--decay_type", "linear"],
                                  lambda s: wsd(s, 50, 4, 20, 0.0, "linear")),
    "wsd cosine decay": (["--lr_scheduler_type", "warmup_stable_decay", "--decay_type", "cosine", "--min_lr_ratio",
                          "0.25"], lambda s: wsd(s, 50, 0, 10, 0.25, "cosine")),
    "cosine_with_min_lr": (["--lr_scheduler_type", "cosine_with_min_lr", "--num_warmup_steps", "5", "--min_lr_ratio",
                            "0.1"], lambda s: cosine_with_min_lr(s, 50, 5, 0.1)),
}


@pytest.mark.parametrize("case", CASES)
def test_schedule_follows_its_definition_in_every_mup_group(case):
    flags, factor = CASES[case]
    lrs = group_lrs(flags, 50)
    base = {"hidden": 1e-2 / 4, "block_vector": 1e-2, "embedding": 1e-2, "readout": 1e-2, "final_norm": 1e-2}
    for step, row in enumerate(lrs):
        assert row == pytest.approx({k: v * factor(step) for k, v in base.items()}, rel=1e-9, abs=1e-15), step
        assert row["hidden"] == pytest.approx(row["embedding"] / 4, rel=1e-12)  # the muP ratio at every step


def test_wsd_spot_values():
    """A few steps worked out by hand: 50 steps, 5 warm-up, 10 decay (20%), floor 0.1, 1-sqrt."""
    lrs = [row["embedding"] for row in group_lrs(CASES["wsd default decay (20%), 1-sqrt"][0], 50)]
    assert lrs[0] == pytest.approx(1e-3)  # warm-up starts at the floor
    assert lrs[5] == lrs[39] == pytest.approx(1e-2)
    assert lrs[40] == pytest.approx(1e-2)  # the decay's first step is still at the peak
    assert lrs[44] == pytest.approx(1e-2 * (0.1 + 0.9 * (1 - math.sqrt(0.4))))
    assert lrs[50] == pytest.approx(1e-3)


def test_trainer_runs_wsd_and_logs_its_lr(tmp_path, corpus, data_dir):
    args = trainer_args(tmp_path, corpus, data_dir, "--run_name", "wsd", "--max_steps", "10", "--save", "false",
                        "--learning_rate", "1e-2", "--lr_scheduler_type", "warmup_stable_decay",
                        "--num_warmup_steps", "2", "--num_decay_steps", "4", "--min_lr_ratio", "0.1")
    res = run_cli(args)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [json.loads(line) for line in open(tmp_path / "wsd" / "metrics.jsonl") if '"lr"' in line]
    # the LR logged after step s is the one step s + 1 will use
    assert [r["lr"] for r in rows] == pytest.approx([1e-2 * wsd(r["step"], 10, 2, 4, 0.1, "1-sqrt") for r in rows])


BAD = {
    "floor above 1": (["--lr_scheduler_type", "warmup_stable_decay", "--min_lr_ratio", "2"],
                      "--min_lr_ratio must be between 0 and 1"),
    "floor on plain cosine": (["--lr_scheduler_type", "cosine", "--min_lr_ratio", "0.1"], "--min_lr_ratio is for"),
    "decay steps on cosine": (["--lr_scheduler_type", "cosine", "--num_decay_steps", "3"],
                              "are for --lr_scheduler_type warmup_stable_decay"),
    "negative decay": (["--lr_scheduler_type", "warmup_stable_decay", "--num_decay_steps", "-1"],
                       "--num_decay_steps must be"),
    "longer than the run": (["--lr_scheduler_type", "warmup_stable_decay", "--num_warmup_steps", "3",
                             "--num_decay_steps", "3"],
                            "--num_warmup_steps 3 + 3 decay steps exceed the run's 4 steps"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_schedule_flags_are_refused(case):
    flags, message = BAD[case]
    with pytest.raises(UsageError, match=re.escape(message)):
        schedule_kwargs(parse_args(flags), total_steps=4)
