"""The host work of a training step, counted on 2 CPU ranks (bench/step_counts.py): what each engine does per
step stays what the model needs, and the loop reads nothing back between logged steps."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT, TINY

N_LAYER = 4
LOG_INTERVAL = 5
STEPS = 13


def counts(tmp_path, corpus, data_dir, launcher, *flags):
    """Rank 0's counts for steps 4..STEPS-1 as {step: counts} (ZeRO-3 records its module order in the first)."""
    args = [*TINY, "--n_layer", str(N_LAYER), "--dataset", str(corpus), "--data_dir", str(data_dir), "--output_dir",
            str(tmp_path), "--run_name", "r", "--max_steps", str(STEPS), "--log_interval", str(LOG_INTERVAL),
            "--save", "false", *flags]
    res = subprocess.run([*launcher, str(ROOT / "bench" / "step_counts.py"), str(tmp_path / "counts"), "--", *args],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, env={"OMP_NUM_THREADS": "1",
                                                                                    **__import__("os").environ})
    assert res.returncode == 0, res.stderr[-3000:]
    steps = json.loads((tmp_path / "counts.rank0.json").read_text())[:-1]  # the last one holds the teardown
    return {step: c for step, c in enumerate(steps, start=2) if step >= 4}


def ordinary(steps):
    return [c for s, c in steps.items() if s % LOG_INTERVAL]


def logged(steps):
    return [c for s, c in steps.items() if s % LOG_INTERVAL == 0]


TORCHRUN = ["torchrun", "--nproc_per_node", "2", "--master_port", "29656"]  # DeepSpeed's engine runs under it too


def test_a_zero3_step_fetches_each_block_once_each_way(tmp_path, corpus, data_dir):
    """The shipped ZeRO-3 config marks each block a leaf module: its parameters come in one gather and its
    gradients are reduced together. Without the marking a step fetched every submodule (11 per block)."""
    steps = counts(tmp_path, corpus, data_dir, TORCHRUN, "--backend", "deepspeed", "--zero_stage", "3")
    for c in steps.values():
        # forward and backward per block, plus the root, both embeddings, the final norm and the readout each way
        assert c["zero3.fetch"] <= 2 * N_LAYER + 10, c
        assert c.get("collective.all_gather_into_tensor", 0) <= N_LAYER, c  # no per-parameter gathers
    for c in ordinary(steps):
        assert c.get("read_back", 0) <= 1, c  # DeepSpeed's own grad-norm check; the loop reads nothing


@pytest.mark.parametrize("backend", ["fsdp", "ddp"])
def test_torchrun_engines_read_back_only_on_logged_steps(tmp_path, corpus, data_dir, backend):
    steps = counts(tmp_path, corpus, data_dir, TORCHRUN, "--backend", backend)
    for c in ordinary(steps):
        assert c.get("read_back", 0) == 0, c
        assert c.get("collective.all_reduce", 0) == (1 if backend == "fsdp" else 0), c  # FSDP2's clip norm
    for c in logged(steps):
        assert c.get("read_back", 0) == 1, c  # loss, grad norm, finiteness and the stop flag together
    if backend == "fsdp":  # AdamW steps the local shards, not the DTensors
        assert all(c.get("fsdp.local_shard_step") == 1 for c in steps.values()), steps
    if backend == "fsdp":  # blocks two to a group (a small model's pair fits the gather budget): the root and
        groups = N_LAYER // 2  # the groups run their hooks once each way, rather than the root and every block
        assert all(c["fsdp.post_forward"] == c["fsdp.post_backward"] == 1 + groups for c in steps.values()), steps
        # the root gathers once; each group for forward and again for backward, but the last keeps its
        assert all(c["collective.all_gather_single"] == 1 + 2 * (groups - 1) + 1 for c in steps.values()), steps


def test_the_single_backend_reads_back_once_per_logged_step(tmp_path, corpus, data_dir):
    steps = counts(tmp_path, corpus, data_dir, [sys.executable], "--backend", "single")
    assert all(c.get("read_back", 0) == 0 for c in ordinary(steps)), steps
    assert all(c.get("read_back", 0) == 1 for c in logged(steps)), steps
    assert all(c["optimizer.step"] == 1 for c in steps.values()), steps
