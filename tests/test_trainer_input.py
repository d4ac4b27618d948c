"""The trainer's flags and DeepSpeed configs: bad input is one 'error: ' line, exit 2, nothing written.

Most cases run in-process (train raises UsageError before it writes anything); a few run as real
subprocesses for the one-line / exit-status contract.
"""
import json
import os

import pytest

from conftest import ROOT, run_cli, trainer_args
from mupgpt.config import parse_args
from mupgpt.errors import UsageError
from run_trainer import train

MUL = ["--max_steps", "2"]


def ds_file(tmp_path, content):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(content))
    return ["--backend", "deepspeed", "--zero_stage", "2", "--ds_config", str(path)]


def zero_cfg(**zero):
    return {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "bf16": {"enabled": "auto"}, "zero_optimization": {"stage": 2, **zero}}


# name -> (flags, or a function of tmp_path giving them; words the error line must hold)
BAD_FLAGS = {
    "lr nan": (["--learning_rate", "nan"], "--learning_rate must be positive"),
    "lr inf": (["--learning_rate", "inf"], "--learning_rate must be positive"),
    "log_interval 0": (["--log_interval", "0"], "--log_interval must be at least 1"),
    "eval_iters 0": (["--eval_iters", "0"], "--eval_iters must be at least 1"),
    "seed -1": (["--seed", "-1"], "--seed must be between 0"),
    "beta1 2": (["--adam_beta1", "2"], "--adam_beta1 must be in [0, 1)"),
    "beta2 1": (["--adam_beta2", "1"], "--adam_beta2 must be in [0, 1)"),
    "beta2 -0.1": (["--adam_beta2", "-0.1"], "--adam_beta2 must be in [0, 1)"),
    "eps 0": (["--adam_eps", "0"], "--adam_eps must be positive"),
    "eps nan": (["--adam_eps", "nan"], "--adam_eps must be positive"),
    "weight decay < 0": (["--weight_decay", "-0.1"], "--weight_decay must be 0 or more"),
    "grad clip nan": (["--grad_clip", "nan"], "--grad_clip must be 0 or more"),
    "grad clip < 0": (["--grad_clip", "-1"], "--grad_clip must be 0 or more"),
    "epochs 0": (["--max_steps", "0", "--num_train_epochs", "0"], "--num_train_epochs must be positive"),
    "epochs nan": (["--max_steps", "0", "--num_train_epochs", "nan"], "--num_train_epochs must be positive"),
    "init_std nan": (["--init_std", "nan"], "--init_std must be 0 or more"),
    "init_std < 0": (["--init_std", "-0.02"], "--init_std must be 0 or more"),
    "output_mult < 0": (["--output_mult", "-1"], "--output_mult must be 0 or more"),
    "attn_mult nan": (["--attn_mult", "nan"], "--attn_mult must be 0 or more"),
    "depth_alpha nan": (["--base_n_layer", "1", "--depth_alpha", "nan"], "--depth_alpha must be a finite number"),
    "scheduler bogus": (["--lr_scheduler_type", "cosin"], "not a transformers scheduler (did you mean cosine?)"),
    "base not whole heads": (["--base_width", "24"],
                             "--base_width 24 is not a whole number of heads of --base_head_width 16"),
    "wsd floor above 1": (["--lr_scheduler_type", "warmup_stable_decay", "--min_lr_ratio", "2"],
                          "--min_lr_ratio must be between 0 and 1"),
    "min lr on plain cosine": (["--lr_scheduler_type", "cosine", "--min_lr_ratio", "0.1"], "--min_lr_ratio is for"),
    "wsd longer than the run": (["--lr_scheduler_type", "warmup_stable_decay", "--num_warmup_steps", "1",
                                 "--num_decay_steps", "2"], "exceed the run's 2 steps"),
    "scheduler plateau": (["--lr_scheduler_type", "reduce_lr_on_plateau"], "steps on a validation metric"),
    "max_steps -5": (["--max_steps", "-5"], "--max_steps must be 0 or more"),
    "warmup -5": (["--num_warmup_steps", "-5"], "--num_warmup_steps must be 0 or more"),
    "eval_interval -1": (["--eval_interval", "-1"], "--eval_interval must be 0 or more"),
    "save_interval -1": (["--save_interval", "-1"], "--save_interval must be 0 or more"),
    "keep_checkpoints -1": (["--keep_checkpoints", "-1"], "--keep_checkpoints must be 0 or more"),
    "train_batch_size -8": (["--train_batch_size", "-8"], "--train_batch_size must be 0 or more"),
    "vocab_size -1": (["--vocab_size", "-1"], "--vocab_size must be 0 or more"),
    "seq_len 1e8": (["--seq_len", "100000000"], "--seq_len 100000000 is too long"),
    "device tpu": (["--device", "tpu"], "invalid choice"),
    "output_dir a file": (lambda t: ["--output_dir", str(t / "out" / "f")], "is a file, not a folder"),
    "data_dir a file": (lambda t: ["--data_dir", str(t / "out" / "f")], "is a file, not a folder"),
    "nvme_path not a folder": (lambda t: ["--nvme_path", str(t / "out" / "f")], "--nvme_path"),
    "resume a file": (lambda t: ["--resume", str(t / "out" / "f")], "is a file: give a checkpoints/step_N folder"),
    "ddp without launcher": (["--backend", "ddp"], "launch it with torchrun --nproc_per_node N"),
    "fsdp without launcher": (["--backend", "fsdp"], "launch it with torchrun --nproc_per_node N"),
    "offload without deepspeed": (["--offload", "cpu"],
                                  "--offload cpu is a DeepSpeed setting but the backend is single"),
    "ds_config without deepspeed": (["--ds_config", str(ROOT / "ds_configs" / "zero2.json")],
                                    "--ds_config is a DeepSpeed setting"),
    "ds_config a folder": (lambda t: ["--backend", "deepspeed", "--ds_config", str(t)], "is a folder"),
    "ds_config a list": (lambda t: ds_file(t, [1, 2]), "holds a JSON list, not an object"),
    "ds_config unknown key": (lambda t: ds_file(t, {**zero_cfg(), "zero_optimisation": {}}),
                              "unknown DeepSpeed setting 'zero_optimisation' (did you mean zero_optimization?)"),
    "ds_config removed key": (lambda t: ds_file(t, {**zero_cfg(), "amp": {"enabled": True}}), "'amp' is not supported"),
    "ds_config unknown zero key": (lambda t: ds_file(t, zero_cfg(overlap_com=True)),
                                   "unknown key zero_optimization.overlap_com (did you mean overlap_comm?)"),
    "ds_config unknown offload key": (
        lambda t: ds_file(t, zero_cfg(offload_optimizer={"device": "cpu", "pin_memry": True})),
        "unknown key zero_optimization.offload_optimizer.pin_memry (did you mean pin_memory?)"),
    "ds_config bad zero value": (lambda t: ds_file(t, zero_cfg(overlap_comm="maybe")),
                                 "zero_optimization.overlap_comm"),
    "ds_config offload not an object": (lambda t: ds_file(t, zero_cfg(offload_param="cpu")), "must be an object"),
    "ds_config bf16 not an object": (lambda t: ds_file(t, {**zero_cfg(), "bf16": True}), "'bf16' must be an object"),
    "device cuda without a GPU": (["--device", "cuda"], "no GPU is visible"),
    "n_layer too large to allocate": (["--n_layer", "100000000"], "--n_layer 100000000 makes a model of"),
    "head_width too large to allocate": (["--head_width", "10000000"], "exceed this machine's"),
    "n_head too large to allocate": (["--n_head", "10000000"], "lower --n_head"),
    "output_dir under a file": (lambda t: ["--output_dir", str(t / "out" / "f" / "sub")], "out/f is a file, so"),
}


def flags(case, tmp_path):
    extra, message = BAD_FLAGS[case]
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "f").write_text("keep me")
    return (extra(tmp_path) if callable(extra) else extra), message


@pytest.mark.parametrize("case", BAD_FLAGS)
def test_bad_flag_is_refused_before_anything_is_written(tmp_path, corpus, data_dir, case, monkeypatch):
    if case == "device cuda without a GPU":
        import torch
        if torch.cuda.is_available():
            pytest.skip("a GPU is visible")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    extra, message = flags(case, tmp_path)
    out = tmp_path / "out"
    before = sorted(os.listdir(out))
    with pytest.raises(UsageError) as e:
        train(parse_args(trainer_args(out, corpus, data_dir, *MUL, *extra)))
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert sorted(os.listdir(out)) == before and (out / "f").read_text() == "keep me"


def test_nvme_offload_without_libaio_says_how_to_install_it(tmp_path, corpus, data_dir, monkeypatch):
    """DeepSpeed finds libaio by compiling and linking a test program; with no compiler that can (CC
    that always fails) it sees exactly what a machine without libaio-dev shows it."""
    monkeypatch.setenv("CC", "false")
    out = tmp_path / "out"
    args = trainer_args(out, corpus, data_dir, *MUL, "--backend", "deepspeed", "--offload", "nvme",
                        "--nvme_path", str(tmp_path))
    with pytest.raises(UsageError, match="apt-get install libaio-dev"):
        train(parse_args(args))
    assert not out.exists()


def test_shipped_ds_configs_pass_the_key_checks(tmp_path):
    from mupgpt.engines.deepspeed_config import check_keys, ds_config
    for stage in (0, 1, 2, 3):
        cfg = parse_args(["--zero_stage", str(stage), "--precision", "fp32", "--output_dir", str(tmp_path)])
        ds_config(cfg, "fp32", 8, 1, 64)
    cfg = parse_args(["--offload", "cpu", "--output_dir", str(tmp_path)])
    ds_config(cfg, "bf16", 8, 1, 64)
    cfg = parse_args(["--ds_config", str(ROOT / "ds_configs" / "zero3_offload_cpu_partial.json"), "--output_dir",
                      str(tmp_path)])
    ds_config(cfg, "bf16", 8, 1, 64)
    check_keys(json.load(open(ROOT / "ds_configs" / "zero3_offload_nvme.json")), "nvme")  # its aio check needs libaio


SUBPROCESS = ["log_interval 0", "ddp without launcher", "ds_config unknown zero key", "n_layer too large to allocate"]


@pytest.mark.parametrize("case", SUBPROCESS)
def test_bad_flag_from_the_command_line_is_one_line_and_exit_2(tmp_path, corpus, data_dir, case):
    extra, message = flags(case, tmp_path)
    out = tmp_path / "out"
    res = run_cli(trainer_args(out, corpus, data_dir, *MUL, *extra), timeout=300)
    lines = res.stderr.strip().splitlines()
    assert (res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ")
            and message in lines[0]), res.stderr
    assert sorted(os.listdir(out)) == ["f"]


def test_the_keys_taken_without_scanning_deepspeed_are_deepspeed_keys():
    """check_keys skips its scan of DeepSpeed's sources for the keys we ship; each must be one it reads."""
    from mupgpt.engines.deepspeed_config import SHIPPED_KEYS, deepspeed_keys
    assert SHIPPED_KEYS <= deepspeed_keys()
