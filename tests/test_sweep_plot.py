"""Sweeps run the real trainer, skip finished runs; the transfer plot finds the optimum it should."""
import json
import math
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, SWEEP_SHARED, assert_one_error_line


def test_sweep_runs_the_grid_and_skips_finished_runs(tmp_path, corpus, data_dir):
    cmd = [sys.executable, "scripts/sweep.py", "--out", str(tmp_path / "s"), "--widths", "8,16", "--lrs", "1e-3,4e-3",
           "--parametrizations", "mup", "--jobs", "2", "--", *SWEEP_SHARED, "--max_steps", "6",
           "--base_head_width", "8", "--dataset", str(corpus), "--data_dir", str(data_dir)]
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    rows = [json.loads(line) for line in open(tmp_path / "s" / "results.jsonl")]
    assert sorted((r["width"], r["lr"]) for r in rows) == [(8, 1e-3), (8, 4e-3), (16, 1e-3), (16, 4e-3)]
    progress = [line.split(": done; ")[1] for line in first.stdout.splitlines() if ": done; " in line]
    assert [p.split(", ETA")[0] for p in progress] == [f"{n} of 4 finished, 0 failed" for n in (1, 2, 3, 4)]
    assert progress[-1].endswith("ETA now") and all(" ETA " in p for p in progress)
    assert all(r["steps"] == 6 and not r["diverged"] and math.isfinite(r["mean_train_loss"]) for r in rows)
    config = json.loads((tmp_path / "s" / "runs" / "mup_w16_lr0.004_s0" / "config.json").read_text())
    assert config["args"]["head_width"] == 16 and config["args"]["learning_rate"] == 4e-3
    config = json.loads((tmp_path / "s" / "runs" / "mup_w8_lr0.004_s0" / "config.json").read_text())
    assert config["args"]["head_width"] == 8
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert "4 already done, 0 to run" in again.stdout and again.returncode == 0


def write_results(path, optimum_of):
    """A synthetic sweep: loss = (log2 lr - optimum(width))^2 / 10 + 3 - log2(width) / 10."""
    rows = []
    for p in ("mup", "sp"):
        for w in (8, 16, 32, 64):
            for x in range(-12, -3):
                best = optimum_of(p, w)
                loss = (x - best) ** 2 / 10 + 3 - math.log2(w) / 10
                diverged = p == "sp" and x - best >= 3  # SP blows up to the right of its optimum
                rows.append({"parametrization": p, "width": w, "depth": None, "lr": 2.0 ** x, "seed": 0,
                             "mean_train_loss": float("nan") if diverged else loss, "diverged": diverged})
    path.mkdir()
    (path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_plot_finds_the_optimum_and_its_shift(tmp_path):
    # muP: optimum at log2 lr = -8.3 for every width; SP: -6.5, -7.5, -8.5, -9.5 (one step left per doubling)
    optimum = lambda p, w: -8.3 if p == "mup" else -6.5 - math.log2(w // 8)  # noqa: E731
    write_results(tmp_path / "s", optimum)
    res = subprocess.run([sys.executable, "scripts/plot_mu_scaling.py", str(tmp_path / "s")], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    summary = json.loads((tmp_path / "s" / "transfer_summary.json").read_text())
    mup, sp = summary["mup"], summary["sp"]
    assert [b["grid_log2_lr"] for b in mup["optimum"].values()] == [-8, -8, -8, -8]
    assert all(b["fit_log2_lr"] == pytest.approx(-8.3) for b in mup["optimum"].values())  # the quadratic's vertex
    assert mup["shift"]["grid_steps"] == 0 and sp["shift"]["grid_steps"] == 3 and not sp["shift"]["at_least"]
    assert sp["shift"]["fit_log2"] == pytest.approx(3.0)
    assert mup["wider_is_better_at_best_common_lr"]
    assert (tmp_path / "s" / "transfer.png").stat().st_size > 20_000


def test_plot_without_results_is_one_line_and_exit_2(tmp_path):
    res = subprocess.run([sys.executable, "scripts/plot_mu_scaling.py", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "run scripts/sweep.py" in res.stderr


@pytest.mark.parametrize("damage,message", [
    ("nan", "line 73 has mean_train_loss nan for a run that did not diverge"),
    ("null", "line 73 has mean_train_loss None for a run that did not diverge"),
    ("repeat", "line 73 repeats the run of line 1"),
])
def test_plot_refuses_a_finished_run_without_a_loss_and_a_repeated_run(tmp_path, damage, message):
    """Such a row would be drawn as a diverged run, or averaged in as another seed."""
    write_results(tmp_path / "s", lambda p, w: -8.3)
    path = tmp_path / "s" / "results.jsonl"
    first = json.loads(path.read_text().splitlines()[0])
    extra = {**first, "mean_train_loss": {"nan": float("nan"), "null": None, "repeat": 3.0}[damage]}
    if damage != "repeat":
        extra["seed"] = 1
    path.write_text(path.read_text() + json.dumps(extra) + "\n")
    res = subprocess.run([sys.executable, "scripts/plot_mu_scaling.py", str(tmp_path / "s")], cwd=ROOT,
                         capture_output=True, text=True)
    assert_one_error_line(res, message, "run scripts/sweep.py")


def test_plot_marks_optima_at_the_grid_edge_and_labels_model_widths(tmp_path, capsys):
    # The grid is log2 lr -12..-4. muP's width 64 wants 2^-2 (beyond the high edge), SP's width 64 2^-14 (beyond
    # the low edge); the other widths' optima are inside the grid.
    inside = {"mup": {8: -8.3, 16: -8.3, 32: -8.3, 64: -2}, "sp": {8: -8.3, 16: -9.3, 32: -10.3, 64: -14}}
    write_results(tmp_path / "s", lambda p, w: inside[p][w])
    import plot_mu_scaling

    summary, drawn = plot_mu_scaling.make(str(tmp_path / "s"))  # no n_head anywhere: head widths, said so
    mup, sp = summary["mup"], summary["sp"]
    assert [b["edge"] for b in mup["optimum"].values()] == [None, None, None, "high"]
    assert [b["edge"] for b in sp["optimum"].values()] == [None, None, None, "low"]
    assert mup["shift"] == {"grid_steps": 4, "fit_log2": pytest.approx(4.3), "at_least": True,
                            "extend": "higher LRs above 2^-4"}
    assert sp["shift"] == {"grid_steps": 4, "fit_log2": pytest.approx(3.7), "at_least": True,
                           "extend": "lower LRs below 2^-12"}
    assert drawn["legends"]["sp"] == ["head width 8", "head width 16", "head width 32",
                                      "head width 64 (optimum at low edge)"]
    assert drawn["titles"] == ["muP: optimum moves at least 4 grid steps", "SP: optimum moves at least 4 grid steps"]
    assert "LR grid step 2x (1 in log2)" in drawn["footer"][1] and "seed 0" in drawn["footer"][1]

    # n_head from a run's config.json (the sweep writes one per run): legends give the model width
    rows = [json.loads(line) for line in open(tmp_path / "s" / "results.jsonl")]
    (tmp_path / "s" / "results.jsonl").write_text("".join(json.dumps({**r, "run": f"r{i}", "steps": 50}) + "\n"
                                                          for i, r in enumerate(rows)))
    (tmp_path / "s" / "runs" / "r0").mkdir(parents=True)
    (tmp_path / "s" / "runs" / "r0" / "config.json").write_text(json.dumps({"resolved": {"model": {"n_head": 4}}}))
    capsys.readouterr()
    summary, drawn = plot_mu_scaling.make(str(tmp_path / "s"))
    assert drawn["legends"]["mup"] == ["width 32", "width 64", "width 128", "width 256 (optimum at high edge)"]
    assert summary["n_head"] == 4 and summary["sp"]["optimum"]["64"]["label"] == "width 256"
    assert "50 steps" in drawn["footer"][1] and "width = 4 heads x head width" in drawn["footer"][1]
    printed = capsys.readouterr().out
    assert ("shift at least 4 grid steps (optimum at the grid's low edge at width 256: extend the grid below 2^-12)"
            in printed)
    assert json.loads((tmp_path / "s" / "transfer_summary.json").read_text())["sp"]["shift"]["at_least"] is True


def test_plot_of_a_depth_sweep_labels_depths_and_gives_the_model_width(tmp_path):
    rows = [{"parametrization": "mup", "width": 16, "depth": d, "lr": 2.0 ** x, "seed": s, "n_head": 4, "steps": 40,
             "mean_train_loss": (x + 7) ** 2 / 10 + 2 + d / 100 + s / 1000, "diverged": False}
            for d in (2, 4, 8) for x in range(-10, -3) for s in (0, 1)]
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = subprocess.run([sys.executable, "scripts/plot_mu_scaling.py", str(tmp_path / "d"), "--label", "CompleteP"],
                         cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    summary = json.loads((tmp_path / "d" / "transfer_summary.json").read_text())
    assert summary["axis"] == "depth" and [b["label"] for b in summary["mup"]["optimum"].values()] == \
        ["depth 2", "depth 4", "depth 8"]
    assert summary["mup"]["shift"] == {"grid_steps": 0, "fit_log2": pytest.approx(0), "at_least": False, "extend": None}
    assert "optimal log2 lr at depth 2 / 4 / 8: -7 / -7 / -7, shift 0 grid steps" in res.stdout


@pytest.mark.parametrize("args,message", [
    (["--jobs", "-1"], "--jobs -1: give at least 1"),
    (["--jobs", "two"], "invalid int value"),
    (["--hostfile", "/nonexistent/hf"], "hostfile '/nonexistent/hf' not found"),
    (["--hostfile", "HF", "--slots_per_host", "0"], "--slots_per_host 0: give at least 1"),
    (["--hostfile", "BAD"], "'-oProxyCommand=touch' is not a plain host name or address"),
    (["--hostfile", "TWICE"], "host 'node-a' is listed twice"),
    (["--lrs", ","], "--lrs is empty"),
    (["--lrs", "1e-3,0"], "learning rates must be finite and above 0"),
    (["--lrs", "nan"], "learning rates must be finite and above 0"),
    (["--lrs=-1e-3"], "learning rates must be finite and above 0"),
    (["--widths", "8,sixteen"], "--widths '8,sixteen': give comma-separated integers"),
    (["--widths", "0,8"], "must be positive integers"),
    (["--widths", ""], "--widths is empty"),
    (["--depths", "2,x"], "give comma-separated integers"),
    (["--parametrizations", "mup,ntk"], "unknown parametrization 'ntk'"),
    (["--seeds", "0.5"], "give comma-separated integers"),
    (["--widths", "8", "--steps", "4,0"], "--steps '4,0': must be positive integers"),
    (["--widths", "8", "--batch_sizes=-8"], "--batch_sizes '-8': must be positive integers"),
    (["--steps", "4,8"], "--widths 8,16,32,64 and --steps 4,8 both vary: a sweep varies one of width, depth, steps and "
                         "batch size besides the LR: give the other one value, e.g. --widths 32"),
    (["--widths", "8", "--depths", "2,4", "--batch_sizes", "8,16"], "--depths 2,4 and --batch_sizes 8,16 both vary"),
    (["--widths", "8", "--steps", "4,8", "--", "--max_steps=6"],
     "--max_steps is given after -- and the sweep sets it for each run from --steps"),
    (["--widths", "8", "--batch_sizes", "8,16", "--", "--train_batch_size", "4"],
     "--train_batch_size is given after -- and the sweep sets it for each run from --batch_sizes"),
    (["--widths", "8,16", "--", "--width", "16"], "--head_width is given after -- and the sweep sets it for each run "
                                                  "from --widths: give its values to --widths only"),
    (["--widths", "8", "--", "--lr", "1e-2"], "--learning_rate is given after -- and the sweep sets it"),
    (["--widths", "8", "--batch_sizes", "8,12", "--", "--per_device_train_batch_size", "8"],
     "--batch_sizes 8,12: 12 is not a multiple of the micro batch --per_device_train_batch_size 8"),
    (["--widths", "8", "--lrs", "0.001,0.001"], "--lrs '0.001,0.001' gives 0.001 more than once"),
    (["--widths", "8", "--lrs", "1e-3,0.001"], "gives 0.001 more than once (learning rates are told apart"),
    (["--widths", "8,16,8"], "--widths '8,16,8' gives 8 more than once: give each value once"),
    (["--widths", "8", "--parametrizations", "mup,sp,mup"], "gives mup more than once"),
    (["--widths", "8", "--seeds", "0,1,0"], "--seeds '0,1,0' gives 0 more than once"),
    (["--widths", "8", "--", "--shard_group_size", "2"], "the sweep runs each point as one process"),
])
def test_bad_sweep_input_is_one_line_and_exit_2(tmp_path, script, args, message):
    """In this process (runpy, as __main__): a real process starts torch's import for each case; the next test
    runs one case as a real process."""
    (tmp_path / "HF").write_text("node-a slots=1\n")
    (tmp_path / "BAD").write_text("node-a slots=1\n-oProxyCommand=touch slots=1\n")
    (tmp_path / "TWICE").write_text("node-a slots=1\r\nnode-a slots=1\r\n")
    args = [str(tmp_path / a) if a in ("HF", "BAD", "TWICE") else a for a in args]
    if not any(a.startswith("--lrs") for a in args):
        args = ["--lrs", "1e-3", *args]
    res = script("scripts/sweep.py", "--out", str(tmp_path / "s"), *args)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and message in res.stderr, res.stderr
    assert not (tmp_path / "s").exists() and not res.stdout  # refused before anything starts or is written


def test_bad_sweep_input_is_one_line_and_exit_2_in_a_real_process(tmp_path):
    res = subprocess.run([sys.executable, "scripts/sweep.py", "--out", str(tmp_path / "s"), "--lrs", "1e-3,0"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert_one_error_line(res, "learning rates must be finite and above 0")
    assert not (tmp_path / "s").exists() and not res.stdout


def sweep_cmd(out, corpus, data_dir, *args, steps=4, lrs="1e-3,4e-3", extra=()):
    return [sys.executable, "scripts/sweep.py", "--out", str(out), "--widths", "8", "--lrs", lrs, "--parametrizations",
            "mup", *args, "--", *SWEEP_SHARED, "--max_steps", str(steps), "--base_head_width", "8", "--dataset",
            str(corpus), "--data_dir", str(data_dir), *extra]


# A long run that prints rarely (the signal lands in training, not in a print) and shows it is training (and has
# its signal handler) by saving a checkpoint.
LONG = ["--log_interval", "100000", "--save_interval", "10"]


@pytest.mark.parametrize("where", ["under_a_file", "a_file", "/proc/sweep"])
def test_a_sweep_folder_that_cannot_be_made_or_written_is_one_line_and_exit_2(tmp_path, corpus, data_dir, where):
    (tmp_path / "f").write_text("a file\n")
    out = {"under_a_file": tmp_path / "f" / "s", "a_file": tmp_path / "f"}.get(where, where)
    res = subprocess.run(sweep_cmd(out, corpus, data_dir, "--jobs", "1"), cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert_one_error_line(res, f"--out {out}")
    assert (tmp_path / "f").read_text() == "a file\n"


def test_two_sweeps_of_one_folder_at_once_run_each_run_once_and_both_succeed(tmp_path, corpus, data_dir):
    """Two sweeps over one --out at the same time: a run the other sweep finished is read from its own summary,
    never launched again, never reported failed, never a NaN row."""
    cmd = sweep_cmd(tmp_path / "s", corpus, data_dir, "--jobs", "1", steps=6)
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert sum(o.count(": done; ") for o, _ in outs) == 2 and all("0 failed" in o for o, _ in outs)
    assert sum(o.count("done (by another sweep of this folder)") for o, _ in outs) in (0, 1, 2)
    rows = [json.loads(line) for line in open(tmp_path / "s" / "results.jsonl")]
    assert sorted(r["lr"] for r in rows) == [1e-3, 4e-3]
    assert all(r["steps"] == 6 and not r["diverged"] and math.isfinite(r["mean_train_loss"])
               and math.isfinite(r["final_train_loss"]) for r in rows)
    for run in ("mup_w8_lr0.001_s0", "mup_w8_lr0.004_s0"):  # each trained once: steps 1..6, once each
        steps = [json.loads(line)["step"] for line in open(tmp_path / "s" / "runs" / run / "metrics.jsonl")]
        assert [s for s in steps if s] == [1, 2, 3, 4, 5, 6]


def test_a_rerun_with_other_shared_flags_is_refused_not_skipped(tmp_path, corpus, data_dir):
    first = subprocess.run(sweep_cmd(tmp_path / "s", corpus, data_dir, "--jobs", "1", lrs="1e-3", steps=2), cwd=ROOT,
                           capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    before = (tmp_path / "s" / "results.jsonl").read_text()
    for changed in (["--max_steps", "3"], ["--n_layer", "2"], ["--seq_len", "16"]):
        cmd = sweep_cmd(tmp_path / "s", corpus, data_dir, "--jobs", "1", lrs="1e-3", steps=2)
        res = subprocess.run(cmd + changed, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert_one_error_line(res, "holds runs made with other shared flags", f"--{changed[0][2:]}", "another --out")
        assert "already done" not in res.stdout
    assert (tmp_path / "s" / "results.jsonl").read_text() == before
    same = subprocess.run(sweep_cmd(tmp_path / "s", corpus, data_dir, "--jobs", "1", lrs="1e-3,4e-3", steps=2),
                          cwd=ROOT, capture_output=True, text=True, timeout=600)  # more LRs, same flags: new runs
    assert same.returncode == 0 and "1 already done, 1 to run" in same.stdout, same.stdout + same.stderr


def test_a_muon_lr_sweep_sets_muon_lr_per_run_and_the_adamw_lr_for_all(tmp_path, corpus, data_dir):
    """--lr_flag muon_lr: --lrs goes to each run's --muon_lr, --learning_rate after -- to every run, and the
    folder's shared settings hold the AdamW LR, so another AdamW LR is another sweep."""
    muon = ["--optimizer", "muon", "--learning_rate", "2e-3"]
    cmd = sweep_cmd(tmp_path / "s", corpus, data_dir, "--jobs", "1", "--lr_flag", "muon_lr", lrs="0.01,0.04",
                    steps=2, extra=muon)
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    for lr in (0.01, 0.04):
        args = json.loads((tmp_path / "s" / "runs" / f"mup_w8_lr{lr:g}_s0" / "config.json").read_text())["args"]
        assert (args["muon_lr"], args["learning_rate"], args["optimizer"]) == (lr, 2e-3, "muon")
    rows = [json.loads(line) for line in open(tmp_path / "s" / "results.jsonl")]
    assert sorted((r["lr"], r["lr_flag"]) for r in rows) == [(0.01, "muon_lr"), (0.04, "muon_lr")]
    other = subprocess.run(cmd[:-1] + ["4e-3"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert_one_error_line(other, "holds runs made with other shared flags", "--learning_rate")
    given = subprocess.run(cmd + ["--muon_lr", "0.1"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert_one_error_line(given, "--muon_lr is given after -- and the sweep sets it for each run from --lrs")
    adamw = subprocess.run(sweep_cmd(tmp_path / "t", corpus, data_dir, "--lr_flag", "muon_lr"), cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert_one_error_line(adamw, "--lr_flag muon_lr sweeps the Muon LR, which only --optimizer muon uses")


def test_a_finished_runs_row_comes_from_its_own_files_and_is_never_nan(tmp_path, corpus, data_dir):
    """A finished run whose summary lost its losses (NaN, as a resume of a finished run wrote them) and whose
    log ends in a torn line still gives a finite row; an unreadable summary is one line naming it."""
    cmd = sweep_cmd(tmp_path / "s", corpus, data_dir, "--jobs", "1", lrs="1e-3", steps=3)
    assert subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600).returncode == 0
    run = tmp_path / "s" / "runs" / "mup_w8_lr0.001_s0"
    good = json.loads((tmp_path / "s" / "results.jsonl").read_text())
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "final_train_loss": float("nan"),
                                                  "final_val_loss": float("nan")}))
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "1 already done, 0 to run" in again.stdout, again.stdout + again.stderr
    assert json.loads((tmp_path / "s" / "results.jsonl").read_text()) == good
    (run / "summary.json").write_text('{"final_train_loss": 2.')
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert_one_error_line(res, f"{run / 'summary.json'} is unreadable", "run the sweep again")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_the_sweep_cleanly(tmp_path, corpus, data_dir, sig):
    """A real signal to a real sweep mid-run: the running run is stopped and not counted done, no run starts
    after it, results.jsonl is written, one line says how to go on, no traceback."""
    proc = subprocess.Popen(sweep_cmd(tmp_path / "s", corpus, data_dir, "--jobs", "1", lrs="1e-3,2e-3,4e-3",
                                      steps=100000, extra=LONG), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list((tmp_path / "s" / "runs").glob("*/checkpoints/step_*")):
        time.sleep(0.2)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, out + err
    assert "Traceback" not in out + err and ": done;" not in out and "failed (" not in out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "run the same command again to continue" in lines[0], err
    logs = list((tmp_path / "s" / "runs").glob("*.log"))
    assert len(logs) == 1 and "stopped at step" in logs[0].read_text()  # the trainer saved and stopped; none after
    assert not list((tmp_path / "s" / "runs").glob("*/summary.json"))
    assert (tmp_path / "s" / "results.jsonl").read_text() == ""
    assert not subprocess.run(["pgrep", "-f", str(tmp_path / "s")], capture_output=True).stdout  # no run left over


def test_a_diverged_run_is_a_result_of_the_sweep_not_a_failure(tmp_path, corpus, data_dir):
    """The trainer exits 1 on divergence (it writes no checkpoint of a diverged model); a sweep maps LRs
    up to divergence, so for it that run is a data point."""
    cmd = [sys.executable, "scripts/sweep.py", "--out", str(tmp_path / "s"), "--widths", "8", "--lrs", "1e-3,1e6",
           "--parametrizations", "mup", "--jobs", "2", "--", *SWEEP_SHARED, "--max_steps", "8",
           "--base_head_width", "8", "--dataset", str(corpus), "--data_dir", str(data_dir)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    rows = {r["lr"]: r for r in map(json.loads, open(tmp_path / "s" / "results.jsonl"))}
    assert rows[1e6]["diverged"] and not rows[1e-3]["diverged"]
    assert "diverged (a result, not a failure)" in res.stdout and "0 failed" in res.stdout


def test_relative_paths_after_the_double_dash_mean_what_they_mean_where_the_sweep_starts(tmp_path, corpus, data_dir):
    """A sweep started outside the repository, with a config file and data folder given relative to there."""
    (tmp_path / "base.toml").write_text("\n".join(f"{k} = {v}" for k, v in [
        ("n_layer", 1), ("n_head", 2), ("seq_len", 32), ("per_device_train_batch_size", 4), ("max_steps", 4),
        ("base_head_width", 8), ("tokenizer", '"bytes"'), ("eval_iters", 2), ("precision", '"fp32"')]) + "\n")
    (tmp_path / "prepared").symlink_to(data_dir)
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "sweep.py"), "--out", "s", "--widths", "8", "--lrs",
                          "1e-3", "--parametrizations", "mup", "--jobs", "1", "--", "--config", "base.toml",
                          "--dataset", str(corpus), "--data_dir", "prepared"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    config = json.loads((tmp_path / "s" / "runs" / "mup_w8_lr0.001_s0" / "config.json").read_text())
    assert config["args"]["n_layer"] == 1 and config["args"]["data_dir"] == "prepared"
    assert not (ROOT / "prepared").exists() and not (ROOT / "base.toml").exists()


def test_a_sweep_over_training_length_runs_each_length_and_plots_its_transfer(tmp_path, corpus, data_dir):
    cmd = [sys.executable, "scripts/sweep.py", "--out", str(tmp_path / "s"), "--widths", "8", "--steps", "4,8",
           "--lrs", "1e-3,4e-3,1.6e-2", "--parametrizations", "mup", "--jobs", "2", "--", *SWEEP_SHARED,
           "--base_head_width", "8", "--dataset", str(corpus), "--data_dir", str(data_dir)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    rows = [json.loads(line) for line in open(tmp_path / "s" / "results.jsonl")]
    assert sorted((r["max_steps"], r["lr"]) for r in rows) == [(t, lr) for t in (4, 8) for lr in (1e-3, 4e-3, 1.6e-2)]
    assert all(r["steps"] == r["max_steps"] and r["train_batch_size"] is None for r in rows)
    config = json.loads((tmp_path / "s" / "runs" / "mup_w8_steps8_lr0.004_s0" / "config.json").read_text())
    assert config["args"]["max_steps"] == 8 and config["args"]["head_width"] == 8
    import plot_mu_scaling

    summary, drawn = plot_mu_scaling.make(str(tmp_path / "s"))
    assert summary["axis"] == "steps" and list(summary["mup"]["optimum"]) == ["4", "8"]
    assert [b["label"] for b in summary["mup"]["optimum"].values()] == ["4 steps", "8 steps"]
    assert [t.split(" (")[0] for t in drawn["legends"]["mup"]] == ["4 steps", "8 steps"]
    assert "optimum per training length" in drawn["footer"][0] and "width 16 (2 heads x 8)" in drawn["footer"][1]
    assert json.loads((tmp_path / "s" / "transfer_summary.json").read_text())["axis"] == "steps"


def test_plot_of_a_batch_size_sweep(tmp_path, capsys):
    # muP's optimum moves one grid step right per 4x batch; batch 256 wants 2^-3, beyond the grid's high edge
    best = {16: -7.2, 64: -6.2, 256: -3}
    rows = [{"parametrization": "mup", "width": 16, "depth": None, "max_steps": None, "train_batch_size": b,
             "lr": 2.0 ** x, "seed": 0, "n_head": 4, "steps": 100, "diverged": False,
             "mean_train_loss": (x - best[b]) ** 2 / 10 + 3 - math.log2(b) / 10}
            for b in (16, 64, 256) for x in range(-10, -4)]
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    import plot_mu_scaling

    summary, drawn = plot_mu_scaling.make(str(tmp_path / "b"))
    mup = summary["mup"]
    assert summary["axis"] == "batch" and [b["label"] for b in mup["optimum"].values()] == \
        ["batch 16", "batch 64", "batch 256"]
    assert [b["grid_log2_lr"] for b in mup["optimum"].values()] == [-7, -6, -5]
    assert [b["edge"] for b in mup["optimum"].values()] == [None, None, "high"]
    assert mup["shift"] == {"grid_steps": 2, "fit_log2": pytest.approx(2.2), "at_least": True,
                            "extend": "higher LRs above 2^-5"}
    assert drawn["legends"]["mup"][-1] == "batch 256 (optimum at high edge)"
    assert "100 steps" in drawn["footer"][1] and "width 64 (4 heads x 16)" in drawn["footer"][1]
    assert ("optimal log2 lr at batch 16 / 64 / 256: -7 / -6 / -5, shift at least 2 grid steps (optimum at the "
            "grid's high edge at batch 256: extend the grid above 2^-5); a larger batch is better"
            in capsys.readouterr().out)

    # a folder whose rows vary two axes is refused: the curves would mix them
    (tmp_path / "b" / "results.jsonl").write_text("".join(json.dumps({**r, "max_steps": 50 + i % 2}) + "\n"
                                                          for i, r in enumerate(rows)))
    res = subprocess.run([sys.executable, "scripts/plot_mu_scaling.py", str(tmp_path / "b")], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "varies both steps and batch" in res.stderr
