"""Nonsense given to coord_check.py, plot_mu_scaling.py and bench/bench.py: one 'error: ' line on stderr,
status 2, nothing written. Most cases run the script in this process (runpy, as __main__); one case per
script runs it as a real subprocess."""
import json
import math
import os
import subprocess
import sys

import pytest

from conftest import ROOT, assert_one_error_line

FAST_COORD = ["--head_widths", "8,16", "--seeds", "1", "--batch", "2", "--steps", "4"]  # seconds, if it ever ran




def subprocess_script(path, *args):
    return subprocess.run([sys.executable, str(ROOT / path), *map(str, args)], cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)



# coord_check.py

@pytest.mark.parametrize("flags, words", [
    (["--lr", "nan"], ["--lr", "positive"]),
    (["--lr", "-1"], ["--lr", "positive"]),
    (["--batch", "0"], ["--batch"]),
    (["--seeds", "0"], ["--seeds"]),
    (["--head_widths", ""], ["--head_widths"]),  # guard: already refused
    (["--head_widths", "16,16"], ["two different"]),
    (["--head_widths", "8,16,8"], ["repeats"]),
    (["--head_widths", "15,31"], ["--head_widths", "even"]),
    (["--seq_len", "200000"], ["--seq_len"]),
    (["--backend", "nccl"], ["--backend", "invalid choice"]),
])
def test_coord_check_bad_flags(script, tmp_path, flags, words):
    res = script("scripts/coord_check.py", *FAST_COORD, *flags, "--out", tmp_path / "out")
    assert_one_error_line(res, *words)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["file", "under_file", "empty"])
def test_coord_check_out_that_cannot_be_a_folder_is_refused_before_the_check_runs(script, tmp_path, where):
    (tmp_path / "f").write_text("keep me")
    out = {"file": tmp_path / "f", "under_file": tmp_path / "f" / "sub", "empty": ""}[where]
    res = script("scripts/coord_check.py", *FAST_COORD, "--out", out)
    assert_one_error_line(res, "--out")
    assert (tmp_path / "f").read_text() == "keep me" and not res.stdout


def test_coord_check_bad_choice_is_one_line_in_a_real_process(tmp_path):
    res = subprocess_script("scripts/coord_check.py", "--backend", "nccl", "--out", tmp_path / "out")
    assert_one_error_line(res, "--backend")
    assert not (tmp_path / "out").exists()


# plot_mu_scaling.py

def rows(widths=(8, 16, 32), lrs=range(-10, -5), **over):
    return [{"parametrization": "mup", "width": w, "depth": None, "lr": 2.0 ** x, "seed": 0, "diverged": False,
             "mean_train_loss": (x + 8) ** 2 / 10 + 3 - math.log2(w) / 10, **over} for w in widths for x in lrs]


def write(folder, lines):
    folder.mkdir(exist_ok=True)
    text = "".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in lines)
    (folder / "results.jsonl").write_text(text)
    return folder


def test_plot_of_a_good_sweep_runs(script, tmp_path):
    """The rows the bad cases below start from plot fine."""
    res = script("scripts/plot_mu_scaling.py", write(tmp_path / "s", rows()))
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "s" / "transfer.png").exists() and (tmp_path / "s" / "transfer_summary.json").exists()


def malformed(good):
    return good[:4] + ['{"parametrization": "mup", "width": 8'] + good[4:]


def missing_key(good):
    good[6] = {k: v for k, v in good[6].items() if k != "lr"}
    return good


def missing_metric_later(good):
    good[6] = {k: v for k, v in good[6].items() if k != "mean_train_loss"}
    return good


@pytest.mark.parametrize("make, words", [
    (lambda g: [], ["is empty"]),  # guard: already refused
    (malformed, ["line 5 is not JSON"]),
    (lambda g: g[:2] + ["[1, 2]"] + g[2:], ["line 3 is not a JSON object"]),
    (missing_key, ["line 7 has no lr"]),
    (missing_metric_later, ["line 7 has no mean_train_loss"]),
    (lambda g: [{**r, "lr": 0} if i == 3 else r for i, r in enumerate(g)], ["line 4 has lr 0"]),
    (lambda g: [{**r, "lr": "1e-3"} for r in g], ["line 1 has lr '1e-3'"]),
    (lambda g: [{**r, "mean_train_loss": "low"} for r in g], ["mean_train_loss 'low', not a number"]),
    (lambda g: [{**r, "parametrization": "ntk"} for r in g], ["'ntk', not mup or sp"]),
    (lambda g: rows(widths=(16,)), ["one width only", "two --widths"]),
    (lambda g: rows(lrs=(-9, -8)), ["2 learning rate(s)", "at least 3", "--lrs"]),
    (lambda g: rows(lrs=(-8,)), ["1 learning rate(s)", "at least 3"]),
    (lambda g: rows(diverged=True), ["every run", "diverged"]),
    (lambda g: rows() + rows(widths=(8,), depth=4), ["both width and depth"]),
])
def test_plot_bad_results(script, tmp_path, make, words):
    folder = write(tmp_path / "s", make(rows()))
    before = (folder / "results.jsonl").read_text()
    res = script("scripts/plot_mu_scaling.py", folder)
    assert_one_error_line(res, *words)
    assert sorted(p.name for p in folder.iterdir()) == ["results.jsonl"]
    assert (folder / "results.jsonl").read_text() == before


def test_plot_results_file_that_is_a_folder_or_a_sweep_that_is_a_file(script, tmp_path):
    (tmp_path / "s" / "results.jsonl").mkdir(parents=True)
    assert_one_error_line(script("scripts/plot_mu_scaling.py", tmp_path / "s"), "is a folder")
    (tmp_path / "f").write_text("x")
    assert_one_error_line(script("scripts/plot_mu_scaling.py", tmp_path / "f"), "is a file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "s"] and (tmp_path / "f").read_text() == "x"


@pytest.mark.parametrize("out, words", [
    ("folder", ["is a folder"]), ("missing/t.png", ["is not a folder"]), ("t.txt", [".png"]),
])
def test_plot_bad_out_is_refused_before_anything_is_written(script, tmp_path, out, words):
    folder = write(tmp_path / "s", rows())
    (tmp_path / "folder").mkdir()
    res = script("scripts/plot_mu_scaling.py", folder, "--out", tmp_path / out)
    assert_one_error_line(res, "--out", *words)
    assert sorted(p.name for p in folder.iterdir()) == ["results.jsonl"] and not (tmp_path / "t.txt").exists()
    assert not any((tmp_path / "folder").iterdir())


def test_plot_unknown_metric_is_one_line_in_a_real_process(tmp_path):
    """A guard (it was one line already); now refused by name before the results are read."""
    res = subprocess_script("scripts/plot_mu_scaling.py", write(tmp_path / "s", rows()), "--metric", "accuracy")
    assert_one_error_line(res, "--metric", "mean_train_loss")
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["results.jsonl"]


# bench/bench.py

def bench_flags(corpus, data_dir, name):
    return ["--name", name, "--n_layer", "1", "--n_head", "2", "--head_width", "16", "--seq_len", "32", "--batch", "2",
            "--steps", "3", "--warmup", "1", "--repeats", "1", "--threads", "1", "--dataset", corpus,
            "--data_dir", data_dir]


@pytest.mark.parametrize("flags, words", [
    (["--steps", "0"], ["--steps"]),
    (["--steps", "3", "--warmup", "3"], ["--warmup 3", "--steps 4"]),
    (["--warmup", "-1"], ["--warmup"]),
    (["--repeats", "0"], ["--repeats"]),
    (["--batch", "0"], ["--batch"]),
    (["--n_layer", "-2"], ["--n_layer"]),
    (["--threads", "-1"], ["--threads"]),
    (["--vocab_size", "100"], ["--vocab_size", "257"]),
    (["--head_width", "15"], ["--head_width", "even"]),
    (["--backends", ""], ["unknown backend"]),  # guard: already refused
    (["--backends", "single,zero9"], ["unknown backend", "zero9"]),  # guard
])
def test_bench_bad_flags_run_nothing_and_write_nothing(script, corpus, data_dir, flags, words):
    name = "pytest_tools_input"
    res = script("bench/bench.py", *bench_flags(corpus, data_dir, name), *flags)
    assert_one_error_line(res, *words)
    assert not (ROOT / "bench" / "results" / f"{name}.json").exists()


@pytest.mark.parametrize("name", ["../pytest_escape", "sub/pytest_escape", "", ".hidden"])
def test_bench_name_must_stay_a_file_in_bench_results(script, corpus, data_dir, name):
    outside = ROOT / "bench" / "pytest_escape.json"
    try:
        res = script("bench/bench.py", *bench_flags(corpus, data_dir, name))
        assert_one_error_line(res, "--name")
        assert not outside.exists() and not (ROOT / "bench" / "results" / "sub").exists()
    finally:
        outside.unlink(missing_ok=True)


def test_bench_bad_choice_is_one_line_in_a_real_process(corpus, data_dir):
    res = subprocess_script("bench/bench.py", *bench_flags(corpus, data_dir, "pytest_tools_input"), "--precision",
                            "fp16")
    assert_one_error_line(res, "--precision", "invalid choice")
    assert not (ROOT / "bench" / "results" / "pytest_tools_input.json").exists()
