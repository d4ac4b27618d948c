"""A checkpoint is untrusted input: planted code never runs, damage is found before anything changes,
a full disk or an interrupted save leaves no .tmp behind and keeps the previous checkpoint."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, losses, run_cli, run_main, trainer_args
from mupgpt import checkpoint

TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", "29661")
BACKENDS = {"single": ((sys.executable,), []),
            "deepspeed": ((sys.executable,), ["--backend", "deepspeed", "--zero_stage", "2"]),
            "fsdp": (TORCHRUN, ["--backend", "fsdp"])}


class Payload:
    """Unpickling this creates a file: the proof that code in a checkpoint ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def error_lines(res):
    return [line for line in res.stderr.strip().splitlines() if not line.startswith("[20")]  # DeepSpeed's log lines


def train(out, corpus, data_dir, name, *extra, launcher=(sys.executable,)):
    res = run_cli(trainer_args(out, corpus, data_dir, "--run_name", name, *extra), launcher=launcher)
    assert res.returncode == 0, res.stderr[-3000:]
    return out / name


def plant(path, marker):
    """Replace a pickle file with one whose unpickling runs code; the manifest is rewritten to match,
    as an attacker who hands out the whole folder would."""
    import pickle

    import torch
    if path.name == ".metadata":
        path.write_bytes(pickle.dumps(Payload(str(marker))))
    else:
        torch.save({"state": Payload(str(marker))}, path)
    folder = next(p for p in path.parents if p.name.startswith("step_"))
    checkpoint.write_manifest(str(folder), int(folder.name[5:]))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus, data_dir):
    """A 2-step run with its checkpoint per backend (made on first use); each test gets a copy."""
    made = {}

    def get(backend, dest):
        if backend not in made:
            launcher, flags = BACKENDS[backend]
            made[backend] = train(tmp_path_factory.mktemp(backend), corpus, data_dir, "r", "--max_steps", "2", *flags,
                                  launcher=launcher)
        shutil.copytree(made[backend], dest / "r")
        return dest / "r"
    return get


def resume(out, corpus, data_dir, backend):
    launcher, flags = BACKENDS[backend]
    return run_cli(trainer_args(out, corpus, data_dir, "--run_name", "r", "--max_steps", "4", "--resume", "auto",
                                *flags),
                   launcher=launcher)


@pytest.mark.parametrize("backend,files", [("single", ["optimizer.pt"]),
                                           ("deepspeed", ["deepspeed/mp_rank_00_model_states.pt",
                                                          "deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt"]),
                                           ("fsdp", ["dcp/.metadata"])])
def test_planted_code_in_a_checkpoint_never_runs(tmp_path, trained, corpus, data_dir, backend, files):
    for file in files:
        shutil.rmtree(tmp_path, ignore_errors=True)
        tmp_path.mkdir()
        run_dir = trained(backend, tmp_path)
        marker = tmp_path / "payload_ran"
        plant(run_dir / "checkpoints" / "step_00000002" / file, marker)
        before = (run_dir / "metrics.jsonl").read_text()
        res = resume(tmp_path, corpus, data_dir, backend)
        assert not marker.exists(), file
        lines = [line for line in error_lines(res) if line.startswith("error: ")]
        assert (res.returncode != 0 and len(lines) == 1 and file in lines[0]
                and "not tensors or plain data" in lines[0]), res.stderr[-3000:]
        if backend != "fsdp":  # torchrun adds its report of the failed rank (exit 2) to any rank's error
            assert res.returncode == 2 and len(error_lines(res)) == 1, res.stderr[-3000:]
        assert (run_dir / "metrics.jsonl").read_text() == before


def test_fsdp_values_saved_as_bytes_load_as_plain_data_only(tmp_path, trained, corpus, data_dir):
    """DCP stores non-tensor optimizer values (LRs, betas) as torch-saved bytes and loads them with
    weights_only=False; a planted object among them must not run either."""
    run_dir = trained("fsdp", tmp_path)
    ckpt = run_dir / "checkpoints" / "step_00000002"
    marker = tmp_path / "payload_ran"
    rewrite = f"""
import sys, torch, torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from test_checkpoint_trust import Payload  # found in the working folder, tests/
dcp_to_torch_save({str(ckpt / 'dcp')!r}, {str(tmp_path / 'full.pt')!r})
state = torch.load({str(tmp_path / 'full.pt')!r}, weights_only=False)
state["optimizer"]["param_groups"][0]["lr"] = Payload({str(marker)!r})
import shutil; shutil.rmtree({str(ckpt / 'dcp')!r})
dcp.save(state, checkpoint_id={str(ckpt / 'dcp')!r}, no_dist=True)
"""
    res = subprocess.run([sys.executable, "-c", rewrite], cwd=ROOT / "tests", capture_output=True, text=True,
                         timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    checkpoint.write_manifest(str(ckpt), 2)
    res = resume(tmp_path, corpus, data_dir, "fsdp")
    assert not marker.exists()
    lines = [line for line in error_lines(res) if line.startswith("error: ")]
    assert (res.returncode != 0 and len(lines) == 1 and "param_groups" in lines[0]
            and "not tensors or plain data" in lines[0]), res.stderr[-3000:]


def flip(path, n=16):
    data = bytearray(path.read_bytes())
    for i in range(n):
        data[len(data) // 2 + i] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "flipped bytes in the weights": ("model.safetensors", flip, "sha256"),
    "flipped bytes in the optimizer": ("optimizer.pt", flip, "sha256"),
    "truncated weights": ("model.safetensors", lambda p: p.write_bytes(p.read_bytes()[:1000]), "1000 bytes"),
    "missing rng state": ("rng_rank0.pt", lambda p: p.unlink(), "missing"),
    "edited step": ("trainer.json", lambda p: p.write_text(p.read_text().replace('"step": 6', '"step": 10')),
                    "says step 10"),
    "added file": ("extra.pt", lambda p: p.write_bytes(b"x"), "not in the manifest"),
    "manifest in another format": ("manifest.json", lambda p: p.write_text(json.dumps(
        {"step": 6, "files": {f: "0" * 64 for f in json.loads(p.read_text())["files"]}})),
                                   "not in this version's format"),
    "manifest files a list": ("manifest.json", lambda p: p.write_text('{"step": 6, "files": []}'),
                              "this version's format"),
    "manifest a list": ("manifest.json", lambda p: p.write_text("[]"), "unreadable"),
    "manifest cut short": ("manifest.json", lambda p: p.write_text(p.read_text()[:50]), "unreadable"),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory, corpus, data_dir):
    """A run with checkpoints at steps 2, 4 and 6, and the straight 8-step run to compare with (constant LR)."""
    out = tmp_path_factory.mktemp("saved")
    train(out, corpus, data_dir, "straight", "--max_steps", "8")
    return out, train(out, corpus, data_dir, "r", "--max_steps", "6", "--save_interval", "2", "--keep_checkpoints", "0")


@pytest.mark.parametrize("case", DAMAGE)
def test_damage_is_found_and_auto_resume_takes_the_previous_checkpoint(tmp_path, saved, case, capsys):
    _, run_dir = saved
    copy = tmp_path / "r"
    shutil.copytree(run_dir, copy)
    file, damage, why = DAMAGE[case]
    damage(copy / "checkpoints" / "step_00000006" / file)
    assert checkpoint.find_resume("auto", str(copy)).endswith("step_00000004")
    out = capsys.readouterr().out
    assert (f"checkpoint step_00000006 is damaged ({file}: " in out and why in out
            and "resuming from step_00000004" in out)
    with pytest.raises(checkpoint.UsageError,
                       match=f"step_00000006 is not a complete checkpoint, it is damaged \\({file}: "):
        checkpoint.find_resume(str(copy / "checkpoints" / "step_00000006"), str(copy))


def test_a_damaged_checkpoint_is_skipped_and_the_resume_stays_exact(tmp_path, saved, corpus, data_dir):
    out, run_dir = saved
    shutil.copytree(run_dir, tmp_path / "r")
    flip(tmp_path / "r" / "checkpoints" / "step_00000006" / "optimizer.pt")
    res = run_cli(trainer_args(tmp_path, corpus, data_dir, "--run_name", "r", "--max_steps", "8", "--resume", "auto"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "checkpoint step_00000006 is damaged (optimizer.pt: " in res.stdout and "at step 4" in res.stdout
    assert losses(tmp_path / "r") == losses(out / "straight")
    # the skipped one leaves the run's history (keep-last-K would keep it in place of new ones), kept for a look
    assert f"moved the skipped checkpoint aside to {tmp_path / 'r'}/checkpoints/step_00000006.damaged" in res.stdout
    assert (tmp_path / "r" / "checkpoints" / "step_00000006.damaged" / "optimizer.pt").exists()


def test_a_damaged_checkpoint_named_or_all_damaged_is_one_line_and_changes_nothing(tmp_path, saved, corpus, data_dir):
    _, run_dir = saved
    copy = tmp_path / "r"
    shutil.copytree(run_dir, copy)
    for step in (2, 4, 6):
        flip(copy / "checkpoints" / f"step_{step:08d}" / "model.safetensors")
    before = {f: (copy / f).read_bytes() for f in ("metrics.jsonl", "config.json", "opt_config.json")}
    for resume, message in ((str(copy / "checkpoints" / "step_00000004"),
                             "step_00000004 is not a complete checkpoint, it is damaged (model.safetensors: "),
                            ("auto", "every checkpoint in")):
        res = run_main(trainer_args(tmp_path, corpus, data_dir, "--run_name", "r", "--max_steps", "8", "--resume",
                                    resume))
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1 and message in lines[0], res.stderr[-3000:]
    assert {f: (copy / f).read_bytes() for f in before} == before


def test_another_model_shape_is_one_line_naming_the_flags(tmp_path, saved, corpus, data_dir):
    _, run_dir = saved
    shutil.copytree(run_dir, tmp_path / "r")
    before = {f: (tmp_path / "r" / f).read_bytes() for f in ("metrics.jsonl", "config.json", "opt_config.json")}
    res = run_main([*trainer_args(tmp_path, corpus, data_dir, "--run_name", "r", "--max_steps", "8", "--resume",
                                  "auto"), "--head_width", "32", "--n_layer", "2"])
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-3000:]
    assert "--head_width 32 (the checkpoint has 16)" in lines[0] and "--n_layer 2 (the checkpoint has 1)" in lines[0]
    assert {f: (tmp_path / "r" / f).read_bytes() for f in before} == before


def test_a_checkpoint_without_a_manifest_resumes_with_a_note(tmp_path, saved, corpus, data_dir):
    """Written before checkpoints carried a manifest: accepted (its pickles load as plain data only), unchecked."""
    out, run_dir = saved
    shutil.copytree(run_dir, tmp_path / "r")
    os.remove(tmp_path / "r" / "checkpoints" / "step_00000006" / "manifest.json")
    res = run_cli(trainer_args(tmp_path, corpus, data_dir, "--run_name", "r", "--max_steps", "8", "--resume", "auto"))
    assert (res.returncode == 0 and "has no manifest.json" in res.stdout
            and "at step 6" in res.stdout), res.stderr[-3000:]
    assert losses(tmp_path / "r") == losses(out / "straight")


def test_an_unchecked_trainer_json_of_another_shape_is_one_line(tmp_path, saved, corpus, data_dir):
    """Without a manifest nothing checks trainer.json's contents: a step written as a string resumes, a
    model_config that is not an object is one line."""
    _, run_dir = saved
    shutil.copytree(run_dir, tmp_path / "r")
    folder = tmp_path / "r" / "checkpoints" / "step_00000006"
    os.remove(folder / "manifest.json")
    state = json.loads((folder / "trainer.json").read_text())
    (folder / "trainer.json").write_text(json.dumps({**state, "step": "6"}))
    args = trainer_args(tmp_path, corpus, data_dir, "--run_name", "r", "--max_steps", "8", "--resume", str(folder))
    res = run_cli(args)
    assert res.returncode == 0 and "at step 6" in res.stdout, res.stderr[-3000:]
    shutil.rmtree(tmp_path / "r")
    shutil.copytree(run_dir, tmp_path / "r")
    os.remove(folder / "manifest.json")
    (folder / "trainer.json").write_text(json.dumps({**state, "model_config": [1, 2]}))
    res = run_main(args)
    lines = res.stderr.strip().splitlines()
    assert (res.returncode == 2 and len(lines) == 1
            and "is not a complete checkpoint (trainer.json" in lines[0]), res.stderr


def test_stale_tmp_folders_go_at_the_next_save_and_an_interrupted_save_removes_its_own(tmp_path, corpus, data_dir):
    from mupgpt.world import World
    run_dir = tmp_path / "r"
    stale = run_dir / "checkpoints" / "step_00000003.tmp"  # a kill -9 during a save
    stale.mkdir(parents=True)
    (stale / "optimizer.pt").write_bytes(b"partial")

    class Interrupted:  # an engine whose save is cut short by a second Ctrl-C
        world = World()

        def save(self, path):
            with open(os.path.join(path, "model.safetensors"), "wb") as f:
                f.write(b"half")
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(Interrupted(), str(run_dir), {"step": 4}, keep=2)
    assert os.listdir(run_dir / "checkpoints") == []


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3M", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({res.stderr.strip()}): the full-disk test needs root and mount")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_a_full_disk_at_save_is_one_line_keeps_the_previous_checkpoint_and_cleans_up(small_disk, corpus, data_dir):
    run_dir = train(small_disk, corpus, data_dir, "r", "--max_steps", "4", "--save_interval", "2")
    size = sum(f.stat().st_size for f in (run_dir / "checkpoints" / "step_00000004").iterdir())
    free = shutil.disk_usage(small_disk).free
    os.remove(run_dir / "summary.json")
    (small_disk / "ballast").write_bytes(b"\0" * (free - size // 2))  # room for half a checkpoint
    before = sorted(os.listdir(run_dir / "checkpoints"))
    res = run_cli(trainer_args(small_disk, corpus, data_dir, "--run_name", "r", "--max_steps", "6", "--save_interval",
                               "2", "--resume", "auto"))
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and "the disk is full" in lines[0], res.stderr[-3000:]
    assert "step_00000004 is kept" in lines[0]
    assert sorted(os.listdir(run_dir / "checkpoints")) == before  # no .tmp left, nothing removed
    assert checkpoint.verify(str(run_dir / "checkpoints" / "step_00000004"))
    os.remove(small_disk / "ballast")
    res = run_cli(trainer_args(small_disk, corpus, data_dir, "--run_name", "r", "--max_steps", "6", "--save_interval",
                               "2", "--resume", "auto"))
    assert res.returncode == 0 and "at step 4" in res.stdout, res.stderr[-3000:]


def test_a_full_disk_at_the_final_export_is_one_line_and_names_the_checkpoint(small_disk, corpus, data_dir):
    """The final model.safetensors is written beside and renamed into place: a full disk leaves no half
    file, is one line, and points at the last checkpoint, which holds the same weights."""
    first = train(small_disk, corpus, data_dir, "sizes", "--max_steps", "2")
    model = (first / "model.safetensors").stat().st_size
    files = [f for f in first.rglob("*") if f.is_file() and f.name != "model.safetensors"]
    rest = sum(f.stat().st_size for f in files)
    shutil.rmtree(first)
    slack = 4096 * (len(files) + 40)  # tmpfs counts whole pages (files and folders), plus metrics written later
    (small_disk / "ballast").write_bytes(b"\0" * (shutil.disk_usage(small_disk).free - rest - slack - model // 2))
    res = run_cli(trainer_args(small_disk, corpus, data_dir, "--run_name", "r", "--max_steps", "2"))
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-3000:]
    assert "the disk is full: could not write the final model.safetensors" in lines[0]
    run_dir = small_disk / "r"
    assert f"the last checkpoint {run_dir}/checkpoints/step_00000002 holds the trained weights" in lines[0]
    assert sorted(p.name for p in run_dir.iterdir() if "model" in p.name) == []  # no half file, no .tmp
    assert checkpoint.verify(str(run_dir / "checkpoints" / "step_00000002"))


@pytest.mark.parametrize("backend", ["deepspeed", "ddp"])
def test_a_resume_on_another_backend_continues_the_lr_schedule(tmp_path, corpus, data_dir, backend):
    """The schedule is a function of the step: resumed under DeepSpeed ZeRO-1 (one process) or DDP on two
    ranks from a single-process checkpoint (fresh optimizer state), every logged LR is the straight run's."""
    sched = ["--max_steps", "12", "--num_warmup_steps", "4", "--lr_scheduler_type", "linear", "--save_interval", "6"]
    straight = train(tmp_path, corpus, data_dir, "straight", *sched)
    how = {"deepspeed": ((sys.executable,), ["--backend", "deepspeed", "--zero_stage", "1"]),
           "ddp": ((sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29663"),
                   ["--backend", "ddp"])}
    launcher, flags = how[backend]
    res = run_cli(trainer_args(tmp_path, corpus, data_dir, "--run_name", "ds", *sched, *flags,
                               "--resume", straight / "checkpoints" / "step_00000006"), launcher=launcher)
    assert res.returncode == 0 and "the LR schedule continues from step 6" in res.stdout, res.stderr[-3000:]
    lrs = dict(zip(losses(tmp_path / "ds", "step"), losses(tmp_path / "ds", "lr")))
    want = dict(zip(losses(straight, "step"), losses(straight, "lr")))
    assert sorted(lrs) == list(range(7, 13)) and lrs == pytest.approx({s: want[s] for s in lrs})


def test_a_full_disk_while_logging_metrics_is_one_line_and_the_directory_starts_again(small_disk, corpus, data_dir):
    """metrics.jsonl is appended row by row: a full disk is one line, the file ends with the last whole row,
    and after freeing space the run directory starts again."""
    (small_disk / "ballast").write_bytes(b"\0" * (shutil.disk_usage(small_disk).free - 6 * 4096))
    args = trainer_args(small_disk, corpus, data_dir, "--run_name", "r", "--max_steps", "400", "--save", "false")
    res = run_cli(args)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-3000:]
    assert lines[0].startswith(f"error: the disk is full: could not write {small_disk}/r/metrics.jsonl")
    text = (small_disk / "r" / "metrics.jsonl").read_text()
    assert text.endswith("\n") and len(losses(small_disk / "r")) > 10  # whole rows only, nothing written lost
    os.remove(small_disk / "ballast")
    res = run_cli([*args[:-4], "--max_steps", "3", "--save", "false", "--resume", "auto"])
    assert res.returncode == 0 and len(losses(small_disk / "r")) == 3, res.stderr[-3000:]


def test_a_full_disk_at_the_start_is_one_line_and_leaves_no_run_directory(small_disk, corpus, data_dir):
    (small_disk / "ballast").write_bytes(b"\0" * shutil.disk_usage(small_disk).free)
    res = run_cli(trainer_args(small_disk, corpus, data_dir, "--run_name", "r", "--max_steps", "2"))
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-3000:]
    assert lines[0] == (f"error: cannot write {small_disk}/r/.lock (No space left on device): free space or give "
                        "another --output_dir")
    assert os.listdir(small_disk) == ["ballast"]


def torchrun2():
    import socket
    with socket.socket() as s:  # helpers sharing this machine run torchrun too: no fixed port
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    return (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port)


def assert_every_rank_says(res, words):
    """Work for rank 0 alone failed: each of the 2 ranks stops with the same one line and no rank's traceback
    (torchrun's own report of a failed child follows; each rank's traceback would be prefixed [rankN])."""
    lines = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert res.returncode != 0 and len(lines) == 2 and lines[0] == lines[1] and words in lines[0], res.stderr[-3000:]
    assert not any(line.startswith("[rank") for line in res.stderr.splitlines()), res.stderr[-3000:]


def test_a_dataset_refused_on_rank_0_stops_every_rank_with_its_line(tmp_path, data_dir):
    """Rank 0 prepares the data; when it refuses it, the other rank hears why instead of waiting for it."""
    (tmp_path / "one_doc.txt").write_text("only one document here\n" * 50)
    res = run_cli(trainer_args(tmp_path / "out", tmp_path / "one_doc.txt", tmp_path / "data", "--backend", "ddp",
                               "--max_steps", "2"), launcher=torchrun2())
    assert_every_rank_says(res, "the dataset has only 1 document(s)")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # a refused start leaves nothing


def test_a_locked_run_directory_stops_every_rank_with_its_line(tmp_path, corpus, data_dir):
    import fcntl
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    with open(run_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write("pid 1 on elsewhere\n")
        lock.flush()
        res = run_cli(trainer_args(tmp_path, corpus, data_dir, "--run_name", "r", "--backend", "ddp",
                                   "--max_steps", "2"), launcher=torchrun2())
    assert_every_rank_says(res, "is in use by another run (pid 1 on elsewhere)")


def test_a_full_disk_at_a_two_rank_save_stops_every_rank_with_the_line(small_disk, corpus, data_dir):
    """Rank 0 writes a DDP checkpoint; a full disk there stops both ranks with the full-disk line and keeps
    the previous checkpoint, which the run resumes from once there is room."""
    args = trainer_args(small_disk, corpus, data_dir, "--run_name", "r", "--backend", "ddp", "--save_interval", "2")
    run_dir = train(small_disk, corpus, data_dir, "r", "--backend", "ddp", "--max_steps", "4", "--save_interval",
                    "2", launcher=torchrun2())
    size = sum(f.stat().st_size for f in (run_dir / "checkpoints" / "step_00000004").iterdir())
    os.remove(run_dir / "summary.json")
    (small_disk / "ballast").write_bytes(b"\0" * (shutil.disk_usage(small_disk).free - size // 2))
    res = run_cli([*args, "--max_steps", "6", "--resume", "auto"], launcher=torchrun2())
    assert_every_rank_says(res, "the disk is full: could not write checkpoint step_00000006")
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["step_00000002", "step_00000004"]
    os.remove(small_disk / "ballast")
    res = run_cli([*args, "--max_steps", "6", "--resume", "auto"], launcher=torchrun2())
    assert res.returncode == 0 and "at step 4" in res.stdout, res.stderr[-3000:]
