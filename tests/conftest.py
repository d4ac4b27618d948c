import contextlib
import io
import json
import logging
import os
import runpy
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# A tiny model and batch that train in about a second per 20 steps on one CPU core.
TINY = ["--n_layer", "1", "--n_head", "2", "--head_width", "16", "--base_head_width", "16", "--seq_len", "32",
        "--per_device_train_batch_size", "4", "--tokenizer", "bytes", "--eval_iters", "2", "--log_interval", "1",
        "--eval_interval", "0", "--precision", "fp32", "--lr_scheduler_type", "constant"]
# TINY without the head width: what a sweep's runs share (the sweep sets each run's width)
SWEEP_SHARED = [f for i, f in enumerate(TINY) if "--head_width" not in TINY[max(0, i - 1):i + 1]]


@pytest.fixture(autouse=True)
def environment_left_as_found():
    """Code a test runs in this process may set environment variables (DeepSpeed's accelerator, a rank, a
    world size); the next test, and every process it starts, sees the environment the suite started with."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A folder of real-looking text files (the test writes them; no third-party text)."""
    d = tmp_path_factory.mktemp("corpus")
    for i in range(30):
        lines = [f"def function_{i}_{j}(x):\n    return x * {j} + {i}  # line {j} of file {i}\n" for j in range(60)]
        (d / f"doc{i:02d}.txt").write_text("".join(lines))
    return d


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, corpus):
    """The corpus prepared once with the byte tokenizer, shared by the trainer tests."""
    from mupgpt.data import ByteTokenizer, dataset_slug, prepare
    d = tmp_path_factory.mktemp("data")
    prepare(str(corpus), ByteTokenizer(), str(d / f"{dataset_slug(str(corpus))}-bytes"))
    return d


@pytest.fixture
def libaio():
    """NVMe offload needs libaio (an optional system package): where the trainer's own check refuses it, the
    test skips with the trainer's one-line message, which says what to install."""
    from mupgpt.engines.deepspeed_config import check_aio
    from mupgpt.errors import UsageError
    try:
        check_aio()
    except UsageError as e:
        pytest.skip(str(e))


def trainer_args(out, corpus, data_dir, *extra):
    return ["--output_dir", str(out), "--dataset", str(corpus), "--data_dir", str(data_dir), *TINY, *extra]


def run_cli(args, launcher=(sys.executable,), env=None, timeout=600):
    """Run the trainer as a user would; returns the CompletedProcess."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([*launcher, str(ROOT / "run_trainer.py"), *map(str, args)], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def run_main(args):
    """The trainer's main() in this process, ending as `python run_trainer.py args` would: the exit status,
    stdout and stderr. For refusals (no process start, no second import of torch); a few tests keep the real
    process for the contract end to end."""
    import run_trainer
    out, err = io.StringIO(), io.StringIO()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            run_trainer.main(list(map(str, args)))
        code = 0
    except SystemExit as e:
        code = e.code
    finally:  # the trainer's signal handlers are not this process's
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        unbind_log_handlers({out: sys.stdout, err: sys.stderr})
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def unbind_log_handlers(streams):
    """A library imported while stdout was redirected (DeepSpeed's logger binds sys.stdout at import) writes to
    the real streams again afterwards."""
    loggers = [logging.getLogger(), *(v for v in logging.Logger.manager.loggerDict.values()
                                      if isinstance(v, logging.Logger))]
    for handler in (h for lg in loggers for h in lg.handlers if isinstance(h, logging.StreamHandler)):
        if handler.stream in streams:
            handler.setStream(streams[handler.stream])


def lazy_runs(out, corpus, data_dir, common, backends):
    """Trainer runs under out, each made on first use and then shared: runs(backend, *extra, run_name=backend)
    is the run folder of `common + backends[backend]'s flags + extra` (backends: name -> (launcher, flags)).
    A multi-rank launch costs seconds of start-up, so the tests that read one run's outputs share it
    (the fixture that calls this sets its scope)."""
    made = {}

    def args(backend, *extra, run_name=None):
        return trainer_args(out, corpus, data_dir, "--run_name", run_name or backend, *common, *backends[backend][1],
                            *extra)

    def get(backend, *extra, run_name=None):
        run_name = run_name or backend
        if run_name not in made:
            res = run_cli(args(backend, *extra, run_name=run_name), launcher=backends[backend][0])
            assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
            made[run_name] = out / run_name
        return made[run_name]
    get.out, get.args = out, args
    return get


def losses(run_dir, key="loss"):
    rows = [json.loads(line) for line in open(Path(run_dir) / "metrics.jsonl")]
    return [r[key] for r in rows if key in r]


def pytest_configure(config):
    config.addinivalue_line("markers", "multinode: runs on real hosts made from network namespaces "
                                       "(skips where they can't be made)")
    config.addinivalue_line("markers", "slow: left out of the fast tier, `python3 -m pytest -m \"not slow\"`")


# The fast tier is the daily loop: the model and its muP rules, optimizer groups, config, data, input checks and
# one tiny in-process run of the trainer. A test is slow when it starts a process that imports torch (the
# trainer, a launcher, a script as a real process: each start costs seconds of imports on a small machine) or
# trains more than a few tiny steps. Whole files where (nearly) every test is slow:
SLOW_FILES = {
    "test_bench.py", "test_checkpoint_trust.py", "test_hub_offline.py", "test_multi_node.py", "test_run_safety.py",
    "test_sharded.py", "test_step_counts.py", "test_step_lines.py", "test_sweep_plot.py", "test_tokenizers.py",
    "test_launcher_preflight.py", "test_hybrid_shard.py", "test_muon.py",
}
# Fast tests in those files (in-process, no training)
FAST_IN_SLOW_FILES = {
    "test_muon.py::test_muon_rules_hold_the_update_scale_per_matrix_and_keep_adamw_groups",
    "test_muon.py::test_fused_qkv_is_orthogonalized_block_by_block",
    "test_muon.py::test_muon_scale_mup_is_width_free_moonlight_grows_and_depth_follows_completep",
    "test_checkpoint_trust.py::test_stale_tmp_folders_go_at_the_next_save_and_an_interrupted_save_removes_its_own",
    "test_run_safety.py::test_run_name_cannot_leave_the_output_dir",
    "test_sharded.py::test_compile_under_zero3_on_a_gpu_is_deepcompile",
    "test_sharded.py::test_shipped_configs_leave_bf16_steps_free_of_host_syncs",
    "test_sharded.py::test_a_zero3_config_of_ones_own_keeps_its_choices_and_says_what_the_shipped_ones_set",
    "test_step_lines.py::test_duration_format",
    "test_sweep_plot.py::test_plot_marks_optima_at_the_grid_edge_and_labels_model_widths",
    "test_sweep_plot.py::test_plot_of_a_batch_size_sweep",
    "test_sweep_plot.py::test_bad_sweep_input_is_one_line_and_exit_2",
    "test_hybrid_shard.py::test_bad_shard_group_size_is_one_line",
    "test_hybrid_shard.py::test_negative_shard_group_size_is_refused_as_parsed",
    "test_hybrid_shard.py::test_a_stage_2_config_of_ones_own_is_refused_under_hybrid_sharding",
    "test_hybrid_shard.py::test_the_trainer_refuses_a_bad_group_in_one_line",
    "test_muon.py::test_deepspeed_refuses_muon_in_fp16",
}
# Slow tests in the other files (a test name covers all its cases; "name[case]" one case)
SLOW_TESTS = {
    "test_config_file.py::test_the_trainer_records_the_resolved_config",
    "test_config_file.py::test_a_bad_file_is_one_line_from_the_command_line",
    "test_coord_check.py::test_mup_activations_keep_their_size_across_an_8x_width_range",
    "test_coord_check.py::test_the_check_judges_the_query_init_the_trainer_uses",
    "test_coord_check.py::test_sp_is_flagged_its_logits_and_hidden_outputs_grow",
    "test_coord_check.py::test_the_verdict_holds_at_16x_width_and_10_steps",
    "test_coord_check.py::test_sharded_coordinate_check_gives_the_same_slopes",
    "test_coord_check.py::test_depth_check_separates_completep_from_no_scaling_and_from_lazy_blocks",
    "test_coord_check.py::test_completep_passes_the_depth_verdict_at_width_128",
    "test_coord_check.py::test_sharded_depth_check_gives_the_same_slopes",
    "test_data.py::test_two_processes_preparing_the_same_folder_at_once_both_succeed",
    "test_data.py::test_a_corrupted_meta_json_stops_the_trainer_with_one_line",
    "test_data.py::test_a_killed_preparations_folders_are_cleared_by_the_next_one",
    "test_data.py::test_odd_entries_in_a_dataset_folder_are_one_line_and_exit_2[fifo]",
    "test_data.py::test_odd_entries_in_a_dataset_folder_are_one_line_and_exit_2[empty]",
    "test_estimate_memory.py::test_estimate_holds_the_measured_peak_of_real_training_steps",
    "test_estimate_memory.py::test_bad_input_is_one_line_and_exit_2",
    "test_export_hf.py::test_a_stopped_run_is_exported_with_a_note_naming_its_step",
    "test_llama.py::test_llama_trains_exports_samples_and_resumes",
    "test_llama.py::test_llama_fp32_losses_match_one_process",
    "test_llama.py::test_llama_gathered_init_and_first_step_equal_one_process",
    "test_llama.py::test_llama_coordinate_check_passes_mup_and_flags_sp",
    "test_llama.py::test_memory_estimator_counts_the_llama_model",
    "test_llama.py::test_llama_checkpointing_compile_and_bf16_train_like_eager_fp32",
    "test_model.py::test_trainer_widens_by_heads_from_base_width_and_records_m",
    "test_schedule.py::test_trainer_runs_wsd_and_logs_its_lr",
    "test_scripts_input.py::test_each_script_as_a_real_process",
    "test_tools_input.py::test_coord_check_bad_choice_is_one_line_in_a_real_process",
    "test_trainer.py::test_loss_falls_on_the_embedded_corpus",
    "test_trainer.py::test_sigterm_saves_and_the_resumed_run_matches",
    "test_trainer.py::test_ddp_on_two_ranks_matches_one_process",
    "test_trainer.py::test_bad_input_is_one_line_and_exit_2[unknown flag]",
    "test_trainer.py::test_bad_data_and_checkpoints_are_one_line_and_lose_nothing",
    "test_trainer.py::test_prepare_and_sample_scripts",
    "test_trainer.py::test_wandb_without_a_key_logs_offline_and_never_prompts",
    "test_trainer.py::test_default_run_names_differ_by_backend_and_length_and_say_what_to_do",
    "test_trainer_input.py::test_bad_flag_from_the_command_line_is_one_line_and_exit_2",
}


def pytest_collection_modifyitems(config, items):
    """Marks the slow tests (above) and the tests on real hosts."""
    for item in items:
        file = item.path.name
        ids = {f"{file}::{item.originalname}", f"{file}::{item.name}"}
        if ids & SLOW_TESTS or (file in SLOW_FILES and not ids & FAST_IN_SLOW_FILES):
            item.add_marker(pytest.mark.slow)
        if "hosts" in item.fixturenames:
            item.add_marker(pytest.mark.multinode)


@pytest.fixture
def script(capsys, monkeypatch):
    """Run a script (path from the repository root) in this process as `python path args` would: faster than a
    subprocess; returns returncode, stdout and stderr."""
    def run(path, *args):
        path = str(ROOT / path)
        monkeypatch.setattr(sys, "argv", [path, *map(str, args)])
        monkeypatch.setattr(sys, "path", list(sys.path))
        handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        capsys.readouterr()
        try:
            runpy.run_path(path, run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code
        finally:  # a script's signal handlers (the sweep's) are not this process's
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        out, err = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out, stderr=err)
    return run


def assert_one_error_line(res, *words):
    """The bad-input contract: exit status 2 and one stderr line, 'error: ...', with the given words."""
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), res.stderr[-3000:]
    assert all(w in lines[0] for w in words), lines[0]
