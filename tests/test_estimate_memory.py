"""scripts/estimate_memory.py against memory measured on this CPU, and its ZeRO accounting."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT, run_cli, trainer_args

sys.path.insert(0, str(ROOT / "scripts"))
import estimate_memory  # noqa: E402


def estimate(*flags):
    return estimate_memory.estimate(estimate_memory.build_parser().parse_args(list(map(str, flags))))


def test_prediction_holds_against_measured_peak_memory(tmp_path, corpus, data_dir):
    """Eight more layers of a 512-wide model: the growth of the measured peak (the fixed cost of the
    process cancels) against the predicted growth of weights, gradients, Adam and activations."""
    flags = ["--n_head", "8", "--head_width", "64", "--base_head_width", "64", "--seq_len", "64",
             "--per_device_train_batch_size", "4", "--max_steps", "3", "--precision", "fp32"]
    peak = {}
    for layers in (2, 10):  # fresh processes: peak RSS is a high-water mark over a process's life
        res = run_cli(trainer_args(tmp_path, corpus, data_dir, *flags, "--n_layer", str(layers), "--run_name", f"L{layers}"))
        assert res.returncode == 0, res.stderr[-2000:]
        peak[layers] = json.loads((tmp_path / f"L{layers}" / "summary.json").read_text())["peak_host_bytes_per_rank"]
    model = dict(n_head=8, head_width=64, vocab=257, seq_len=64, batch=4, stage=0, precision="fp32")
    predicted = [estimate(*sum(([f"--{k}", v] for k, v in {**model, "n_layer": L}.items()), []))["per_rank_device_bytes"]
                 for L in (2, 10)]
    assert peak[10] - peak[2] == pytest.approx(predicted[1] - predicted[0], rel=0.2)


def test_zero_stages_shard_what_the_paper_says():
    base = ["--n_layer", "4", "--n_head", "4", "--head_width", "64", "--vocab", "257", "--precision", "bf16",
            "--world_size", "8"]
    s1, s2, s3 = (estimate(*base, "--stage", s)["breakdown_bytes"] for s in (1, 2, 3))
    P = estimate(*base, "--stage", 1)["params"]
    assert s1["optimizer"] == pytest.approx(12 * P / 8) and s1["gradients"] == 2 * P and s1["weights"] == 2 * P
    assert s2["gradients"] == pytest.approx(2 * P / 8) and s2["weights"] == 2 * P
    assert s3["weights"] == pytest.approx(2 * P / 8)
    offload = estimate(*base, "--stage", 3, "--offload", "cpu")
    assert offload["breakdown_bytes"]["optimizer"] == 0 and offload["per_rank_host_bytes"] == pytest.approx(16 * P / 8)


def test_offload_below_stage_3_is_one_line_and_exit_2():
    res = subprocess.run([sys.executable, "scripts/estimate_memory.py", "--stage", "2", "--offload", "cpu"], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.strip() == "error: --offload needs --stage 3"
