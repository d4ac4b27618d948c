"""scripts/plan.py and mupgpt/plan.py: memory from the estimator, bytes from the ZeRO formulas, the fit rule,
bad input, and docs/planner.md's calibration table recomputed from its own rows."""
import re
import subprocess
import sys

import pytest

import estimate_memory
import plan as plan_cli
from conftest import ROOT
from mupgpt.memory import GIB, count_params
from mupgpt.plan import cluster, collectives, plan, plan_row, ring

SMALL = "--n_layer 4 --n_head 4 --head_width 64 --vocab_size 512 --seq_len 256 --per_device_train_batch_size 2"
GPT2_124M = ("--n_layer 12 --n_head 12 --head_width 64 --vocab_size 50304 --seq_len 1024 "
             "--per_device_train_batch_size 16")
LLAMA_8B = ("--arch llama --n_layer 32 --n_head 32 --head_width 128 --n_kv_head 8 --mlp_hidden 14336 "
            "--vocab_size 128256 --seq_len 8192 --per_device_train_batch_size 1 --gradient_checkpointing")


def setup(flags):
    a = plan_cli.parse(flags.split())
    c = cluster(a.gpu, a.gpus_per_node, a.nodes, a.peak_tflops, a.gpu_memory_gb, a.intra_gbps, a.inter_gbps,
                a.pcie_gbps, a.host_gbps, a.mfu, a.hbm_gbps)
    return plan_cli.model_of(a), c


def test_memory_column_is_the_estimators():
    model, c = setup(SMALL + " --gpus_per_node 4 --nodes 2")
    rows = plan(model, c)
    est_flags = {"DDP": ["--stage", "0"], "ZeRO-1": ["--stage", "1"], "ZeRO-2": ["--stage", "2"],
                 "ZeRO-3": ["--stage", "3"], "ZeRO-3 offload": ["--stage", "3", "--offload", "cpu"],
                 "FSDP2": ["--stage", "3", "--fsdp"]}
    assert {r["engine"] for r in rows} == set(est_flags) and len(rows) > len(est_flags)  # shard groups too
    for r in rows:
        # FSDP2's hybrid sharding holds what its shard group holds; DeepSpeed's hpZ keeps the partition over
        # every rank and adds a second copy of the bf16 weights partitioned over the group
        hpz = r["engine"].startswith("ZeRO-3") and r["replicas"] > 1
        ranks = c.world if hpz else r["shard_group"]
        args = estimate_memory.build_parser().parse_args(
            ["--n_layer", "4", "--n_head", "4", "--head_width", "64", "--vocab", "512", "--seq_len", "256",
             "--batch", "2", "--world_size", str(ranks), *est_flags[r["engine"]]])
        est = estimate_memory.estimate(args)
        second_copy = 2 * r["params"] / r["shard_group"] if hpz else 0
        assert r["memory_gib"] * GIB == pytest.approx(est["per_rank_device_bytes"] + second_copy, rel=1e-12), r
        assert r["host_gib"] * GIB == pytest.approx(est["per_rank_host_bytes"], rel=1e-12), r


def total(engine, P, w, K, R):
    return sum(b for _, _, b, _ in collectives(engine, P, w, K, R))


def test_bytes_follow_the_zero_paper():
    P, n = 1_000_000, 8
    # ZeRO-1/2: reduce-scatter + all-gather = one all-reduce's 2(n-1)/n of the weights; ZeRO-3 adds a gather: 1.5x
    assert total("ZeRO-2", P, 2, n, 1) == pytest.approx(2 * (n - 1) / n * 2 * P)
    assert total("ZeRO-1", P, 2, n, 1) == total("ZeRO-2", P, 2, n, 1)
    assert total("ZeRO-3", P, 2, n, 1) == pytest.approx(1.5 * total("ZeRO-2", P, 2, n, 1))
    # DDP all-reduces fp32 gradients; FSDP2 gathers in bf16 and reduce-scatters in fp32
    assert total("DDP", P, 2, n, 1) == pytest.approx(ring("all-reduce", 4 * P, n)) == pytest.approx(3.5 * 4 * P / 2)
    assert total("FSDP2", P, 2, n, 1) == pytest.approx((2 + 2 + 4) * P * (n - 1) / n)
    assert total("ZeRO-3", P, 2, 1, 1) == 0  # one rank moves nothing


def test_the_roofline_gives_back_the_profile_its_constants_come_from():
    """At the shape and GPU the efficiencies were measured on, each term is its kernels' profiled time
    (docs/planner.md: matmuls 16.1 ms, cuDNN attention 0.99 + 3.29 ms, fused AdamW 1.8 ms a step)."""
    model, c = setup(GPT2_124M + " --gpu H100 --gpus_per_node 1")
    row = plan_row(model, c, "DDP", 1)
    assert row["matmul_s"] == pytest.approx(16.1e-3, rel=0.01)
    assert row["attention_s"] == pytest.approx((0.99 + 3.29) * 1e-3, rel=0.01)
    assert row["optimizer_s"] == pytest.approx(1.8e-3, rel=0.02)
    assert row["compute_s"] == pytest.approx(row["matmul_s"] + row["attention_s"] + row["memory_s"]
                                             + row["optimizer_s"])


def test_each_compute_term_scales_with_its_own_resource():
    flags = LLAMA_8B + " --gpu H100 --gpus_per_node 8"
    model, c = setup(flags)
    base = plan_row(model, c, "FSDP2", 8)
    hbm = plan_row(model, setup(flags + " --hbm_gbps 6700")[1], "FSDP2", 8)  # twice the H100's
    assert (hbm["matmul_s"], hbm["attention_s"]) == (base["matmul_s"], base["attention_s"])
    assert (hbm["memory_s"], hbm["optimizer_s"]) == pytest.approx((base["memory_s"] / 2, base["optimizer_s"] / 2))
    peak = plan_row(model, setup(flags + " --peak_tflops 1978")[1], "FSDP2", 8)
    assert (peak["matmul_s"], peak["attention_s"]) == pytest.approx((base["matmul_s"] / 2, base["attention_s"] / 2))
    assert peak["memory_s"] == base["memory_s"]
    # full recompute: the FLOPs x 4/3 and the blocks' memory-bound forward once more
    no_ckpt, _ = setup(flags.replace(" --gradient_checkpointing", ""))
    plain = plan_row(no_ckpt, c, "FSDP2", 8)
    assert base["matmul_s"] == pytest.approx(plain["matmul_s"] * 4 / 3)
    assert base["attention_s"] == pytest.approx(plain["attention_s"] * 4 / 3)
    assert base["memory_s"] > plain["memory_s"]
    # the optimizer runs over the rank's shard: 8 ranks, an eighth of DDP's
    one = plan_row(model, setup(LLAMA_8B + " --gpu H100 --gpus_per_node 1")[1], "DDP", 1)
    assert one["optimizer_s"] == pytest.approx(8 * base["optimizer_s"])


def test_mfu_replaces_the_roofline_with_one_fraction_of_peak():
    model, c = setup(LLAMA_8B + " --gpu H100 --gpus_per_node 8 --mfu 0.4")
    row = plan_row(model, c, "FSDP2", 8)
    P, cfg, layer = count_params(model)
    flops = (6 * (32 * layer + cfg.vocab_size * 4096) + 12 * 32 * 4096 * 8192) * 4 / 3
    assert row["compute_s"] == pytest.approx(8192 * flops / (989e12 * 0.4))
    assert row["optimizer_s"] == 0 and row["memory_s"] is None


def test_hybrid_sharding_sends_only_the_replica_all_reduce_across_nodes():
    model, c = setup(SMALL + " --gpus_per_node 8 --nodes 2")
    P = plan_row(model, c, "FSDP2", 16)["params"]
    in_node = plan_row(model, c, "FSDP2", 8)  # shard in a node, 2 replicas across nodes
    assert in_node["inter_node_bytes"] == pytest.approx(ring("all-reduce", 4 * P / 8, 2))  # fp32 gradient shards
    assert in_node["inter_node_bytes"] == pytest.approx(4 * P / 8)
    whole = plan_row(model, c, "FSDP2", 16)  # one shard group across both nodes: everything crosses
    assert whole["inter_node_bytes"] == pytest.approx(total("FSDP2", P, 2, 16, 1))
    assert in_node["comm_s"] < whole["comm_s"]
    one_node, c1 = setup(SMALL + " --gpus_per_node 8 --nodes 1")
    assert plan_row(one_node, c1, "FSDP2", 8)["inter_node_bytes"] == 0


def test_deepspeed_hpz_keeps_the_forward_gather_and_reduce_scatter_across_all_ranks():
    """ZeRO-3 with a shard group is DeepSpeed's hpZ: only the backward's gather stays in the node, and each
    GPU holds a second copy of the weights partitioned K ways besides the partition over every rank."""
    model, c = setup(SMALL + " --gpus_per_node 8 --nodes 2")
    whole, hpz = plan_row(model, c, "ZeRO-3", 16), plan_row(model, c, "ZeRO-3", 8)
    P = whole["params"]
    assert hpz["inter_node_bytes"] == pytest.approx(2 * ring("all-gather", 2 * P, 16))  # fwd gather + reduce-scatter
    assert whole["inter_node_bytes"] == pytest.approx(3 * ring("all-gather", 2 * P, 16))
    assert hpz["memory_gib"] * GIB == pytest.approx(whole["memory_gib"] * GIB + 2 * P / 8)


def test_what_does_not_fit_is_not_listed():
    model, c = setup(LLAMA_8B + " --gpu H100 --gpus_per_node 8")
    rows = plan(model, c)
    assert rows and all(r["memory_gib"] <= 80 for r in rows)
    assert "DDP" not in {r["engine"] for r in rows}  # 16 bytes a parameter of 8B: 120 GiB
    assert plan_row(model, c, "DDP", 8)["memory_gib"] > 80
    assert [r["step_s"] for r in rows] == sorted(r["step_s"] for r in rows)
    res = subprocess.run([sys.executable, "scripts/plan.py", *LLAMA_8B.split(), "--gpu", "custom",
                          "--peak_tflops", "100", "--gpu_memory_gb", "4", "--hbm_gbps", "1000"], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 1 and res.stdout.startswith("nothing fits in 4 GiB per GPU"), res.stdout + res.stderr


@pytest.mark.parametrize("flags,line", [
    (["--gpu", "H10"], "error: --gpu H10 is not one of H100, H200, A100, B200 (did you mean H100?): "
                       "or pass --gpu custom with --peak_tflops, --gpu_memory_gb and --hbm_gbps"),
    (["--nodes", "0"], "error: --nodes must be at least 1, not 0"),
    (["--gpu", "custom"], "error: --peak_tflops must be above 0, not 0.0 (--gpu custom needs it)"),
    (["--gpu", "custom", "--peak_tflops", "100", "--gpu_memory_gb", "4"],
     "error: --hbm_gbps must be above 0, not 0.0 (--gpu custom needs it)"),
    (["--mfu", "1.5"], "error: --mfu is a fraction in (0, 1] (or 0 for the roofline), not 1.5"),
    (["--shard_group_size", "3"], "error: --shard_group_size 3 must divide the 8 GPUs"),
    (["--per_device_train_batch_size", "0"], "error: --per_device_train_batch_size must be at least 1, not 0"),
])
def test_bad_input_is_one_line_and_exit_2(flags, line):
    res = subprocess.run([sys.executable, "scripts/plan.py", *flags], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.strip() == line, res.stderr


def test_the_cli_prints_the_fastest_first_with_the_budget():
    res = subprocess.run([sys.executable, "scripts/plan.py", *SMALL.split(), "--nodes", "2", "--tokens", "1e9"],
                         cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert "to budget" in lines[1]
    steps = [float(line[15:].split()[7]) for line in lines[2:]]  # after the 15-wide engine column
    assert steps == sorted(steps) and len(steps) > 6


def calibration_rows():
    """(engine, flags, predicted, predicted with --mfu 0.377) of each row of docs/planner.md's calibration table."""
    text = (ROOT / "docs" / "planner.md").read_text()
    table = text[text.index("## Calibration"):]
    rows = re.findall(r"^\| [^|]+ \| ([^|]+) \| `([^`]+)` \| [\d,]+ \| ([\d,]+) \| [^|]+ \| ([\d,]+) \|", table,
                      re.M)
    return [(e.strip(), f, float(p.replace(",", "")), float(m.replace(",", ""))) for e, f, p, m in rows]


def test_calibration_table_is_what_the_planner_predicts():
    rows = calibration_rows()
    assert len(rows) == 9
    for engine, flags, predicted, with_mfu in rows:
        model, c = setup(flags)
        row = plan_row(model, c, engine, c.world)
        assert row["memory_gib"] <= c.memory_gib, (engine, flags)  # the row is one the planner lists
        assert row["tokens_per_s_per_gpu"] == pytest.approx(predicted, rel=0.01), (engine, flags)
        model, c = setup(flags + " --mfu 0.377")
        assert plan_row(model, c, engine, c.world)["tokens_per_s_per_gpu"] == pytest.approx(with_mfu, rel=0.01)


def test_it_ranks_fsdp_before_zero3_where_the_source_compares_them():
    granite = [f for e, f, _, _ in calibration_rows() if e == "ZeRO-3" and "A100" in f][0]
    model, c = setup(granite)
    order = [r["engine"] for r in plan(model, c, engines=["FSDP2", "ZeRO-3"]) if r["shard_group"] == c.world]
    assert order == ["FSDP2", "ZeRO-3"]


def test_a_trainer_config_sets_the_model_and_flags_override_it(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('output_dir = "runs/x"\nbackend = "fsdp"\n[model]\nn_layer = 6\nhead_width = 48\n'
                   'per_device_train_batch_size = 3\n')
    a = plan_cli.parse(["--config", str(cfg), "--head_width", "64"])
    assert (a.n_layer, a.head_width, a.per_device_train_batch_size) == (6, 64, 3)
    bad = tmp_path / "bad.toml"
    bad.write_text("n_layr = 6\n")
    res = subprocess.run([sys.executable, "scripts/plan.py", "--config", str(bad)], cwd=ROOT, capture_output=True,
                         text=True)
    assert res.returncode == 2 and "unknown key 'n_layr' (did you mean n_layer?)" in res.stderr, res.stderr
