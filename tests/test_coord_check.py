"""The coordinate check passes muP and flags SP, in one process and on 2 ranks under FSDP2 and ZeRO-3;
the depth check tells CompleteP from the wrong depth rules, and gives the same slopes on 2 ranks."""
import json
import os
import subprocess
import sys

import pytest

import coord_check
from conftest import ROOT


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


def test_the_check_judges_the_query_init_the_trainer_uses(single):
    """Both start the query at zero (microsoft/mup's advice): with a random query the check would see the init's
    q.k/d_head shrink like d^-1/2 while the trainer trained another model."""
    from mup_model import GPT
    from mupgpt.config import parse_args
    from mupgpt.model_config import model_config
    trainer = GPT(model_config(parse_args([]), coord_check.VOCAB)).h[0].attn.c_attn.weight
    width = trainer.shape[1]
    assert trainer[:width].abs().max() == 0 and trainer[width:].std() > 0
    checked = coord_check.train_config(coord_check.build_parser().parse_args([]), "single", 16, 0, [16, 32])
    assert checked.query_zero_init and single["mup"]["query_zero_init"]
    assert single["mup"]["l1"]["16"][0][0]["h.0.attn.q"] == 0.0


def test_sp_is_flagged_its_logits_and_hidden_outputs_grow(single):
    sp = single["sp"]
    assert not sp["passes"]  # the power check: the same test fails SP
    assert sp["slopes"][2]["logits"] > 0.5 and sp["slopes"][4]["h.1.mlp"] > 0.5


def test_the_verdict_holds_at_16x_width_and_10_steps():
    """Head widths 16..256, 10 steps, 3 seeds. The last block's attention logits are mostly the learned query's
    overlap with the key's random part (a d^-1/2 CLT term: their slope reached -0.27 with 4 seeds, per-seed
    slopes scatter +-0.11); judged for growth they pass, every other module stays within |slope| 0.07."""
    flags = ["--head_widths", "16,32,64,128,256", "--steps", "10"]
    mup, _ = coord_check.run(coord_check.build_parser().parse_args(flags))
    assert mup["passes"] and mup["max_abs_slope"] <= coord_check.MAX_SLOPE, mup["violations"]
    sp_flags = ["--head_widths", "16,32,64,128,256", "--steps", "4", "--seeds", "1", "--parametrization", "sp"]
    sp, _ = coord_check.run(coord_check.build_parser().parse_args(sp_flags))  # still flagged at 16x
    assert not sp["passes"] and sp["slopes"][4]["logits"] > 0.5 and sp["slopes"][4]["h.1.mlp"] > 0.5


@pytest.mark.parametrize("logit_slope, passes", [(0.1, True), (-0.3, True), (0.3, False), (-1.0, False)])
def test_attention_logits_may_shrink_like_a_clt_term_but_not_like_a_wrong_scale(logit_slope, passes):
    """Up to d^-1/2 (the learned query meeting the key's random part) passes; d^-1 (an attention scale one
    power of d_head too small) and growth fail."""
    slopes = {2: {"h.1.attn.logits": logit_slope, "h.1.mlp": 0.05}}
    runs = {16: [[{"logits": 0.0}]]}
    assert coord_check.verdict(slopes, runs)["passes"] is passes


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


def depth_check(alpha):
    args = ["--depths", "2,4,8,16", "--depth_alpha", alpha, "--steps", "6", "--seeds", "2"]
    result, _ = coord_check.run(coord_check.build_parser().parse_args(args))
    judged = range(result["judged_from_step"], 7)
    return result, {m: [result["delta_slopes"][t][m] for t in judged] for m in result["delta_slopes"][6]}


def test_depth_check_separates_completep_from_no_scaling_and_from_lazy_blocks():
    """Learned part (|x - x at step 1|) against depth 2..16, width 32. CompleteP keeps every module within
    |slope| 0.3 (measured 0.24: this small a model is far from CompleteP's large-depth limit; the README's
    width-128 check over depths 4..32 passes the verdict's 0.15 bar); without depth
    scaling the residual stream's update grows like L^0.9, and alpha = 0.5 leaves the last block's
    query lazy (L^-0.5): both are flagged."""
    completep, slopes = depth_check("1")
    assert completep["judged_from_step"] == 3  # the zero readout takes step 1's whole gradient
    judged = [s for m, ss in slopes.items() if m not in coord_check.NOT_JUDGED_IN_DEPTH for s in ss]
    assert all(abs(s) <= 0.3 for s in judged), slopes
    none, slopes = depth_check("0")
    assert not none["passes"] and min(slopes["last.residual"]) > 0.6
    lazy, slopes = depth_check("0.5")
    assert not lazy["passes"] and max(slopes["last.attn.q"]) < -0.4


def test_completep_passes_the_depth_verdict_at_width_128():
    """The README's depth check (width 128, depths 4..32) at 6 steps and 2 seeds: CompleteP meets the
    verdict's own 0.15 bar (measured 0.098); without the branch multiplier the stream's update grows ~L^0.9."""
    args = ["--depths", "4,8,16,32", "--depth_alpha", "1", "--n_head", "4", "--head_width", "32", "--steps", "6",
            "--seeds", "2"]
    result, _ = coord_check.run(coord_check.build_parser().parse_args(args))
    assert result["passes"] and result["max_abs_slope"] <= coord_check.MAX_SLOPE, result["violations"]


DEPTH_ARGS = ["--depths", "2,4,8", "--depth_alpha", "1", "--steps", "5", "--seeds", "1"]


@pytest.fixture(scope="module")
def single_depth():
    """The depth check in one process on the whole batch: what both sharded depth checks are compared with."""
    result, _ = coord_check.run(coord_check.build_parser().parse_args([*DEPTH_ARGS, "--batch", "128"]))
    return result


# both under torchrun (ZeRO-3 with --backend deepspeed): the width check above runs DeepSpeed's own launcher
@pytest.mark.parametrize("backend", ["fsdp", "deepspeed"], ids=["fsdp", "zero3"])
def test_sharded_depth_check_gives_the_same_slopes(single_depth, tmp_path, backend):
    """The depth check on 2 ranks (half the batch each) learns what one process learns on the whole batch."""
    depth_args, single = DEPTH_ARGS, single_depth
    launcher = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29663")
    res = subprocess.run([*launcher, str(ROOT / "scripts" / "coord_check.py"), "--backend", backend, *depth_args,
                          "--batch", "64", "--out", str(tmp_path)], cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    sharded = json.loads((tmp_path / "coord.json").read_text())
    assert sharded["world_size"] == 2 and sharded["vary"] == "depth"
    assert sharded["passes"] == single["passes"] and sharded["judged_from_step"] == single["judged_from_step"]
    for step, modules in single["delta_slopes"].items():
        for module, slope in modules.items():
            assert sharded["delta_slopes"][str(step)][module] == pytest.approx(slope, abs=1e-4), (step, module)


@pytest.mark.parametrize("flags", [["--depths", "2,x"], ["--depths", "0,4"], ["--head_widths", "16"],
                                   ["--head_widths", "8,16", "--steps", "1"], ["--depths", "2,4", "--steps", "2"]])
def test_bad_sizes_get_one_line_and_status_2(script, flags):
    """In this process (as __main__); test_tools_input.py runs coord_check.py's refusal as a real process."""
    res = script("scripts/coord_check.py", *flags)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and res.stderr.startswith("error: "), res.stderr


@pytest.mark.parametrize("flags, words", [
    (["--shard_group_size", "2"], "--backend single does not"),
    (["--backend", "deepspeed", "--shard_group_size", "2"], "use --backend fsdp"),
])
def test_a_shard_group_the_check_cannot_use_is_one_line(script, flags, words):
    res = script("scripts/coord_check.py", "--head_widths", "8,16", *flags)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and words in res.stderr, res.stderr
