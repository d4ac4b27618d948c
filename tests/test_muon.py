"""--optimizer muon: its rules, and the same training on one process, DDP, FSDP2 and ZeRO-1/2/3 (2 gloo ranks)."""
import glob
import json
import math
import shutil
import socket
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import lazy_runs, losses, run_cli
from mup_model import GPT, GPTConfig


def free_port():
    with socket.socket() as s:  # helpers sharing this machine run torchrun too: no fixed port
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port())
DEEPSPEED = ("deepspeed", "--num_gpus", "2", "--master_port", free_port())
# 10 steps of 8 sequences; every step checkpointed, so step 1's weights and a mid-run resume are at hand
COMMON = ["--optimizer", "muon", "--max_steps", "10", "--train_batch_size", "8", "--lr_scheduler_type", "cosine",
          "--weight_decay", "0.1", "--save_interval", "1", "--keep_checkpoints", "0"]
BACKENDS = {"single": ((sys.executable,), []), "ddp": (TORCHRUN, ["--backend", "ddp"]),
            "fsdp": (TORCHRUN, ["--backend", "fsdp"]),
            "zero0": (TORCHRUN, ["--backend", "deepspeed", "--zero_stage", "0"]),
            "zero1": (TORCHRUN, ["--backend", "deepspeed", "--zero_stage", "1"]),
            "zero2": (TORCHRUN, ["--backend", "deepspeed", "--zero_stage", "2"]),
            "zero3": (DEEPSPEED, ["--zero_stage", "3"]),  # as users launch it: the model built in zero.Init
            "zero3_offload": (TORCHRUN, ["--backend", "deepspeed", "--zero_stage", "3", "--offload", "cpu"])}


def test_muon_rules_hold_the_update_scale_per_matrix_and_keep_adamw_groups():
    cfg = GPTConfig(arch="llama", n_head=4, head_width=16, base_head_width=16, n_kv_head=2)
    model = GPT(cfg)
    adamw, muon = model.param_rules(), model.param_rules("mup")
    w, kv, h = cfg.width, 2 * 16, cfg.mlp_hidden
    for name, (cls, rule) in muon.items():
        if adamw[name][0] != "hidden":
            assert (cls, rule) == adamw[name], name  # embeddings, vectors, readout: AdamW's rules unchanged
            continue
        assert cls == "muon" and rule.init_std == adamw[name][1].init_std
        fans = {"c_attn": (w, w), "c_gate": (w, h), "c_fc": (w, h), "attn.c_proj": (w, w), "mlp.c_proj": (h, w)}
        fan_in, fan_out = fans[next(k for k in fans if k in name)]
        assert rule.lr_mult == pytest.approx(math.sqrt(fan_out / fan_in)) and rule.lr_mult * rule.wd_mult == 1
        moon = model.param_rules("moonlight")[name][1]
        assert moon.lr_mult == pytest.approx(0.2 * math.sqrt(max(fan_out, fan_in)))
        assert model.param_rules("none")[name][1].lr_mult == 1
    # the fused q, k, v is orthogonalized as three blocks, k's and v's scaled by sqrt(kv / w) against q's
    kv_scale = math.sqrt(kv / w)
    assert model.muon_blocks("mup") == {f"h.{i}.attn.c_attn.weight": ((w, kv, kv), (1.0, kv_scale, kv_scale))
                                        for i in range(cfg.n_layer)}


def test_fused_qkv_is_orthogonalized_block_by_block():
    from mupgpt.muon import newton_schulz
    g = torch.randn(96, 32, generator=torch.Generator().manual_seed(0))
    g[:32] *= 1e-3  # q's gradient far smaller than k's and v's, as at a zero-initialised query
    whole, split = newton_schulz(g, 5, 1e-7, ()), newton_schulz(g, 5, 1e-7, ((32, 32, 32), (1.0, 1.0, 1.0)))
    q_whole, q_split = torch.linalg.matrix_norm(whole[:32], 2), torch.linalg.matrix_norm(split[:32], 2)
    assert q_split > 0.5 and q_whole < 0.1  # fused, q's block gets almost none of the orthogonal update


def test_newton_schulz_on_a_cpu_is_torchs_iteration_in_the_matrixs_dtype():
    """On a CPU the iteration runs in fp32 (torch's bf16 is many times slower there): it matches the same
    iteration in fp64 to fp32 precision, which torch's bf16 result does not, and stays torch's otherwise."""
    from torch.optim._muon import _zeropower_via_newtonschulz

    from mupgpt.muon import NS_COEFFICIENTS, newton_schulz
    for shape in ((48, 32), (32, 80)):
        g = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
        ours, exact = newton_schulz(g, 5, 1e-7, ()), newton_schulz(g.double(), 5, 1e-7, ())
        torchs = _zeropower_via_newtonschulz(g, NS_COEFFICIENTS, 5, 1e-7).float()
        assert ours.dtype == torch.float32 and exact.dtype == torch.float64
        assert (ours.double() - exact).abs().max() < 1e-5 < (torchs.double() - exact).abs().max()
        assert (ours - torchs).abs().max() < 0.05


def test_muon_scale_mup_is_width_free_moonlight_grows_and_depth_follows_completep():
    def lr(scale, n_head, n_layer=2, alpha=0.0):
        cfg = GPTConfig(n_head=n_head, head_width=16, base_head_width=16, base_width=32, n_layer=n_layer,
                        base_n_layer=2, depth_alpha=alpha)
        return GPT(cfg).param_rules(scale)["h.0.mlp.c_fc.weight"][1].lr_mult
    assert lr("mup", 2) == lr("mup", 16) == 2.0  # sqrt(4w / w) at every width
    assert lr("moonlight", 16) == pytest.approx(math.sqrt(8) * lr("moonlight", 2))  # sqrt(width)
    assert lr("mup", 2, n_layer=8, alpha=1.0) == pytest.approx(2.0)  # d^(a-1) = 1 under CompleteP
    assert lr("mup", 2, n_layer=8, alpha=0.5) == pytest.approx(2.0 * 4 ** -0.5)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus, data_dir):
    """Each backend's run, made on first use and shared by the tests."""
    return lazy_runs(tmp_path_factory.mktemp("muon"), corpus, data_dir, COMMON, BACKENDS)


def weights(run_dir, step):
    return load_file(run_dir / "checkpoints" / f"step_{step:08d}" / "model.safetensors")


@pytest.mark.parametrize("name", ["ddp", "fsdp", "zero0", "zero1", "zero2", "zero3", "zero3_offload"])
def test_two_ranks_step_like_one_process(runs, name):
    one, two = runs("single"), runs(name)
    assert json.loads((two / "config.json").read_text())["resolved"]["world_size"] == 2
    first_one, first_two = weights(one, 1), weights(two, 1)
    for k in first_one:  # per element, within fp32 rounding of the weights
        torch.testing.assert_close(first_two[k], first_one[k], rtol=1.3e-6, atol=1e-5, msg=k)
    moved = weights(one, 2)["h.0.mlp.c_fc.weight"] - first_one["h.0.mlp.c_fc.weight"]
    assert moved.abs().max() > 1e-3  # Muon really steps the hidden matrices (far beyond the tolerance)
    assert losses(two) == pytest.approx(losses(one), rel=1e-5, abs=1e-5)
    # the gradient norm before clipping, which clips step 1 (over --grad_clip 1): the gradient's, not the updates'
    assert losses(two, "grad_norm") == pytest.approx(losses(one, "grad_norm"), rel=1e-5)
    assert losses(one, "grad_norm")[0] > 1


def test_zero3_offloaded_to_nvme_steps_like_one_process(libaio, runs, tmp_path):
    nvme = runs("zero3_offload", "--offload", "nvme", "--nvme_path", tmp_path, run_name="zero3_nvme")
    assert any(tmp_path.rglob("*"))  # DeepSpeed's swap files went there
    assert losses(nvme) == pytest.approx(losses(runs("single")), rel=1e-5, abs=1e-5)


def test_deepspeed_leaves_no_shared_memory_behind(runs):
    """DeepSpeed's CPU all-reduce names a 69 MB /dev/shm file per rank after the master port; the trainer
    unlinks them once mapped, or each run on a new port would keep its files in RAM."""
    runs("zero3")
    port = DEEPSPEED[DEEPSPEED.index("--master_port") + 1]
    assert not glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*")


@pytest.mark.parametrize("name", ["single", "ddp", "zero1", "zero2", "zero3"])
def test_accumulation_4_equals_1(runs, name):
    """8 sequences a step, each rank's share in one micro batch (one process: 1 x 8; 2 ranks: 1 x 4 each, the
    backend's own run) against 4 accumulated micro batches (4 x 2; 2 ranks: 4 x 1 each)."""
    if name == "single":
        whole, micro = runs(name, "--per_device_train_batch_size", "8", run_name=f"{name}_micro8"), "2"
    else:
        whole, micro = runs(name), "1"
    accumulated = runs(name, "--per_device_train_batch_size", micro, run_name=f"{name}_accumulated")
    assert json.loads((accumulated / "config.json").read_text())["resolved"]["gradient_accumulation_steps"] == 4
    assert losses(accumulated) == pytest.approx(losses(whole), rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("name", ["single", "ddp", "fsdp", "zero1", "zero2", "zero3"])
def test_resume_is_bit_for_bit(runs, name):
    run_dir = runs(name)
    straight = losses(run_dir)
    final = load_file(run_dir / "model.safetensors")
    for step in range(6, 11):  # as if it had stopped after step 5
        shutil.rmtree(run_dir / "checkpoints" / f"step_{step:08d}")
    (run_dir / "summary.json").unlink()
    res = run_cli(runs.args(name, "--resume", "auto"), launcher=BACKENDS[name][0])
    assert res.returncode == 0 and "at step 5" in res.stdout, res.stderr[-3000:]
    assert losses(run_dir) == straight
    resumed = load_file(run_dir / "model.safetensors")
    assert all(torch.equal(resumed[k], final[k]) for k in final)


def test_deepspeed_refuses_muon_in_fp16():
    """(DeepSpeed's fp16 needs a GPU, so on a CPU the trainer refuses it before this check.)"""
    from mupgpt.config import parse_args
    from mupgpt.engines.deepspeed_zero import check_muon
    from mupgpt.errors import UsageError
    cfg = parse_args(["--backend", "deepspeed", "--optimizer", "muon"])
    check_muon(cfg, "bf16")
    with pytest.raises(UsageError, match="--precision bf16"):
        check_muon(cfg, "fp16")


def test_coordinate_check_passes_muon_under_the_mup_scale_and_flags_moonlight():
    """16..128 head width, 4 steps, 2 seeds: the mup scale keeps every activation's size; Moonlight's
    0.2 sqrt(max(fan_out, fan_in)) grows with width and the same check says so."""
    import coord_check
    result = {}
    for scale in ("mup", "moonlight"):
        args = coord_check.build_parser().parse_args(["--optimizer", "muon", "--muon_scale", scale, "--seeds", "2"])
        result[scale], _ = coord_check.run(args)
    assert result["mup"]["passes"], result["mup"]["violations"]
    assert result["mup"]["optimizer"] == "muon" and result["mup"]["logits_at_step1"] == 0.0
    assert not result["moonlight"]["passes"]
    assert result["moonlight"]["slopes"][4]["h.1.mlp"] > 0.15
