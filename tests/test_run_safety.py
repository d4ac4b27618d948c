"""Run lifecycle safety: the run directory stays inside --output_dir, one live run per directory, a
diverging run keeps its good checkpoints, restarts and saves keep metrics honest, stale op build locks."""
import json
import os
import select
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
from mupgpt.engines.op_builds import extensions_root
from mupgpt.errors import UsageError
from run_trainer import train


def run(out, corpus, data_dir, *extra):
    return train(parse_args(trainer_args(out, corpus, data_dir, *extra)))


@pytest.mark.parametrize("name", ["../x", "../../etc", "a/b", "ABS", ".", "my run"])
def test_run_name_cannot_leave_the_output_dir(tmp_path, corpus, data_dir, name):
    out = tmp_path / "a" / "b"
    name = str(tmp_path / "abs") if name == "ABS" else name
    with pytest.raises(UsageError, match="is not a plain folder name"):
        run(out, corpus, data_dir, "--run_name", name, "--max_steps", "1")
    assert sorted(os.listdir(tmp_path)) == []  # nothing written, inside or outside


def test_bad_run_name_is_one_line_and_exit_2(tmp_path, corpus, data_dir):
    res = run_cli(trainer_args(tmp_path / "out", corpus, data_dir, "--run_name", "../escape", "--max_steps", "1"))
    assert (res.returncode == 2 and res.stderr.count("\n") == 1
            and res.stderr.startswith("error: --run_name '../escape'"))
    assert not (tmp_path / "escape").exists() and not (tmp_path / "out").exists()


def test_divergence_keeps_the_good_checkpoints_and_exits_1(tmp_path, corpus, data_dir):
    """The issue's run: NaN at step 3, checkpoints every step, log lines only every 10."""
    res = run_cli(trainer_args(tmp_path, corpus, data_dir, "--run_name", "r", "--max_steps", "30", "--learning_rate",
                               "1e6", "--save_interval", "1", "--keep_checkpoints", "2", "--log_interval", "10"))
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the loss became non-finite at step ")
    d = tmp_path / "r"
    assert json.loads((d / "summary.json").read_text())["diverged"] is True
    assert not (d / "model.safetensors").exists()  # no NaN export
    ckpts = sorted(os.listdir(d / "checkpoints"))
    assert ckpts  # the good ones survive keep-last-K
    for c in ckpts:  # and none holds a non-finite weight
        assert all(torch.isfinite(t).all() for t in load_file(d / "checkpoints" / c / "model.safetensors").values())
    named = last.split("last good checkpoint: ")[1].split(" ")[0]
    assert os.path.isdir(named) and os.path.basename(named) in ckpts
    bad_step = int(last.split("at step ")[1].split(";")[0])
    assert int(os.path.basename(named)[5:]) < bad_step - 1  # its weights gave a finite loss
    # a later checkpoint is kept in the directory: resuming the named one there is a branch, so its own --run_name
    assert ("with a lower --learning_rate and a new --run_name" in last) == (os.path.basename(named) != ckpts[-1])


def test_a_second_live_run_in_the_directory_is_refused(tmp_path, corpus, data_dir):
    args = trainer_args(tmp_path, corpus, data_dir, "--run_name", "r", "--resume", "auto")
    first = subprocess.Popen([sys.executable, str(ROOT / "run_trainer.py"), *args, "--max_steps", "1000000"],
                             cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, text=True)
    try:
        line = ""
        while not line.startswith("step"):  # it has started training
            line = first.stdout.readline()
            assert line, "the first run ended early"
        config = (tmp_path / "r" / "config.json").read_text()
        res = run_cli([*args, "--max_steps", "2"])
        assert res.returncode == 2
        assert res.stderr == (f"error: {tmp_path / 'r'} is in use by another run (pid {first.pid} on {os.uname()[1]}): "
                              "wait for it or pick another --run_name\n")
        assert (tmp_path / "r" / "config.json").read_text() == config and not (tmp_path / "r" / "checkpoints").exists()
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 0
    # released at exit: the next run in the directory goes ahead (on from the stop's checkpoint)
    stopped = int(sorted(os.listdir(tmp_path / "r" / "checkpoints"))[-1][len("step_"):])
    assert run_cli([*args, "--max_steps", str(stopped + 2)]).returncode == 0


def test_a_restart_from_step_0_starts_metrics_afresh(tmp_path, corpus, data_dir):
    run(tmp_path, corpus, data_dir, "--run_name", "r", "--max_steps", "3", "--save", "false")
    run(tmp_path, corpus, data_dir, "--run_name", "r", "--max_steps", "3", "--save", "false", "--resume", "auto")
    assert [json.loads(line)["step"] for line in open(tmp_path / "r" / "metrics.jsonl")] == [1, 2, 3]
    assert len(losses(tmp_path / "r")) == 3


def test_tokens_per_s_is_not_inflated_by_a_checkpoint_between_log_steps(tmp_path, corpus, data_dir):
    """Saves at steps 9 and 18 fall inside the intervals logged at 10 and 20; 15 and 25 have none."""
    run(tmp_path, corpus, data_dir, "--run_name", "r", "--max_steps", "30", "--log_interval", "5", "--save_interval",
        "9")
    tps = {r["step"]: r["tokens_per_s"] for r in map(json.loads, open(tmp_path / "r" / "metrics.jsonl"))}
    steady = max(tps[15], tps[25])
    assert tps[10] < 2 * steady and tps[20] < 2 * steady, tps  # they were 5x and 2.5x


def built_op(name):
    folder = os.path.join(extensions_root(), name)
    if not os.path.exists(os.path.join(folder, f"{name}.so")):
        pytest.skip(f"DeepSpeed's {name} op has not been built on this machine ({folder})")
    return folder


def test_a_stale_op_build_lock_is_cleared_not_waited_on(tmp_path, corpus, data_dir):
    """A DeepSpeed build killed half-way leaves <op>/lock; torch would wait for it forever."""
    ext = tmp_path / "ext"
    shutil.copytree(built_op("deepspeed_shm_comm"), ext / "deepspeed_shm_comm")  # so no real build is needed
    lock = ext / "deepspeed_shm_comm" / "lock"
    lock.touch()
    os.utime(lock, (time.time() - 3600, time.time() - 3600))
    res = run_cli(trainer_args(tmp_path, corpus, data_dir, "--run_name", "r", "--backend", "deepspeed", "--zero_stage",
                               "1", "--max_steps", "1", "--save", "false"),
                  env={"TORCH_EXTENSIONS_DIR": str(ext)}, timeout=150)
    assert res.returncode == 0, res.stderr
    assert f"note: removed a stale DeepSpeed op build lock {lock} (60 min old" in res.stdout
    assert not lock.exists()


def test_a_live_op_build_lock_is_named_before_waiting(tmp_path, corpus, data_dir):
    """A lock some process holds open (a build in progress) is left alone, but the run says what it waits for."""
    ext = tmp_path / "ext"
    shutil.copytree(built_op("deepspeed_shm_comm"), ext / "deepspeed_shm_comm")
    lock = ext / "deepspeed_shm_comm" / "lock"
    fd = os.open(lock, os.O_CREAT | os.O_EXCL)  # as torch's FileBaton holds it while building
    args = trainer_args(tmp_path, corpus, data_dir, "--run_name", "r", "--backend", "deepspeed", "--max_steps", "1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "run_trainer.py"), *args], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": str(ext)})
    try:
        assert select.select([proc.stdout], [], [], 90)[0], "the run waited silently"
        line = proc.stdout.readline()
        assert line.startswith(f"note: DeepSpeed's op build waits while {lock} exists")
        assert "if no other process is building DeepSpeed's ops, delete it" in line
        assert lock.exists() and proc.poll() is None
    finally:
        proc.kill()
        proc.communicate()
        os.close(fd)


def test_resume_auto_on_a_finished_run_leaves_it_finished(tmp_path, corpus, data_dir):
    args = trainer_args(tmp_path, corpus, data_dir, "--run_name", "r", "--max_steps", "4", "--save_interval", "2")
    assert run_cli(args).returncode == 0
    d = tmp_path / "r"
    before = {f: (d / f).read_bytes() for f in ("summary.json", "metrics.jsonl", "config.json", "model.safetensors")}
    for resume in ("auto", d / "checkpoints" / "step_00000004"):  # in this process: nothing trains
        res = run_main([*args, "--resume", resume])
        finished = f"{d} holds a finished run (4 steps): nothing to resume, it is left as it is"
        assert res.returncode == 0 and finished in res.stdout, res.stderr
        assert "Traceback" not in res.stderr
        assert {f: (d / f).read_bytes() for f in before} == before
    os.remove(d / "summary.json")  # a checkpoint past the run's length is refused, not a run of no steps
    res = run_main([*args[:-4], "--max_steps", "2", "--save_interval", "2", "--resume", "auto"])
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and "is at step 4, past this run's 2 steps" in lines[0], res.stderr
    assert not (d / "summary.json").exists()


def test_a_branch_from_an_earlier_checkpoint_of_the_run_directory_is_refused(tmp_path, corpus, data_dir):
    """Resuming step 2 of a run that went on to step 6 would start a second history in the directory:
    keep-last-K would remove the branch's checkpoints and --resume auto follow the old one."""
    args = trainer_args(tmp_path, corpus, data_dir, "--run_name", "r", "--max_steps", "6", "--save_interval", "2",
                        "--keep_checkpoints", "0")
    assert run_cli(args).returncode == 0
    d = tmp_path / "r"
    os.remove(d / "summary.json")  # stopped, not finished: a branch is refused all the same
    before = sorted(p.name for p in d.rglob("*"))
    res = run_main([*args[:-6], "--max_steps", "8", "--resume", d / "checkpoints" / "step_00000002"])
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-3000:]
    assert lines[0] == (f"error: --resume {d}/checkpoints/step_00000002 is step 2 of {d}, which already went on to "
                        "step 6: to branch from it, keep --resume and pass a new --run_name or --output_dir (a run "
                        "directory holds one history)")
    assert sorted(p.name for p in d.rglob("*")) == before
    res = run_cli([*trainer_args(tmp_path, corpus, data_dir, "--run_name", "branch", "--max_steps", "8"),
                   "--resume", d / "checkpoints" / "step_00000002"])  # the branch in its own directory
    assert res.returncode == 0 and "at step 2" in res.stdout, res.stderr[-3000:]


def test_a_torn_or_damaged_metrics_file_is_repaired_with_a_note(tmp_path, corpus, data_dir):
    """A half line left by a full disk or a kill is dropped (one note); other unreadable lines are dropped
    with a warning and the file as it was kept beside. The run directory always starts again."""
    args = trainer_args(tmp_path, corpus, data_dir, "--run_name", "r", "--max_steps", "4", "--save_interval", "2")
    assert run_cli(args).returncode == 0
    d = tmp_path / "r"
    os.remove(d / "summary.json")
    shutil.rmtree(d / "checkpoints" / "step_00000004")
    with open(d / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # torn
    res = run_cli([*args, "--resume", "auto"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"note: {d}/metrics.jsonl ended mid-record (a write cut short): dropped its torn last line" in res.stdout
    assert [json.loads(line)["step"] for line in open(d / "metrics.jsonl")] == [1, 2, 3, 4]
    os.remove(d / "summary.json")
    rows = (d / "metrics.jsonl").read_text().splitlines()
    damaged = "\n".join([rows[0], "garbage", *rows[1:]]) + "\n"
    (d / "metrics.jsonl").write_text(damaged)
    res = run_cli([*args, "--resume", "auto"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert (f"warning: {d}/metrics.jsonl had unreadable lines (2): dropped them; the file as it was is kept as "
            f"{d}/metrics.jsonl.damaged") in res.stdout
    assert (d / "metrics.jsonl.damaged").read_text() == damaged
    assert [json.loads(line)["step"] for line in open(d / "metrics.jsonl")] == [1, 2, 3, 4]


@pytest.mark.parametrize("where", ["under a file", "read-only"])
def test_an_output_dir_that_cannot_be_written_is_one_line(tmp_path, corpus, data_dir, where):
    if where == "under a file":
        (tmp_path / "f").write_text("x")
        out, words = tmp_path / "f" / "out", f"{tmp_path}/f is a file"
    else:
        out = tmp_path / "ro"
        out.mkdir()
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M,ro", "tmpfs", str(out)], capture_output=True,
                             text=True)
        if res.returncode != 0:
            pytest.skip(f"cannot mount a read-only tmpfs here ({res.stderr.strip()})")
        words = f"{out} is not writable"
    try:
        res = run_main(trainer_args(out, corpus, data_dir, "--run_name", "r", "--max_steps", "2"))
    finally:
        if where == "read-only":
            subprocess.run(["umount", str(out)], check=True)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and words in lines[0] and "--output_dir" in lines[0], res.stderr


def test_a_resume_at_the_last_step_writes_the_summary_with_its_losses(tmp_path, corpus, data_dir):
    """Killed after the last checkpoint but before summary.json: the resume runs no step and the summary
    holds the losses logged before, not NaN."""
    args = trainer_args(tmp_path, corpus, data_dir, "--run_name", "r", "--max_steps", "4", "--save_interval", "2",
                        "--eval_interval", "2")
    assert run_cli(args).returncode == 0
    d = tmp_path / "r"
    want = json.loads((d / "summary.json").read_text())
    os.remove(d / "summary.json")
    res = run_cli([*args, "--resume", "auto"])
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads((d / "summary.json").read_text())
    assert got["completed"] and got["steps"] == 4
    assert (got["final_train_loss"], got["final_val_loss"]) == (want["final_train_loss"], want["final_val_loss"])


def test_a_start_refused_after_the_engine_is_built_leaves_no_run_directory(tmp_path, corpus, data_dir):
    """A checkpoint without consolidated weights, resumed on another backend, is refused once the engine
    (which writes opt_config.json) exists: the new run directory goes with the refusal."""
    from mupgpt import checkpoint
    args = trainer_args(tmp_path, corpus, data_dir, "--max_steps", "2")
    assert run_cli([*args, "--run_name", "src"]).returncode == 0
    folder = tmp_path / "src" / "checkpoints" / "step_00000002"
    os.remove(folder / "model.safetensors")
    os.remove(folder / "manifest.json")
    checkpoint.write_manifest(str(folder), 2)
    res = run_cli([*args, "--run_name", "new", "--backend", "deepspeed", "--zero_stage", "1", "--resume", folder])
    lines = [line for line in res.stderr.strip().splitlines() if not line.startswith("[20")]
    assert res.returncode == 2 and len(lines) == 1 and "has no model.safetensors" in lines[0], res.stderr[-3000:]
    assert not (tmp_path / "new").exists()
