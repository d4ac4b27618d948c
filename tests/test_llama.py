"""--arch llama (RMSNorm, SwiGLU, RoPE, grouped-query attention, no biases) under the same muP rules:
the pieces against direct computations, the rules by name, and training on every backend like one process."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, losses, run_cli, run_main, trainer_args
from mup_model import GPT, GPTConfig, param_class, rope
from mupgpt.config import parse_args
from mupgpt.model_config import model_config

LLAMA = ["--arch", "llama", "--n_head", "4", "--n_kv_head", "2", "--head_width", "8", "--base_head_width", "8"]


def llama(**kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(arch="llama", vocab_size=64, block_size=16, **kw))


def test_rope_is_a_complex_rotation_of_each_pair():
    B, H, T, d = 2, 3, 11, 8
    x = torch.randn(B, H, T, d, dtype=torch.float64)
    pairs = torch.complex(x[..., : d // 2], x[..., d // 2:])  # (x_i, x_{i+d/2}) as one complex number
    theta = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    turned = pairs * torch.polar(torch.ones(T, d // 2, dtype=torch.float64), torch.arange(T)[:, None] * theta)
    expected = torch.cat((turned.real, turned.imag), dim=-1)
    assert torch.allclose(rope(x.float()).double(), expected, atol=1e-5)
    assert torch.equal(rope(x.float())[..., 0, :], x.float()[..., 0, :])  # position 0 does not turn
    # what attention sees depends on relative positions only: q_t . k_s after rope is a function of t - s
    q, k = torch.randn(1, 1, 1, d).expand(1, 1, T, d), torch.randn(1, 1, 1, d).expand(1, 1, T, d)
    scores = rope(q)[0, 0] @ rope(k)[0, 0].T
    assert torch.allclose(scores.diagonal(2), scores.diagonal(2)[:1].expand(T - 2), atol=1e-5)


def direct_attention(attn, x):
    """Causal softmax attention written out, query head h reading K/V head h // (n_head / n_kv_head)."""
    B, T, C = x.shape
    hd, nh, nkv = attn.head_width, attn.n_head, attn.n_kv_head
    q, k, v = attn.c_attn(x).split([C, nkv * hd, nkv * hd], dim=2)
    q = q.view(B, T, nh, hd).transpose(1, 2)
    k, v = k.view(B, T, nkv, hd).transpose(1, 2), v.view(B, T, nkv, hd).transpose(1, 2)
    q, k = rope(q), rope(k)
    heads = []
    for h in range(nh):
        g = h // (nh // nkv)
        s = q[:, h] @ k[:, g].transpose(-2, -1) * attn.scale
        s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        heads.append(s.softmax(-1) @ v[:, g])
    return attn.c_proj(torch.stack(heads, 1).transpose(1, 2).reshape(B, T, C))


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_grouped_query_attention_is_attention_with_shared_kv_heads(n_kv_head):
    """n_kv_head = n_head is plain multi-head attention; fewer K/V heads are each read by a group of query heads."""
    attn = llama(n_head=4, n_kv_head=n_kv_head, head_width=8).h[0].attn
    x = torch.randn(2, 10, 32)
    with torch.no_grad():
        assert torch.allclose(attn(x), direct_attention(attn, x), atol=1e-5)
    assert attn.c_attn.weight.shape == (32 + 2 * n_kv_head * 8, 32)


def test_gqa_equals_mha_with_repeated_kv_weights():
    # a zero readout would hide any difference
    gqa = llama(n_head=4, n_kv_head=2, head_width=8, readout_zero_init=False)
    mha = llama(n_head=4, n_kv_head=4, head_width=8, readout_zero_init=False)
    state = gqa.state_dict()
    for name, w in list(state.items()):
        if name.endswith("c_attn.weight"):
            q, k, v = w.split([32, 16, 16])
            rep = lambda t: t.view(2, 8, 32).repeat_interleave(2, dim=0).reshape(32, 32)  # noqa: E731
            state[name] = torch.cat([q, rep(k), rep(v)])
    mha.load_state_dict(state)
    idx = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        logits = gqa(idx)
        assert logits.abs().mean() > 0.1 and torch.allclose(logits, mha(idx), atol=1e-5)


def test_llama_parameters_fall_in_the_rules_table_by_name():
    assert GPTConfig(arch="llama", n_head=4, head_width=8).mlp_hidden == 128  # 8/3 x 32 = 85.3, rounded up to 64s
    model = llama(n_head=4, n_kv_head=2, head_width=8, n_layer=2, mlp_hidden=96, query_zero_init=True,
                  readout_zero_init=False)
    rules = model.param_rules()
    classes = {n: c for n, (c, _) in rules.items()}
    assert classes == {n: param_class(n) for n, _ in model.named_parameters()}
    assert classes["h.0.ln_1.weight"] == classes["h.1.ln_2.weight"] == "block_vector"
    assert classes["ln_f.weight"] == "final_norm" and classes["wte.weight"] == "embedding"
    assert classes["lm_head.weight"] == "readout" and "wpe.weight" not in classes
    assert not any(n.endswith(".bias") for n in classes)  # no biases
    for name in ("attn.c_attn", "attn.c_proj", "mlp.c_gate", "mlp.c_fc"):
        assert rules[f"h.0.{name}.weight"][1].init_std == pytest.approx(1 / math.sqrt(32)), name
    assert rules["h.0.mlp.c_proj.weight"][1].init_std == pytest.approx(1 / math.sqrt(96))  # fan_in = mlp_hidden
    w = model.h[0].attn.c_attn.weight
    assert torch.count_nonzero(w[:32]) == 0 and torch.count_nonzero(w[32:]) == w[32:].numel()  # query zero-init: q rows
    assert model.h[0].mlp.c_proj.weight.std().item() == pytest.approx(1 / math.sqrt(96), rel=0.1)
    assert torch.equal(model.h[0].ln_1.weight, torch.ones(32))


def test_llama_hidden_lrs_scale_with_width_like_gpt2():
    """The muP LR table is the same system: at m = 4 the hidden LRs (SwiGLU's three matrices, grouped qkv)
    are 1/4 of the base LR, gains and embeddings keep it."""
    base = GPT(GPTConfig(arch="llama", n_head=4, head_width=32, base_head_width=8, n_kv_head=2, vocab_size=64))
    lrs = {n: r.lr_mult for n, (_, r) in base.param_rules().items()}
    assert base.cfg.width_mult == 4
    for n in ("h.0.mlp.c_gate.weight", "h.0.mlp.c_fc.weight", "h.0.mlp.c_proj.weight", "h.0.attn.c_attn.weight"):
        assert lrs[n] == pytest.approx(0.25), n
    assert lrs["h.0.ln_1.weight"] == lrs["wte.weight"] == lrs["ln_f.weight"] == 1.0


@pytest.mark.parametrize("flags, message", [
    (["--arch", "llama", "--n_head", "4", "--n_kv_head", "3"], "--n_kv_head 3 must divide --n_head 4"),
    (["--n_head", "4", "--n_kv_head", "2"], "is for --arch llama"),
    (["--arch", "llama", "--mlp_hidden", "-1"], "--mlp_hidden must be 0 or more"),
    (["--arch", "mamba"], "--arch: invalid choice"),
    (["--arch", "llama", "--seq_len", "100000000"],
     "--seq_len 100000000 is too long: its attention and activations"),  # no table
])
def test_bad_llama_flags_are_one_line_and_exit_2(tmp_path, corpus, data_dir, flags, message):
    res = run_main(trainer_args(tmp_path, corpus, data_dir, "--max_steps", "1", *flags))  # in this process
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and message in lines[0], res.stderr[-2000:]
    assert not any(tmp_path.iterdir())  # nothing written


def test_llama_trains_exports_samples_and_resumes(tmp_path, corpus, data_dir):
    args = trainer_args(tmp_path, corpus, data_dir, *LLAMA, "--max_steps", "20", "--learning_rate", "1e-2",
                        "--gradient_checkpointing", "--save_interval", "10")
    res = run_cli(args)
    assert res.returncode == 0, res.stderr[-2000:]
    run_dir = next(tmp_path.glob("llama_mup_4x8_*"))
    straight = losses(run_dir)
    assert straight[-1] < straight[0] - 1.0
    saved = json.loads((run_dir / "model_config.json").read_text())
    assert saved["arch"] == "llama" and saved["n_kv_head"] == 2
    assert "wpe.weight" not in load_file(run_dir / "model.safetensors")
    # resume from step 10 reproduces steps 11..20
    import shutil
    shutil.rmtree(run_dir / "checkpoints" / "step_00000020")
    os.remove(run_dir / "summary.json")
    res = run_cli([*args, "--resume", "auto"])
    assert res.returncode == 0 and "at step 10" in res.stdout, res.stderr[-2000:]
    assert losses(run_dir) == straight
    # a run of the other arch is refused at resume with one line naming the flag
    res = run_main(trainer_args(tmp_path, corpus, data_dir, "--n_head", "4", "--head_width", "8", "--base_head_width",
                                "8", "--max_steps", "20", "--run_name", run_dir.name, "--resume", "auto"))
    assert res.returncode == 2 and "--arch gpt2 (the checkpoint has llama)" in res.stderr, res.stderr[-2000:]
    sample = subprocess.run([sys.executable, str(ROOT / "scripts" / "sample.py"), str(run_dir), "--max_new_tokens",
                             "8"],
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert sample.returncode == 0, sample.stderr[-2000:]
    export = subprocess.run([sys.executable, str(ROOT / "scripts" / "export_hf.py"), str(run_dir),
                             str(tmp_path / "hf")],
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert (export.returncode == 2 and "holds a 'llama' model" in export.stderr
            and len(export.stderr.strip().splitlines()) == 1)


TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29681")
COMMON = [*LLAMA, "--n_layer", "2", "--max_steps", "10", "--train_batch_size", "8", "--lr_scheduler_type", "cosine",
          "--weight_decay", "0.1", "--precision", "fp32", "--save", "false"]
# The engines that see the architecture, under torchrun: ZeRO-3 builds the blocks in zero.Init and marks
# them leaf modules, FSDP2 groups the blocks, and both checkpoint each block (DeepSpeed's and torch's
# checkpointing). DDP and ZeRO-1/2 see only parameters and flat buffers, the same for either architecture:
# test_sharded.py runs each of them on gpt2, with offload.
BACKENDS = {
    "zero3": (TORCHRUN, ["--backend", "deepspeed", "--zero_stage", "3", "--gradient_checkpointing"]),
    "fsdp": (TORCHRUN, ["--backend", "fsdp", "--gradient_checkpointing"]),
}


@pytest.fixture(scope="module")
def single_llama(tmp_path_factory, corpus, data_dir):
    out = tmp_path_factory.mktemp("llama")
    res = run_cli(trainer_args(out, corpus, data_dir, "--run_name", "single", *COMMON))
    assert res.returncode == 0, res.stderr[-2000:]
    return out


@pytest.mark.parametrize("name", list(BACKENDS))
def test_llama_fp32_losses_match_one_process(single_llama, corpus, data_dir, name):
    launcher, flags = BACKENDS[name]
    res = run_cli(trainer_args(single_llama, corpus, data_dir, "--run_name", name, *COMMON, *flags), launcher=launcher)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert json.loads((single_llama / name / "config.json").read_text())["resolved"]["world_size"] == 2
    assert losses(single_llama / name) == pytest.approx(losses(single_llama / "single"), rel=1e-5)


PROBE_LLAMA = ["--arch", "llama", "--n_kv_head", "2", "--precision", "fp32"]


@pytest.fixture(scope="module")
def probed_llama(tmp_path_factory):
    from test_sharded import PROBE_FLAGS, probe
    return probe(tmp_path_factory.mktemp("probe"), {"zero3": ["--backend", "deepspeed", "--zero_stage", "3"],
                                                    "fsdp": ["--backend", "fsdp"]}, *PROBE_FLAGS, *PROBE_LLAMA)


@pytest.mark.parametrize("name", ["zero3", "fsdp"])
def test_llama_gathered_init_and_first_step_equal_one_process(probed_llama, name):
    """Under zero.Init (each rank builds its shard) and FSDP2 the gathered llama init is the one-process
    model's, bit for bit, and Adam's first step is the table's for each group (fp32)."""
    from test_sharded import PROBE_FLAGS, first_adamw_step
    cfg = parse_args([*PROBE_FLAGS, *PROBE_LLAMA])
    torch.manual_seed(cfg.seed)
    reference = GPT(model_config(cfg, 257))
    x = torch.randint(0, 257, (8, cfg.seq_len), generator=torch.Generator().manual_seed(0))
    reference(x, x.roll(-1, 1)).backward()
    init, step1 = (load_file(probed_llama / name / f"{step}.safetensors") for step in ("init", "step1"))
    assert set(init) == {n for n, _ in reference.named_parameters()}
    for pname, p in reference.named_parameters():
        assert torch.equal(init[pname], p.detach()), pname
        expected = first_adamw_step(init[pname], p.grad, param_class(pname)) - init[pname]
        moved, has_grad = step1[pname] - init[pname], p.grad != 0
        error = (moved - expected)[has_grad].abs().median() / expected[has_grad].abs().median()
        assert error < 0.02, (pname, error.item())


def test_llama_coordinate_check_passes_mup_and_flags_sp():
    import coord_check
    mup, _ = coord_check.run(coord_check.build_parser().parse_args(["--arch", "llama"]))
    assert mup["passes"], mup["violations"]
    assert "wpe" not in mup["slopes"][4] and {"h.1.mlp", "h.0.attn.logits", "logits"} <= set(mup["slopes"][4])
    sp, _ = coord_check.run(coord_check.build_parser().parse_args(["--arch", "llama", "--parametrization", "sp",
                                                                    "--seeds", "1", "--steps", "3"]))
    assert not sp["passes"] and sp["slopes"][2]["logits"] > 0.5 and sp["slopes"][3]["h.1.mlp"] > 0.5


def test_memory_estimator_counts_the_llama_model():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "estimate_memory.py"), "--arch", "llama", "--n_layer",
                          "2", "--n_head", "4", "--n_kv_head", "2", "--head_width", "16", "--vocab", "257", "--json"],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    cfg = GPTConfig(arch="llama", n_layer=2, n_head=4, n_kv_head=2, head_width=16, vocab_size=320, block_size=1024)
    assert json.loads(out.stdout)["params"] == sum(p.numel() for p in GPT(cfg).parameters())


@pytest.mark.parametrize("name, flags", [("checkpointing", ["--gradient_checkpointing"]), ("compiled", ["--compile"]),
                                         ("bf16", ["--precision", "bf16"])])
def test_llama_checkpointing_compile_and_bf16_train_like_eager_fp32(single_llama, corpus, data_dir, name, flags):
    """One process, against the eager fp32 run: activation checkpointing recomputes the same blocks (the same
    losses); torch.compile traces the forward (RoPE included) once, recompiles only for the evaluation, and matches
    within the gpt2 compile test's 1e-4; bf16 autocast stays within a bf16 ulp (2^-8), as the gpt2 bf16 tests."""
    res = run_cli(trainer_args(single_llama, corpus, data_dir, "--run_name", name, *COMMON, *flags),
                  env={"TORCH_LOGS": "dynamo,recompiles"})  # dynamo logs each frame it traces and each recompile
    assert res.returncode == 0, res.stderr[-3000:]
    traced = "start tracing forward" in res.stderr and "mup_model.py" in res.stderr
    assert traced == (name == "compiled"), res.stderr[-3000:]
    # the one recompile allowed is the final evaluation's: no_grad changes dynamo's grad-mode guard
    recompiles = res.stderr.count("Recompiling function")
    assert recompiles <= (name == "compiled") and recompiles == res.stderr.count("GLOBAL_STATE changed: grad_mode"), \
        res.stderr[-3000:]
    assert "recompile_limit" not in res.stderr, res.stderr[-3000:]
    got, fp32 = losses(single_llama / name), losses(single_llama / "single")
    assert len(got) == len(fp32) == 10
    if name == "checkpointing":
        assert got == fp32
    elif name == "compiled":
        assert got == pytest.approx(fp32, rel=1e-4)
    else:
        assert got == pytest.approx(fp32, rel=2 ** -8) and got != fp32  # it really ran in bf16
