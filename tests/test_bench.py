"""bench/bench.py measures real trainer runs and writes its JSON and table."""
import json
import subprocess
import sys

from conftest import ROOT


def test_bench_measures_the_single_backend(tmp_path, corpus, data_dir):
    name = "pytest_tiny"
    res = subprocess.run([sys.executable, "bench/bench.py", "--name", name, "--backends", "single", "--n_layer", "1",
                          "--n_head", "2", "--head_width", "16", "--seq_len", "32", "--batch", "4", "--steps", "8",
                          "--warmup", "2", "--repeats", "2", "--dataset", str(corpus), "--data_dir", str(data_dir),
                          "--threads", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    out = ROOT / "bench" / "results" / f"{name}.json"
    try:
        assert res.returncode == 0, res.stderr[-2000:]
        result = json.loads(out.read_text())
        single = result["backends"]["single"]
        assert single["tokens_per_s"] > 0 and len(single["repeats_tokens_per_s"]) == 2 and single["peak_host_mib"] > 50
        assert single["mfu"] is None and result["environment"]["torch"]  # no known CPU peak: no MFU
        assert "| single |" in res.stdout
    finally:
        out.unlink(missing_ok=True)


def test_a_reference_without_train_py_is_refused_before_any_run(tmp_path):
    """Checked first: here the dataset does not exist either, and that error would come later."""
    res = subprocess.run([sys.executable, "bench/bench.py", "--name", "pytest_ref", "--reference", str(tmp_path),
                          "--dataset", str(tmp_path / "missing"), "--data_dir", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert (res.returncode == 2
            and res.stderr == f"error: --reference {tmp_path} has no train.py: point it at a nanoGPT checkout\n")
    assert not (ROOT / "bench" / "results" / "pytest_ref.json").exists()


def test_host_overhead_mode_reports_each_engines_step_time_over_single(corpus, data_dir):
    name = "pytest_overhead"
    res = subprocess.run([sys.executable, "bench/bench.py", "--name", name, "--host_overhead", "--backends",
                          "single,deepspeed_zero1", "--n_layer", "2", "--steps", "8", "--warmup", "2", "--repeats", "1",
                          "--dataset", str(corpus), "--data_dir", str(data_dir)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    out = ROOT / "bench" / "results" / f"{name}.json"
    try:
        assert res.returncode == 0, res.stderr[-2000:]
        result = json.loads(out.read_text())
        config, single, zero1 = result["config"], result["backends"]["single"], result["backends"]["deepspeed_zero1"]
        # the mode's tiny model, except what the command line set
        assert (config["n_layer"], config["n_head"], config["head_width"], config["seq_len"], config["batch"],
                config["threads"]) == (2, 2, 16, 16, 1, 1)
        assert single["overhead_ms"] == 0 and single["step_time_vs_single"] == 1
        assert zero1["overhead_ms"] == zero1["step_ms"] - single["step_ms"] and zero1["step_ms"] > 0
        assert "overhead ms (vs single)" in res.stdout
    finally:
        out.unlink(missing_ok=True)
