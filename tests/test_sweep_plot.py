"""Sweeps run the real trainer, skip finished runs; the transfer plot finds the optimum it should."""
import json
import math
import subprocess
import sys

import pytest

from conftest import ROOT, TINY


def test_sweep_runs_the_grid_and_skips_finished_runs(tmp_path, corpus, data_dir):
    cmd = [sys.executable, "scripts/sweep.py", "--out", str(tmp_path / "s"), "--widths", "8,16", "--lrs", "1e-3,4e-3",
           "--parametrizations", "mup", "--jobs", "2", "--", *TINY, "--max_steps", "6", "--base_head_width", "8",
           "--dataset", str(corpus), "--data_dir", str(data_dir)]
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    rows = [json.loads(l) for l in open(tmp_path / "s" / "results.jsonl")]
    assert sorted((r["width"], r["lr"]) for r in rows) == [(8, 1e-3), (8, 4e-3), (16, 1e-3), (16, 4e-3)]
    assert all(r["steps"] == 6 and not r["diverged"] and math.isfinite(r["mean_train_loss"]) for r in rows)
    config = json.loads((tmp_path / "s" / "runs" / "mup_w16_lr0.004_s0" / "config.json").read_text())
    assert config["args"]["head_width"] == 16 and config["args"]["learning_rate"] == 4e-3
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
    assert mup["shift_grid_steps"] == 0 and sp["shift_grid_steps"] == 3
    assert sp["shift_fit_log2"] == pytest.approx(3.0)
    assert mup["wider_is_better_at_best_common_lr"]
    assert (tmp_path / "s" / "transfer.png").stat().st_size > 20_000


def test_plot_without_results_is_one_line_and_exit_2(tmp_path):
    res = subprocess.run([sys.executable, "scripts/plot_mu_scaling.py", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "run scripts/sweep.py" in res.stderr
