"""The trainer end to end: loss falls, outputs, exact resume, preemption, DDP, and one-line errors."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, losses, run_cli, run_main, trainer_args
from mupgpt.config import parse_args
from run_trainer import train


def run(out, corpus, data_dir, *extra):
    return train(parse_args(trainer_args(out, corpus, data_dir, *extra)))


def test_loss_falls_on_the_embedded_corpus(tmp_path):
    summary = train(parse_args(["--dataset", "stdlib", "--tokenizer", "bytes", "--data_dir", str(tmp_path / "data"),
                                "--output_dir", str(tmp_path), "--run_name", "r", "--max_steps", "40",
                                "--n_layer", "1", "--seq_len", "64", "--log_interval", "1", "--eval_iters", "2"]))
    run_losses = losses(tmp_path / "r")
    assert run_losses[0] == pytest.approx(5.768, abs=0.01)  # ln(320): the zero-init readout starts uniform
    assert summary["final_train_loss"] < run_losses[0] - 2.0
    assert summary["final_val_loss"] < run_losses[0] - 2.0


def test_run_directory_holds_every_output(tmp_path, corpus, data_dir):
    run(tmp_path, corpus, data_dir, "--run_name", "r", "--max_steps", "6", "--eval_interval", "3")
    d = tmp_path / "r"
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["args"]["head_width"] == 16 and cfg["resolved"]["backend"] == "single"
    opt = json.loads((d / "opt_config.json").read_text())
    assert opt["h.0.mlp.c_fc.weight"]["lr"] == opt["wte.weight"]["lr"]  # m = 1 here
    rows = [json.loads(line) for line in open(d / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert {"step", "loss", "lr", "tokens", "tokens_per_s", "mfu"} <= set(rows[0])
    assert "val_loss" in rows[2] and "val_loss" in rows[5] and "val_loss" not in rows[0]
    summary = json.loads((d / "summary.json").read_text())
    for key in ("final_train_loss", "best_val_loss", "final_val_loss", "steps", "tokens", "wall_s",
                "peak_host_bytes_per_rank"):
        assert key in summary
    exported = load_file(d / "model.safetensors")
    assert "lm_head.weight" in exported and not any(k.startswith(("_orig_mod", "module.")) for k in exported)


def test_resume_continues_bit_for_bit(tmp_path, corpus, data_dir):
    extra = ["--max_steps", "8", "--lr_scheduler_type", "cosine", "--num_warmup_steps", "2", "--weight_decay", "0.1"]
    run(tmp_path, corpus, data_dir, "--run_name", "straight", *extra)
    run(tmp_path, corpus, data_dir, "--run_name", "split", "--save_interval", "4", *extra)
    split = tmp_path / "split"
    shutil.rmtree(split / "checkpoints" / "step_00000008")  # as if the run had stopped after step 4
    os.remove(split / "summary.json")
    run(tmp_path, corpus, data_dir, "--run_name", "split", "--resume", "auto", *extra)
    assert losses(split) == losses(tmp_path / "straight")
    a, b = load_file(split / "model.safetensors"), load_file(tmp_path / "straight" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoints_keep_the_last_k_and_skip_incomplete_ones(tmp_path, corpus, data_dir):
    run(tmp_path, corpus, data_dir, "--run_name", "r", "--max_steps", "8", "--save_interval", "2",
        "--keep_checkpoints", "2")
    ckpts = sorted(os.listdir(tmp_path / "r" / "checkpoints"))
    assert ckpts == ["step_00000006", "step_00000008"]
    # a save killed half-way leaves only a .tmp folder: resume takes the previous complete one
    os.rename(tmp_path / "r" / "checkpoints" / "step_00000008", tmp_path / "r" / "checkpoints" / "step_00000008.tmp")
    from mupgpt.checkpoint import find_resume
    assert find_resume("auto", str(tmp_path / "r")).endswith("step_00000006")


def test_sigterm_saves_and_the_resumed_run_matches(tmp_path, corpus, data_dir):
    """A preempted job: SIGTERM mid-run saves a checkpoint and exits 0; the resumed run is exact."""
    args = trainer_args(tmp_path, corpus, data_dir, "--run_name", "pre")  # constant LR: any max_steps
    proc = subprocess.Popen([sys.executable, str(ROOT / "run_trainer.py"), *args, "--max_steps", "1000000"],
                            cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "pre" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "stopped at step" in out and "Traceback" not in out, out[-2000:]
    stopped_at = len(losses(tmp_path / "pre"))
    assert stopped_at >= 5 and not (tmp_path / "pre" / "summary.json").exists()
    total = str(stopped_at + 5)
    resumed = run_cli([*args, "--resume", "auto", "--max_steps", total])
    assert resumed.returncode == 0 and f"at step {stopped_at}" in resumed.stdout, resumed.stderr
    straight = [*args[:-1], "straight", "--max_steps", total]  # same thread count as the runs above
    assert run_cli(straight).returncode == 0
    assert losses(tmp_path / "pre") == losses(tmp_path / "straight")


def test_ddp_on_two_ranks_matches_one_process(tmp_path, corpus, data_dir):
    common = ["--max_steps", "5", "--train_batch_size", "16"]  # 2 micro batches per rank: no_sync, then sync
    run(tmp_path, corpus, data_dir, "--run_name", "one", *common)
    res = run_cli(trainer_args(tmp_path, corpus, data_dir, "--run_name", "ddp", "--backend", "ddp", *common),
                  launcher=(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                            "--master_port", "29631"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((tmp_path / "ddp" / "config.json").read_text())["resolved"]["world_size"] == 2
    assert losses(tmp_path / "ddp") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)


BAD_INPUTS = {
    "batch does not divide": (["--train_batch_size", "6"], "not a multiple of --per_device_train_batch_size"),
    "odd width": (["--head_width", "7"], "must be even"),
    "zero stage": (["--zero_stage", "5"], "--zero_stage must be 0, 1, 2 or 3"),
    "unknown dataset": (["--dataset", "no such dataset!"], "unknown dataset"),
    "missing resume": (["--resume", "/nonexistent/ckpt"], "no such checkpoint"),
    "unknown flag": (["--lerning_rate", "1"], "unrecognized arguments"),
    "bad choice": (["--parametrization", "ntk"], "invalid choice"),
    "vocabulary too small": (["--vocab_size", "100"], "smaller than the tokenizer's 257"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_and_exit_2(tmp_path, corpus, data_dir, case):
    """The trainer's main() in this process; argparse's own refusal also in a real process, end to end."""
    extra, message = BAD_INPUTS[case]
    args = trainer_args(tmp_path, corpus, data_dir, "--max_steps", "2", *extra)
    res = run_cli(args) if case == "unknown flag" else run_main(args)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.stderr
    assert not any(tmp_path.iterdir()), list(tmp_path.iterdir())  # nothing written, not even an empty run directory


def test_bad_data_and_checkpoints_are_one_line_and_lose_nothing(tmp_path, corpus, data_dir):
    run(tmp_path, corpus, data_dir, "--run_name", "r", "--max_steps", "4", "--save_interval", "2")
    before = (tmp_path / "r" / "metrics.jsonl").read_text()
    cases = [
        (["--run_name", "r"],
         "already holds a finished run (4 steps): pick another --run_name"),  # finished: resume is no use
        (["--run_name", "x", "--data_dir", str(tmp_path / "empty"), "--dataset", str(tmp_path / "nofiles")], "no such"),
    ]
    ckpt = tmp_path / "r" / "checkpoints" / "step_00000004"
    (ckpt / "trainer.json").write_text("{not json")
    cases.append((["--run_name", "r2", "--resume", str(ckpt)], "not a complete checkpoint"))
    for extra, message in cases:  # in this process
        res = run_main(trainer_args(tmp_path, corpus, data_dir, "--max_steps", "4", *extra))
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1 and message in lines[0], res.stderr
    assert (tmp_path / "r" / "metrics.jsonl").read_text() == before


def test_prepare_and_sample_scripts(tmp_path, corpus, data_dir):
    import subprocess
    res = subprocess.run([sys.executable, "scripts/prepare_data.py", "--dataset", str(corpus), "--tokenizer", "bytes",
                          "--data_dir", str(tmp_path / "d")], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    meta = json.loads(res.stdout[res.stdout.index("{"):])
    assert meta["tokenizer"] == "bytes" and os.path.exists(os.path.join(meta["path"], "train.bin"))
    run(tmp_path, corpus, data_dir, "--run_name", "r", "--max_steps", "30")
    res = subprocess.run([sys.executable, "scripts/sample.py", str(tmp_path / "r"), "--prompt", "def ",
                          "--max_new_tokens", "40"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.startswith("def ") and len(res.stdout) > 20, res.stderr
    res = subprocess.run([sys.executable, "scripts/sample.py", str(tmp_path / "nothing")], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.count("\n") == 1


def test_wandb_without_a_key_logs_offline_and_never_prompts(tmp_path, corpus, data_dir):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), OMP_NUM_THREADS="1")  # no ~/.netrc with a key either
    res = subprocess.run([sys.executable, str(ROOT / "run_trainer.py"),
                          *trainer_args(tmp_path, corpus, data_dir, "--run_name", "w", "--max_steps", "3", "--wandb")],
                         cwd=ROOT, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    runs = list((tmp_path / "w" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_benchmark_runs_write_no_checkpoints_and_keep_a_larger_vocabulary(tmp_path, corpus, data_dir):
    summary = run(tmp_path, corpus, data_dir, "--run_name", "b", "--max_steps", "3", "--save", "false",
                  "--vocab_size", "1000")
    run_dir = tmp_path / "b"
    assert summary["completed"] and (run_dir / "summary.json").exists()
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "model.safetensors").exists()
    assert json.loads((run_dir / "config.json").read_text())["resolved"]["model"]["vocab_size"] == 1024


def test_default_run_names_differ_by_backend_and_length_and_say_what_to_do(tmp_path, corpus, data_dir):
    """The README's runs in a row: each its own directory; a second start says what is there."""
    common = ["--max_steps", "3", "--save_interval", "2"]
    run(tmp_path, corpus, data_dir, *common)
    run(tmp_path, corpus, data_dir, "--max_steps", "4")  # another length: another directory
    ds = run_cli(trainer_args(tmp_path, corpus, data_dir, "--backend", "deepspeed", "--zero_stage", "1", *common))
    assert ds.returncode == 0, ds.stderr  # another engine; and DeepSpeed's noise is not the user's to read:
    assert "Warning" not in ds.stderr and "WARNING" not in ds.stderr and "accelerator" not in ds.stderr, ds.stderr
    assert sorted(os.listdir(tmp_path)) == ["mup_2x16_d1_lr0.003_s1234_single_3steps",
                                            "mup_2x16_d1_lr0.003_s1234_single_4steps",
                                            "mup_2x16_d1_lr0.003_s1234_zero1_3steps"]
    finished = run_main(trainer_args(tmp_path, corpus, data_dir, *common))
    assert (finished.returncode == 2
            and "already holds a finished run (3 steps): pick another --run_name" in finished.stderr)
    unfinished = tmp_path / "mup_2x16_d1_lr0.003_s1234_single_3steps"
    os.remove(unfinished / "summary.json")  # as if stopped after the step-2 checkpoint
    res = run_main(trainer_args(tmp_path, corpus, data_dir, *common))
    assert res.returncode == 2 and "holds an unfinished run: pass --resume auto to continue it" in res.stderr
    resumed = run_cli(trainer_args(tmp_path, corpus, data_dir, *common, "--resume", "auto"))
    assert resumed.returncode == 0 and "at step" in resumed.stdout, resumed.stderr
