"""The coordinate check passes muP and flags SP, in one process and on 2 ranks under FSDP2 and ZeRO-3."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import coord_check  # noqa: E402


@pytest.fixture(scope="module")
def single():
    results = {}
    for p in ("mup", "sp"):
        results[p], _ = coord_check.run(coord_check.build_parser().parse_args(["--parametrization", p]))
    return results


def test_mup_activations_keep_their_size_across_an_8x_width_range(single):
    mup = single["mup"]
    assert mup["passes"], mup["violations"]
    assert mup["max_abs_slope"] <= coord_check.MAX_SLOPE and mup["logits_at_step1"] == 0.0
    assert set(mup["slopes"][4]) >= {"wte", "wpe", "h.0.attn", "h.1.mlp", "h.1.residual", "h.0.attn.q",
                                     "h.0.attn.k", "h.1.attn.logits", "logits"}


def test_sp_is_flagged_its_logits_and_hidden_outputs_grow(single):
    sp = single["sp"]
    assert not sp["passes"]  # the power check: the same test fails SP
    assert sp["slopes"][2]["logits"] > 0.5 and sp["slopes"][4]["h.1.mlp"] > 0.5


@pytest.mark.parametrize("launcher", [
    (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29661"),
    ("deepspeed", "--num_gpus", "2", "--master_port", "29662"),
], ids=["fsdp", "zero3"])
def test_sharded_coordinate_check_gives_the_same_slopes(single, tmp_path, launcher):
    backend = "deepspeed" if launcher[0] == "deepspeed" else "fsdp"
    res = subprocess.run([*launcher, str(ROOT / "scripts" / "coord_check.py"), "--backend", backend, "--batch", "64",
                          "--out", str(tmp_path)], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    sharded = json.loads((tmp_path / "coord.json").read_text())
    assert sharded["world_size"] == 2 and sharded["passes"] and (tmp_path / "coord.png").stat().st_size > 10_000
    for step, modules in single["mup"]["slopes"].items():
        for module, slope in modules.items():
            assert sharded["slopes"][str(step)][module] == pytest.approx(slope, abs=1e-4), (step, module)
