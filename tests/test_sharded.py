"""ZeRO-1/2/3 (+ CPU offload) and FSDP2 on 2 real CPU ranks (gloo), through the real launchers: ZeRO-3 through
DeepSpeed's own, the other ZeRO stages through torchrun, which runs the same engine with fewer processes."""
import glob
import json
import math
import os
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, lazy_runs, losses, run_cli, run_main, trainer_args
from mup_model import GPT, param_class
from mupgpt.config import parse_args
from mupgpt.data import Batches, open_prepared
from mupgpt.errors import UsageError
from mupgpt.model_config import model_config

DEEPSPEED = ("deepspeed", "--num_gpus", "2", "--master_port", "29641")
TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29651")
COMMON = ["--n_layer", "2", "--max_steps", "10", "--train_batch_size", "8", "--lr_scheduler_type", "cosine",
          "--weight_decay", "0.1"]
# name -> (launcher, flags). DeepSpeed's launcher starts two more processes that import DeepSpeed before the ranks
# do; ZeRO-3 goes through it (the backend chosen from --zero_stage alone, as a user launches it), the rest through
# torchrun with --backend deepspeed.
BACKENDS = {
    "zero1": (TORCHRUN, ["--backend", "deepspeed", "--zero_stage", "1", "--gradient_checkpointing"]),
    "zero2": (TORCHRUN, ["--backend", "deepspeed", "--zero_stage", "2"]),
    "zero3": (DEEPSPEED, ["--zero_stage", "3", "--save_interval", "5"]),
    "zero3_offload_cpu": (TORCHRUN, ["--backend", "deepspeed", "--zero_stage", "3", "--offload", "cpu",
                                     "--gradient_checkpointing"]),
    # the GPU-resident part of the optimizer only exists on a GPU: here the config trains; the schedule
    # reaching that part is the next test, and its losses were checked on an H100 (bench/RESULTS.md)
    "zero3_offload_cpu_partial": (TORCHRUN, ["--backend", "deepspeed", "--ds_config",
                                             str(ROOT / "ds_configs" / "zero3_offload_cpu_partial.json")]),
    "fsdp": (TORCHRUN, ["--backend", "fsdp", "--save_interval", "5", "--gradient_checkpointing"]),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus, data_dir):
    """One single-process reference run; the sharded runs (in fp32 unless a test asks otherwise) are made on
    first use."""
    get = lazy_runs(tmp_path_factory.mktemp("sharded"), corpus, data_dir, COMMON,
                    {"single": ((sys.executable,), []), **BACKENDS})
    get("single")

    def run(name, precision="fp32"):
        return get(name, "--precision", precision, run_name=f"{name}_{precision}")
    run.out, run.args = get.out, get.args
    return run


@pytest.mark.parametrize("name", list(BACKENDS))
def test_fp32_losses_match_one_process(runs, name):
    run_dir = runs(name)
    assert json.loads((run_dir / "config.json").read_text())["resolved"]["world_size"] == 2
    assert losses(run_dir) == pytest.approx(losses(runs.out / "single"), rel=1e-5)
    if name == "fsdp":  # its norm is summed from the ranks' local shards (DeepSpeed computes its own)
        assert losses(run_dir, "grad_norm") == pytest.approx(losses(runs.out / "single", "grad_norm"), rel=1e-5)


@pytest.mark.parametrize("name", ["zero3", "fsdp"])
def test_bf16_losses_stay_within_a_bf16_ulp(runs, name):
    """bf16 keeps 8 mantissa bits: one ulp is 2^-8 (0.4%) relative. Over 10 steps the loss of a bf16
    run with fp32 master weights and fp32 reductions stays within that of fp32 (7e-4 measured)."""
    bf16, fp32 = losses(runs(name, precision="bf16")), losses(runs.out / "single")
    assert bf16 == pytest.approx(fp32, rel=2 ** -8)
    assert bf16 != fp32  # it really ran in bf16


@pytest.mark.parametrize("name", ["single", "fsdp"])
def test_fp16_trains_like_fp32_with_gradients_unscaled(runs, name):
    """fp16 keeps 11 significant bits: over 10 steps the losses and the logged (unscaled) gradient
    norms stay within two fp16 ulps (2^-9) of fp32; a loss scale left in the norms would be 65536x."""
    run_dir = runs(name, precision="fp16")
    fp32 = runs.out / "single"
    assert losses(run_dir) == pytest.approx(losses(fp32), rel=2 ** -9)
    assert losses(run_dir, "grad_norm") == pytest.approx(losses(fp32, "grad_norm"), rel=2 ** -9)
    assert losses(run_dir) != losses(fp32)  # it really ran in fp16


def test_fsdp_fp16_skips_an_overflowing_step_on_every_rank(tmp_path):
    import subprocess
    res = subprocess.run([*TORCHRUN, str(ROOT / "tests" / "fp16_probe.py")], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PROBE_OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((tmp_path / "fp16.json").read_text())
    assert result["overflow"]["moved"] is False and result["overflow"]["scales"] == [2.0**39] * 2
    assert result["fits"]["moved"] is True and result["fits"]["scales"] == [1024.0] * 2
    assert math.isfinite(result["fits"]["loss"])


@pytest.mark.parametrize("name", ["zero3", "fsdp"])
def test_native_checkpoint_resumes_exactly(runs, name):
    run_dir = runs(name)
    straight = losses(run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step_00000010")  # as if stopped after step 5
    os.remove(run_dir / "summary.json")
    res = run_cli(runs.args(name, "--precision", "fp32", "--resume", "auto", run_name=run_dir.name),
                  launcher=BACKENDS[name][0])
    assert res.returncode == 0 and "at step 5" in res.stdout, res.stderr[-3000:]
    assert losses(run_dir) == straight


def test_zero3_export_loads_into_one_process_with_the_same_eval_loss(runs, corpus, data_dir):
    from mupgpt.data import dataset_slug
    run_dir = runs("zero3")
    cfg = parse_args(trainer_args(runs.out, "x", data_dir, *COMMON))
    model = GPT(model_config(cfg, 257))
    model.load_state_dict(load_file(run_dir / "model.safetensors"))
    prepared = data_dir / f"{dataset_slug(str(corpus))}-bytes"  # the folder holds other files beside it
    batches = Batches(open_prepared(str(prepared)), cfg.seq_len, 8, 8, 0, 1, cfg.seed,
                      torch.device("cpu"))
    with torch.no_grad():
        val = torch.stack([model(*batches.val(i)) for i in range(cfg.eval_iters)]).mean().item()
    assert val == pytest.approx(json.loads((run_dir / "summary.json").read_text())["final_val_loss"], rel=1e-5)


PROBE_LR, PROBE_WD, PROBE_EPS = 1e-2, 0.5, 2e-3
# m = 2 by widening through heads (4 x 16 from a base of width 32), d = 2 with depth-muP (alpha 0.5):
# the five groups get three different LRs, three weight decays and two eps
PROBE_FLAGS = ["--n_head", "4", "--head_width", "16", "--base_width", "32", "--base_head_width", "16", "--n_layer", "2",
               "--base_n_layer", "1", "--depth_alpha", "0.5", "--seq_len", "16", "--per_device_train_batch_size", "4",
               "--lr_scheduler_type", "constant", "--learning_rate", str(PROBE_LR), "--weight_decay", str(PROBE_WD),
               "--adam_eps", str(PROBE_EPS), "--grad_clip", "0", "--readout_zero_init", "false"]
# every backend in bf16 (each runs it on CPU), under torchrun: DeepSpeed runs the same there, and its own
# launcher took 39 s against torchrun's 21 s per probe on this 2-core machine; one launch probes them all
PROBE_BACKENDS = {
    "ddp": ["--backend", "ddp"],
    "zero1": ["--backend", "deepspeed", "--zero_stage", "1"],
    "zero2": ["--backend", "deepspeed", "--zero_stage", "2"],
    "zero3": ["--backend", "deepspeed", "--zero_stage", "3"],
    "zero3_offload_cpu": ["--backend", "deepspeed", "--zero_stage", "3", "--offload", "cpu"],
    "fsdp": ["--backend", "fsdp"],
}


def first_adamw_step(p, g, cls):
    """AdamW's first step from the rules table at m = 2, d = 2, alpha = 0.5: m_hat = g, sqrt(v_hat) = |g|, and
    decoupled decay lr_g * wd_g = lr * wd where the class decays."""
    m, d = 2, 2
    lr = {"hidden": PROBE_LR / m * d ** -0.5, "block_vector": PROBE_LR * d ** -0.5}.get(cls, PROBE_LR)
    eps = PROBE_EPS * d ** -0.5 if cls in ("hidden", "block_vector") else PROBE_EPS
    decay = 0.0 if cls in ("block_vector", "final_norm") else PROBE_LR * PROBE_WD
    return p * (1 - decay) - lr * g / (g.abs() + eps)


def probe(out, backends, *flags):
    """tests/dist_probe.py on 2 ranks under torchrun for each of backends ({name: flags}) in one launch; the
    folder holding each one's init and first step as out/<name>."""
    import subprocess
    env = {**os.environ, "PROBE_OUT": str(out), "PROBE_RUNS": json.dumps(backends), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([*TORCHRUN, str(ROOT / "tests" / "dist_probe.py"), *flags], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    # DeepSpeed's comm starts after torch.distributed here (DDP is probed first): its /dev/shm buffers go too
    assert not glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{TORCHRUN[-1]}_*")
    return out


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    return probe(tmp_path_factory.mktemp("probe"), PROBE_BACKENDS, *PROBE_FLAGS, "--precision", "bf16")


@pytest.mark.parametrize("name", list(PROBE_BACKENDS))
def test_mup_init_and_group_hyperparameters_survive_every_backend(probed, name):
    """DDP, ZeRO-1/2/3, ZeRO-3 + CPU offload and FSDP2 on 2 ranks, in bf16: the gathered init is the
    one-process model's (rounded to bf16 where DeepSpeed keeps bf16 weights), and Adam's first step on
    every element is the one the muP table gives its group, per-group LR, weight decay and eps
    together, from the one-process fp32 gradient (bf16 compute: the median error within 2% of the step)."""
    cfg = parse_args(PROBE_FLAGS)
    torch.manual_seed(cfg.seed)
    reference = GPT(model_config(cfg, 257))
    x = torch.randint(0, 257, (8, cfg.seq_len), generator=torch.Generator().manual_seed(0))  # the probe's batch
    reference(x, x.roll(-1, 1)).backward()
    init, step1 = load_file(probed / name / "init.safetensors"), load_file(probed / name / "step1.safetensors")
    for pname, p in reference.named_parameters():
        p0 = p.detach()
        assert torch.equal(init[pname], p0) or torch.equal(init[pname], p0.bfloat16().float()), pname
        expected = first_adamw_step(init[pname], p.grad, param_class(pname)) - init[pname]
        moved = step1[pname] - init[pname]
        has_grad = p.grad != 0  # embedding rows of tokens absent from the batch only decay
        # medians: in bf16 a gradient far below eps can change sign, moving that element by a whole LR
        error = (moved - expected)[has_grad].abs().median() / expected[has_grad].abs().median()
        assert error < 0.02, (pname, error.item())  # measured: 0.7% at most (fp32: 1e-6); eps or decay off: 9-11%


DS_BAD = {
    "config contradicts the flags": ({"train_micro_batch_size_per_gpu": 3}, [],
                                     "set it with --per_device_train_batch_size"),
    "offload to a missing device": ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "gpu"}}}, [],
                                    "is not available here"),
    "stage outside 0-3": ({"zero_optimization": {"stage": 4}}, [], "stage must be 0, 1, 2 or 3"),
    "config-file scheduler": ({"scheduler": {"type": "WarmupLR"}}, [], "remove it"),
    "nvme without a path": (None, ["--offload", "nvme"], "pass --nvme_path"),
    "nvme path missing": (None, ["--offload", "nvme", "--nvme_path", "/nonexistent/nvme"], "needs an existing folder"),
    "offload below stage 3": (None, ["--offload", "cpu", "--zero_stage", "2"], "needs --zero_stage 3"),
    "fp16 on CPU": (None, ["--precision", "fp16"], "deepspeed has no fp16 on CPU"),
    "stage 0 in bf16": (None, ["--zero_stage", "0", "--precision", "bf16"], "ZeRO stage 0 runs fp32 only"),
    "compile under ZeRO-3 on CPU": (None, ["--compile"], "needs a CUDA GPU"),
    "compile under ZeRO-2": (None, ["--compile", "--zero_stage", "2"], "no faster than without it"),
}


# these run as a real process (DeepSpeed imported there says nothing more); the rest run the trainer's main() here
DS_BAD_IN_A_PROCESS = {"offload to a missing device", "nvme path missing"}


@pytest.mark.parametrize("case", DS_BAD)
def test_bad_deepspeed_input_is_one_line_and_exit_2(tmp_path, corpus, data_dir, case):
    config, extra, message = DS_BAD[case]
    args = trainer_args(tmp_path, corpus, data_dir, "--backend", "deepspeed", "--max_steps", "2", *extra)
    if config is not None:
        (tmp_path / "ds.json").write_text(json.dumps(config))
        args += ["--ds_config", str(tmp_path / "ds.json")]
    res = run_cli(args) if case in DS_BAD_IN_A_PROCESS else run_main(args)
    # DeepSpeed's own log lines start with the date
    lines = [line for line in res.stderr.strip().splitlines() if not line.startswith("[20")]
    assert res.returncode == 2 and len(lines) == 1 and message in lines[0], res.stderr[-2000:]


def test_zero3_checkpoint_resumes_into_one_process_from_its_consolidated_weights(runs, corpus, data_dir):
    """Another backend and world size: the weights come from the checkpoint's model.safetensors and the
    optimizer starts afresh, so step 6's loss (computed from the weights after step 5) is unchanged."""
    zero3 = runs("zero3")
    checkpoint = zero3 / "checkpoints" / "step_00000005"
    args = trainer_args(runs.out, corpus, data_dir, "--run_name", "from_zero3", *COMMON, "--precision", "fp32",
                        "--resume", str(checkpoint))
    res = run_cli(args)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "written by deepspeed on 2 rank(s); loaded its weights, the optimizer state starts afresh" in res.stdout
    resumed = losses(runs.out / "from_zero3")
    assert len(resumed) == 5 and resumed[0] == pytest.approx(losses(zero3)[5], rel=1e-5)


def test_nvme_offload_trains_like_one_process(libaio, tmp_path, runs, corpus, data_dir):
    """ZeRO-3 with parameters and optimizer offloaded to a disk folder (DeepSpeed's async I/O op, libaio)."""
    (tmp_path / "nvme").mkdir()
    args = trainer_args(runs.out, corpus, data_dir, "--run_name", "nvme", *COMMON, "--precision", "fp32",
                        "--backend", "deepspeed", "--zero_stage", "3", "--offload", "nvme",
                        "--nvme_path", str(tmp_path / "nvme"))
    res = run_cli(args, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    zero = json.loads((runs.out / "nvme" / "ds_config.json").read_text())["zero_optimization"]
    assert zero["offload_param"]["device"] == "nvme"
    assert any((tmp_path / "nvme").rglob("*"))  # DeepSpeed's swap files went there
    assert losses(runs.out / "nvme") == pytest.approx(losses(runs.out / "single"), rel=1e-5)


@pytest.mark.parametrize("name", ["single", "fsdp"])
def test_compiled_runs_train_like_the_eager_one_process(runs, corpus, data_dir, name):
    """--compile on the paths that take it here (one process, FSDP2 on 2 ranks): dynamo traces the model's
    forward (under FSDP2 each block's and, on its own, the head with the loss: compiling the whole model there,
    dynamo breaks the graph at FSDP2's hooks in the root's loop over the blocks and gives up on that frame),
    no graph breaks, nothing hits its recompile limit, and the losses are the eager single run's within 1e-4."""
    launcher = TORCHRUN if name == "fsdp" else (sys.executable,)
    args = trainer_args(runs.out, corpus, data_dir, "--run_name", f"{name}_compiled", *COMMON,
                        "--backend", name, "--compile", "--precision", "fp32")
    res = run_cli(args, launcher=launcher, env={"TORCH_LOGS": "dynamo"})  # dynamo logs each frame it traces
    assert res.returncode == 0, res.stderr[-3000:]
    assert "start tracing forward" in res.stderr and "mup_model.py" in res.stderr, res.stderr[-3000:]
    assert "recompile_limit" not in res.stderr and "graph break" not in res.stderr, res.stderr[-3000:]
    if name == "fsdp":
        assert "start tracing head" in res.stderr, res.stderr[-3000:]
    assert losses(runs.out / f"{name}_compiled") == pytest.approx(losses(runs.out / "single"), rel=1e-4)


def test_compile_under_zero3_on_a_gpu_is_deepcompile():
    """--compile under ZeRO-3 turns DeepCompile on (what a GPU run gets; its op needs CUDA, so this checks
    the config only); combinations never run on a GPU are refused."""
    from mupgpt.engines.deepspeed_config import deepcompile
    config, zero = {}, {"stage": 3}
    deepcompile(config, zero, "zero3.json", "cuda", checkpointing=False)
    assert config["compile"] == {"deepcompile": True}
    refused = [({}, {"stage": 3}, True), ({}, {"stage": 3, "offload_optimizer": {"device": "cpu"}}, False),
               ({"compile": {"deepcompile": False}}, {"stage": 3}, False), ({}, {"stage": 1}, False)]
    for config, zero, checkpointing in refused:
        with pytest.raises(UsageError):
            deepcompile(config, zero, "x.json", "cuda", checkpointing)


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "ds_configs").glob("*.json")))
def test_shipped_configs_leave_bf16_steps_free_of_host_syncs(tmp_path, name, request):
    """DeepSpeed's bf16 overflow check (~3 kernels per parameter and a flag read back every step) and its
    synchronizing throughput timer cost ZeRO-1 a third of its H100 speed (bench/RESULTS.md); the trainer
    checks finiteness itself. Read back through DeepSpeed's own config parser."""
    from deepspeed.runtime.config import DeepSpeedConfig

    from mupgpt.config import parse_args
    from mupgpt.engines.deepspeed_config import ds_config
    if "nvme" in name:
        request.getfixturevalue("libaio")
    stage = json.loads((ROOT / "ds_configs" / name).read_text())["zero_optimization"]["stage"]
    cfg = parse_args(["--backend", "deepspeed", "--ds_config", str(ROOT / "ds_configs" / name), "--zero_stage",
                      str(stage), "--nvme_path", str(tmp_path)])
    parsed = DeepSpeedConfig(ds_config(cfg, "bf16" if stage else "fp32", 8, 1, 64))  # ZeRO-0 runs fp32 only
    assert parsed.timers_config.enabled is False
    assert parsed.bfloat16_config.check_grad_overflow is False
    if stage == 3:  # a block's parameters are gathered, and its gradients reduced, as one unit
        from deepspeed.utils.z3_leaf_module import _fully_qualified_class_name

        import mup_model
        block = mup_model.Block(mup_model.GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=1, head_width=8))
        assert parsed.zero_config.leaf_module.classes == [_fully_qualified_class_name(block)]
        assert parsed.zero_config.param_persistence_threshold == 0  # no per-parameter gathers after each step


def test_a_zero3_config_of_ones_own_keeps_its_choices_and_says_what_the_shipped_ones_set(tmp_path, capsys):
    from mupgpt.config import parse_args
    from mupgpt.engines.deepspeed_config import ds_config
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": "auto"}}))
    cfg = parse_args(["--backend", "deepspeed", "--ds_config", str(mine), "--zero_stage", "3"])
    zero = ds_config(cfg, "fp32", 8, 1, 64)["zero_optimization"]
    assert "leaf_module" not in zero and zero["stage3_param_persistence_threshold"] == 640
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "has no zero_optimization.leaf_module" in out and "mup_model.Block" in out


def test_a_diverging_bf16_zero_run_still_stops(tmp_path, corpus, data_dir):
    """DeepSpeed no longer skips bf16 steps with non-finite gradients (see above): the trainer's own check
    must stop the run, exit 1 and export nothing."""
    args = trainer_args(tmp_path, corpus, data_dir, "--run_name", "r", "--backend", "deepspeed", "--zero_stage", "2",
                        "--precision", "bf16", "--learning_rate", "1e6", "--max_steps", "30", "--log_interval", "10")
    res = run_cli(args)
    assert res.returncode == 1, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1].startswith("error: the loss became non-finite")
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["diverged"] is True
    assert not (tmp_path / "r" / "model.safetensors").exists()


PARTIAL_PROBE = """
import json, sys
from mupgpt.config import parse_args
from mupgpt.engines.deepspeed_config import ds_config
from mupgpt.engines.factory import build
from mupgpt.model_config import model_config
from mupgpt.world import init_world
cfg = parse_args(["--backend", "deepspeed", "--ds_config", sys.argv[1], "--n_layer", "2", "--seq_len", "32",
                  "--per_device_train_batch_size", "2", "--num_warmup_steps", "5", "--precision", "fp32"])
ds = ds_config(cfg, "fp32", 2, 1, cfg.n_head * cfg.head_width)
engine = build("deepspeed", cfg, model_config(cfg, 257), init_world("deepspeed", "cpu"), "fp32", 10, ds)
zero = engine.engine.optimizer
for _ in range(3):
    engine.scheduler.step()
print(json.dumps({"schedule": [g["lr"] for g in zero.optimizer.param_groups],
                  "gpu_side": [g["lr"] for g in zero.backup_optimizer.param_groups]}))
"""


def test_partial_offload_schedule_reaches_the_gpu_side_optimizer(tmp_path):
    """With offload_optimizer.ratio < 1 DeepSpeed steps the GPU-resident states with a second optimizer
    that copies param group 0 once: every one of its groups must follow the LR schedule."""
    import subprocess
    config = ROOT / "ds_configs" / "zero3_offload_cpu_partial.json"
    res = subprocess.run([sys.executable, "-c", PARTIAL_PROBE, str(config)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    lrs = json.loads(res.stdout.strip().splitlines()[-1])
    assert lrs["schedule"][0] > 0 and lrs["gpu_side"] == lrs["schedule"]
