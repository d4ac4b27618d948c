"""Hybrid sharding (--shard_group_size) on 4 real CPU ranks (gloo) as 2 groups of 2, through torchrun: FSDP2's
2-D (replicate, shard) mesh and DeepSpeed ZeRO-3's hierarchical partitioning (hpZ) train like one process,
save, resume and export. Each engine's run is made once and shared by the tests."""
import json
import os
import shutil
import sys

import pytest
from safetensors.torch import load_file

from conftest import lazy_runs, losses, run_cli, run_main, trainer_args
from mupgpt.config import parse_args
from mupgpt.config_checks import check_shard_group
from mupgpt.errors import UsageError

TORCHRUN4 = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4", "--master_port", "29671")
COMMON = ["--n_layer", "2", "--max_steps", "10", "--per_device_train_batch_size", "2", "--train_batch_size", "8",
          "--lr_scheduler_type", "cosine", "--weight_decay", "0.1", "--precision", "fp32"]
ENGINES = {
    "fsdp": ["--backend", "fsdp"],
    "zero3": ["--backend", "deepspeed", "--zero_stage", "3"],
}
HYBRID = ["--shard_group_size", "2", "--save_interval", "5"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus, data_dir):
    """One single-process reference run; each engine's 4-rank hybrid run is made on first use."""
    get = lazy_runs(tmp_path_factory.mktemp("hybrid"), corpus, data_dir, COMMON,
                    {"single": ((sys.executable,), []),
                     **{name: (TORCHRUN4, [*flags, *HYBRID]) for name, flags in ENGINES.items()}})
    get("single")
    return get


def dcp_pieces(checkpoint, key):
    """How many pieces a tensor of the FSDP2 checkpoint was saved in: one per rank of a shard group."""
    from torch.distributed.checkpoint import FileSystemReader
    metadata = FileSystemReader(str(checkpoint / "dcp")).read_metadata()
    return len(metadata.state_dict_metadata[key].chunks)


@pytest.mark.parametrize("name", list(ENGINES))
def test_fp32_losses_match_one_process(runs, name):
    run_dir, single = runs(name), runs.out / "single"
    assert json.loads((run_dir / "config.json").read_text())["resolved"]["world_size"] == 4
    assert losses(run_dir) == pytest.approx(losses(single), rel=1e-5)
    if name == "fsdp":
        # sharded in 2 pieces, not 4: the mesh is (2 replicas, 2 shards)
        assert dcp_pieces(run_dir / "checkpoints" / "step_00000010", "model.wte.weight") == 2
        # the norm sums the local shards over one shard group: over all 4 ranks it would be sqrt(2) too large
        assert losses(run_dir, "grad_norm") == pytest.approx(losses(single, "grad_norm"), rel=1e-5)
    else:
        zero = json.loads((run_dir / "ds_config.json").read_text())["zero_optimization"]
        assert zero["zero_hpz_partition_size"] == 2


@pytest.mark.parametrize("name", list(ENGINES))
def test_muon_under_hybrid_sharding_steps_like_one_process(runs, name):
    """Muon orthogonalizes whole matrices: FSDP2 gathers each over its shard group, ZeRO-3 (ZeroMuon) over all
    4 ranks, and the losses are one process's Muon's."""
    mine = runs(name, "--optimizer", "muon", run_name=f"{name}_muon")
    single = runs("single", "--optimizer", "muon", run_name="single_muon")
    assert losses(mine) == pytest.approx(losses(single), rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("name", list(ENGINES))
def test_consolidated_export_equals_one_process(runs, name):
    mine, single = load_file(runs(name) / "model.safetensors"), load_file(runs.out / "single" / "model.safetensors")
    assert mine.keys() == single.keys()
    for key, value in single.items():
        assert mine[key].shape == value.shape and mine[key].dtype == value.dtype, key
        assert (mine[key] - value).abs().max() < 1e-5, key


@pytest.mark.parametrize("name", list(ENGINES))
def test_checkpoint_resumes_exactly(runs, name):
    run_dir = runs(name)
    straight = losses(run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step_00000010")  # as if stopped after step 5
    os.remove(run_dir / "summary.json")
    res = run_cli(runs.args(name, "--resume", "auto"), launcher=TORCHRUN4)
    assert res.returncode == 0 and "at step 5" in res.stdout, res.stderr[-3000:]
    assert losses(run_dir) == straight


# flags, backend, ranks -> words the one error line holds
BAD = {
    "not a divisor": (["--backend", "fsdp", "--shard_group_size", "3"], "fsdp", 4, "use one of 1, 2, 4"),
    "more than the ranks": (["--backend", "fsdp", "--shard_group_size", "8"], "fsdp", 4, "use one of 1, 2, 4"),
    "an engine that does not shard": (["--backend", "ddp", "--shard_group_size", "2"], "ddp", 4,
                                      "use --backend fsdp"),
    "deepspeed below stage 3": (["--backend", "deepspeed", "--zero_stage", "2", "--shard_group_size", "2"],
                                "deepspeed", 4, "add --zero_stage 3"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_shard_group_size_is_one_line(case):
    flags, backend, ranks, words = BAD[case]
    with pytest.raises(UsageError) as e:
        check_shard_group(parse_args(flags), backend, ranks)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_negative_shard_group_size_is_refused_as_parsed():
    with pytest.raises(UsageError, match="--shard_group_size must be 0 or more"):
        parse_args(["--shard_group_size", "-2"])


def test_a_stage_2_config_of_ones_own_is_refused_under_hybrid_sharding(tmp_path, monkeypatch):
    from mupgpt.engines.deepspeed_config import ds_config
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    cfg = parse_args(["--backend", "deepspeed", "--ds_config", str(tmp_path / "ds.json"), "--shard_group_size", "2"])
    check_shard_group(cfg, "deepspeed", 4)  # the flags alone can't tell the stage of one's own config
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(UsageError, match="is stage 2: use a stage 3 config"):
        ds_config(cfg, "fp32", 8, 1, 64)


def test_the_trainer_refuses_a_bad_group_in_one_line(tmp_path, corpus, data_dir):
    res = run_main(trainer_args(tmp_path, corpus, data_dir, "--shard_group_size", "2"))
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and "--backend single does not" in lines[0], res.stderr[-2000:]
