"""scripts/estimate_memory.py against memory measured on this CPU, and its ZeRO accounting."""
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, trainer_args
from mupgpt.config import parse_args
from mupgpt.engines import World, build
from run_trainer import model_config

sys.path.insert(0, str(ROOT / "scripts"))
import estimate_memory  # noqa: E402


def estimate(*flags):
    return estimate_memory.estimate(estimate_memory.build_parser().parse_args(list(map(str, flags))))


def test_model_states_match_what_a_real_training_step_allocates(tmp_path, corpus, data_dir):
    """Weights, gradients and Adam moments of a real single-process step, counted tensor by tensor
    (peak RSS was too noisy on a shared machine to hold a test to), against the estimate."""
    cfg = parse_args(trainer_args(tmp_path, corpus, data_dir, "--n_layer", "3", "--n_head", "4", "--head_width", "32",
                                  "--base_head_width", "32", "--precision", "fp32"))
    world = World()
    engine = build("single", cfg, model_config(cfg, 257), world, "fp32", 10)
    x = torch.randint(0, 257, (4, cfg.seq_len))
    loss = engine.forward_model(x, x.roll(-1, 1))
    loss.backward()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in engine.model.parameters())
    engine.optimizer.step()
    weights = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    optim = sum(v.numel() * v.element_size() for s in engine.optimizer.state.values() for v in s.values()
                if torch.is_tensor(v) and v.dim() > 0)
    predicted = estimate("--n_layer", 3, "--n_head", 4, "--head_width", 32, "--vocab", 257, "--seq_len", cfg.seq_len,
                         "--stage", 0, "--precision", "fp32")["breakdown_bytes"]
    assert (weights, grads, optim) == (predicted["weights"], predicted["gradients"], predicted["optimizer"])


def test_zero_stages_shard_what_the_paper_says():
    base = ["--n_layer", "4", "--n_head", "4", "--head_width", "64", "--vocab", "257", "--precision", "bf16",
            "--world_size", "8"]
    s1, s2, s3 = (estimate(*base, "--stage", s)["breakdown_bytes"] for s in (1, 2, 3))
    P = estimate(*base, "--stage", 1)["params"]
    assert s1["optimizer"] == pytest.approx(12 * P / 8) and s1["gradients"] == 2 * P and s1["weights"] == 2 * P
    assert s2["gradients"] == pytest.approx(2 * P / 8) and s2["weights"] == 2 * P
    assert s3["weights"] == pytest.approx(2 * P / 8)
    offload = estimate(*base, "--stage", 3, "--offload", "cpu")
    assert offload["breakdown_bytes"]["optimizer"] == 0 and offload["per_rank_host_bytes"] == pytest.approx(1.5 * 18 * P / 8)
    # partial offload: Adam's states and fp32 gradients of the kept part (45%) stay on the device
    partial = estimate(*base, "--stage", 3, "--offload", "cpu", "--offload_ratio", "0.55")
    assert partial["breakdown_bytes"]["optimizer"] == pytest.approx(0.45 * 16 * P / 8)
    assert partial["per_rank_host_bytes"] == pytest.approx(1.5 * (0.55 * 16 + 2) * P / 8)


def test_offload_below_stage_3_is_one_line_and_exit_2():
    res = subprocess.run([sys.executable, "scripts/estimate_memory.py", "--stage", "2", "--offload", "cpu"], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.strip() == "error: --offload needs --stage 3"
