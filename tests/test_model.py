"""The muP rules as the model and optimizer apply them: init scaling, m = 1 equivalence, LRs reaching Adam."""
import json
import math

import numpy as np
import pytest
import torch

from mup_model import GPT, GPTConfig, param_class
from mupgpt.optim import param_groups


def build(head_width, parametrization="mup", seed=0, **kw):
    torch.manual_seed(seed)
    kw = {"n_layer": 2, **kw}
    cfg = GPTConfig(vocab_size=128, block_size=16, n_head=2, head_width=head_width, base_head_width=8,
                    parametrization=parametrization, **kw)
    return GPT(cfg)


def std_slope(parametrization, name, **kw):
    """Slope of log2(std) against log2(width) for one parameter across widths 8x apart."""
    widths = [8, 16, 32, 64]
    stds = [build(w, parametrization, **kw).get_parameter(name).std().item() for w in widths]
    return np.polyfit(np.log2(widths), np.log2(stds), 1)[0]


@pytest.mark.parametrize("name", ["h.0.attn.c_attn.weight", "h.0.attn.c_proj.weight", "h.1.mlp.c_fc.weight",
                                  "h.1.mlp.c_proj.weight"])
def test_hidden_init_std_scales_as_inverse_sqrt_width(name):
    assert std_slope("mup", name) == pytest.approx(-0.5, abs=0.05)
    assert std_slope("sp", name) == pytest.approx(-0.5, abs=0.05)


def test_embedding_init_is_width_independent():
    assert std_slope("mup", "wte.weight") == pytest.approx(0.0, abs=0.05)
    assert std_slope("mup", "wpe.weight") == pytest.approx(0.0, abs=0.05)


def test_readout_init_is_width_independent_under_mup_and_shrinks_under_sp():
    assert std_slope("mup", "lm_head.weight", readout_zero_init=False) == pytest.approx(0.0, abs=0.05)
    assert std_slope("sp", "lm_head.weight", readout_zero_init=False) == pytest.approx(-0.5, abs=0.05)
    assert build(32).lm_head.weight.abs().max().item() == 0.0  # zero init is the default


def test_query_zero_init_zeroes_only_the_query_third():
    w = build(16, query_zero_init=True).h[0].attn.c_attn.weight
    assert w[:32].abs().max().item() == 0.0 and w[32:].abs().min().item() >= 0 and w[32:].std().item() > 0


def test_logit_and_attention_multipliers():
    narrow, wide = build(8), build(64)
    assert narrow.logit_scale == 1.0 and wide.logit_scale == pytest.approx(1 / 8)
    assert narrow.h[0].attn.scale == pytest.approx(1 / math.sqrt(8))  # SP's value at the base width
    assert wide.h[0].attn.scale == pytest.approx(math.sqrt(8) / 64)  # attn_mult / d_head
    assert build(64, "sp").h[0].attn.scale == pytest.approx(1 / math.sqrt(64))
    assert build(64, "sp").logit_scale == 1.0


def train_losses(parametrization, head_width=8, steps=5, **kw):
    model = build(head_width, parametrization, seed=3, readout_zero_init=False, **kw)
    opt = torch.optim.AdamW(param_groups(model, 1e-2, 0.1), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(steps):
        x = torch.randint(0, 128, (4, 16), generator=gen)
        loss = model(x, x.roll(-1, 1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        out.append(loss.item())
    return out


def test_mup_equals_sp_at_base_width():
    assert train_losses("mup") == train_losses("sp")  # bit for bit: same network, same optimizer


def test_mup_differs_from_sp_away_from_base_width():
    assert train_losses("mup", head_width=32) != train_losses("sp", head_width=32)  # power check


@pytest.mark.parametrize("n_layer,alpha", [(2, 0.0), (8, 0.5), (8, 1.0)])
def test_adam_first_step_moves_each_parameter_by_its_group_lr(n_layer, alpha):
    """Adam's first update is lr * g / (|g| + eps) ~ lr per element: it reads back each group's LR,
    with the width factor 1/m and, 4x deeper than the base depth, CompleteP's depth factor 4^(alpha-1)."""
    lr, m, d = 1e-3, 4, n_layer / 2
    model = build(8 * m, readout_zero_init=False, n_layer=n_layer, base_n_layer=2, depth_alpha=alpha)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(param_groups(model, lr, 0.0, eps=1e-12), lr=lr)
    x = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(1))
    model(x, x.roll(-1, 1)).backward()
    opt.step()
    depth_lr = d ** (alpha - 1) if alpha else 1.0
    expected = {"hidden": lr / m * depth_lr, "block_vector": lr * depth_lr, "embedding": lr, "readout": lr,
                "final_norm": lr}
    for name, p in model.named_parameters():
        moved = (p.detach() - before[name]).abs()
        moved = moved[p.grad.abs() > 0]  # rows of tokens absent from the batch get no gradient
        assert moved.median().item() == pytest.approx(expected[param_class(name)], rel=1e-3), name


def test_depth_scales_residual_branches_and_block_eps():
    """(L / L_base)^-alpha on every residual branch and on the Adam eps of every block parameter."""
    for alpha in (0.5, 1.0):
        model = build(16, n_layer=8, base_n_layer=2, depth_alpha=alpha)
        assert all(b.branch_scale == pytest.approx(4 ** -alpha) for b in model.h)
        eps = {g["name"]: g["eps"] for g in param_groups(model, 1e-2, 0.1, eps=1e-8)}
        assert eps == pytest.approx({"hidden": 1e-8 * 4 ** -alpha, "block_vector": 1e-8 * 4 ** -alpha,
                                     "embedding": 1e-8, "readout": 1e-8, "final_norm": 1e-8})
    off = build(16, n_layer=8, base_n_layer=2, depth_alpha=0.0)
    assert off.h[0].branch_scale == 1.0 and all(r.lr_mult in (1.0, 0.5) and r.eps_mult == 1.0
                                                 for _, r in off.param_rules().values())


def test_depth_rules_are_the_identity_at_the_base_depth():
    assert train_losses("mup", depth_alpha=1.0) == train_losses("mup")  # n_layer = base_n_layer = 2


def test_param_classes_come_from_names_not_shapes():
    model = build(16)
    expected = {n: param_class(n) for n, _ in model.named_parameters()}
    for p in model.parameters():
        p.data = torch.empty(0)  # what a ZeRO-3 partitioned parameter looks like locally
    assert {n: c for n, (c, _) in model.param_rules().items()} == expected
    groups = param_groups(model, 1e-2, 0.1)
    hidden = [g for g in groups if g["name"] == "hidden"]
    assert (len(hidden) == 1 and hidden[0]["lr"] == pytest.approx(1e-2 / 2)
            and hidden[0]["weight_decay"] == pytest.approx(0.2))
    assert all(g["weight_decay"] == 0 for g in groups if g["name"] in ("block_vector", "final_norm"))


def test_meta_device_build_then_reset_parameters_equals_eager_init():
    """reset_parameters replays the construction-time init in the same order: same seed, same weights."""
    eager = build(16, seed=11, readout_zero_init=False)
    with torch.device("meta"):
        model = GPT(eager.cfg)
    model.to_empty(device="cpu")
    torch.manual_seed(11)
    model.reset_parameters()
    for (name, a), (_, b) in zip(model.named_parameters(), eager.named_parameters()):
        assert torch.equal(a, b), name
    fan_in = 4 * 32  # the MLP's hidden, 4 x width
    assert model.h[0].mlp.c_proj.weight.std().item() == pytest.approx(1 / math.sqrt(fan_in), rel=0.1)


def test_mfu_counts_every_matmul_weight_and_no_embedding():
    from mupgpt.metrics import flops_per_token
    cfg = GPTConfig(vocab_size=320, block_size=64, n_layer=3, n_head=4, head_width=16)
    model = GPT(cfg)
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert flops_per_token(cfg) == 6 * matmul + 12 * cfg.n_layer * cfg.width * cfg.block_size


def rules_at(cfg, lr=1e-2, wd=0.1, eps=1e-8):
    """What a model's muP rules give: its AdamW groups (class -> lr, wd, eps), each parameter's rule init
    std, the logit multiplier and m."""
    model = GPT(cfg)
    groups = {g["name"]: (g["lr"], g["weight_decay"], g["eps"]) for g in param_groups(model, lr, wd, eps)}
    stds = {n: rule.init_std for n, (_, rule) in model.param_rules().items()}
    return groups, stds, model.logit_scale, cfg.width_mult


def test_widening_by_heads_or_by_head_width_gives_the_same_mup_rules():
    """Width 128 from a base of width 64 is m = 2 whether it has 8 heads of 16 (base 4 x 16) or 2 heads of
    64 (base 2 x 32); both get the rules table's values at m = 2. Only attention differs, as it is per head."""
    kw = dict(vocab_size=128, block_size=16, n_layer=2, base_width=64, readout_zero_init=False)
    by_heads = GPTConfig(n_head=8, head_width=16, base_head_width=16, **kw)
    by_head_width = GPTConfig(n_head=2, head_width=64, base_head_width=32, **kw)
    lr, wd, eps, m = 1e-2, 0.1, 1e-8, 2
    expected_groups = {"hidden": (lr / m, wd * m, eps), "block_vector": (lr, 0.0, eps), "embedding": (lr, wd, eps),
                       "readout": (lr, wd, eps), "final_norm": (lr, 0.0, eps)}
    fan_in = {"attn.c_attn": 128, "attn.c_proj": 128, "mlp.c_fc": 128, "mlp.c_proj": 512}
    for cfg in (by_heads, by_head_width):
        groups, stds, logit_scale, width_mult = rules_at(cfg, lr, wd, eps)
        assert width_mult == m and logit_scale == 1 / m
        assert groups == pytest.approx(expected_groups)
        assert stds["lm_head.weight"] == 1 / math.sqrt(64)  # gain / sqrt(base_width)
        assert stds["wte.weight"] == 0.02
        for key, n in fan_in.items():
            assert stds[f"h.0.{key}.weight"] == 1 / math.sqrt(n), key
    assert rules_at(by_heads) == rules_at(by_head_width)
    torch.manual_seed(0)
    measured = {cfg.n_head: GPT(cfg).h[0].mlp.c_fc.weight.std().item() for cfg in (by_heads, by_head_width)}
    assert measured == pytest.approx({8: 1 / math.sqrt(128), 2: 1 / math.sqrt(128)}, rel=0.02)
    # attention: 8 x 16 keeps its base's (4 x 16) scale 1/sqrt(16); 2 x 64 gets sqrt(32) / 64
    base = GPTConfig(n_head=4, head_width=16, base_head_width=16, **kw)
    assert GPT(by_heads).h[0].attn.scale == GPT(base).h[0].attn.scale == 1 / 4
    assert GPT(by_head_width).h[0].attn.scale == pytest.approx(math.sqrt(32) / 64)


def test_base_head_width_alone_keeps_its_old_meaning():
    """--base_head_width without --base_width: the base is n_head x base_head_width (the seed's spelling)."""
    cfg = GPTConfig(n_head=4, head_width=16, base_head_width=8)
    assert cfg.base_width == 32 and cfg.width_mult == 2
    assert GPT(cfg).h[0].attn.scale == pytest.approx(math.sqrt(8) / 16)


def test_a_base_that_is_not_whole_heads_is_refused():
    with pytest.raises(ValueError, match="give --base_head_width"):
        GPTConfig(n_head=4, head_width=16, base_width=48, base_head_width=32)
    with pytest.raises(ValueError, match="must be positive"):
        GPTConfig(base_width=-64)


def test_trainer_widens_by_heads_from_base_width_and_records_m(tmp_path, corpus, data_dir):
    """8 heads of 16 from --base_width 64: m = 2 reaches the optimizer, config.json and the log line."""
    from conftest import run_cli, trainer_args
    args = trainer_args(tmp_path, corpus, data_dir, "--run_name", "heads", "--max_steps", "1", "--save", "false",
                        "--n_head", "8", "--base_width", "64", "--learning_rate", "1e-2")
    res = run_cli(args)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "width 128 = 8x16, base 64 = 4x16 (m=2, mup)" in res.stdout
    resolved = json.loads((tmp_path / "heads" / "config.json").read_text())["resolved"]
    assert resolved["width_mult"] == 2 and resolved["model"]["base_width"] == 64
    lrs = {v["class"]: v["lr"] for v in json.loads((tmp_path / "heads" / "opt_config.json").read_text()).values()}
    assert lrs["hidden"] == pytest.approx(1e-2 / 2) and lrs["embedding"] == 1e-2
