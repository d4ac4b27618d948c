"""Step lines and metrics.jsonl carry the elapsed time and an ETA that leaves evaluation time out."""
import json
import re

from conftest import run_cli, trainer_args


def test_step_lines_show_elapsed_and_eta(tmp_path, corpus, data_dir):
    # 100 validation batches after every step: evaluation takes far longer than the training steps
    res = run_cli(trainer_args(tmp_path, corpus, data_dir, "--max_steps", "4", "--eval_interval", "1",
                               "--eval_iters", "100", "--run_name", "r"))
    assert res.returncode == 0, res.stderr
    steps = [line for line in res.stdout.splitlines() if line.startswith("step ")]
    assert len(steps) == 4
    for line in steps:
        assert re.search(r"\| (\d+h\d\dm|\d+m\d\ds|\d+s) elapsed, ETA (\d+h\d\dm|\d+m\d\ds|\d+s) \|", line), line
    assert steps[-1].split("ETA ")[1].startswith("0s")
    rows = [json.loads(line) for line in open(tmp_path / "r" / "metrics.jsonl")]
    elapsed = [r["elapsed_s"] for r in rows]
    assert elapsed == sorted(elapsed) and elapsed[0] > 0
    assert rows[-1]["eta_s"] == 0
    # at step 3 one step is left: an ETA that counted the evaluations would be about elapsed / 3
    assert 0 < rows[2]["eta_s"] < rows[2]["elapsed_s"] / 3 / 4


def test_duration_format():
    from mupgpt.metrics import duration
    assert [duration(s) for s in (0.2, 42, 83, 3600 + 5 * 60 + 7, 27 * 3600)] == ["0s", "42s", "1m23s", "1h05m",
                                                                                  "27h00m"]


def test_profile_is_taken_after_warm_up_and_said_when_the_run_is_too_short(tmp_path, corpus, data_dir):
    """--print_profile_results profiles steps 13-16 (compile and the allocator have settled by then): host
    tables and, with MUPGPT_PROFILE_TRACE, a Chrome trace; a shorter run says there is no profile."""
    trace = tmp_path / "trace.json"
    res = run_cli(trainer_args(tmp_path, corpus, data_dir, "--max_steps", "16", "--run_name", "long",
                               "--print_profile_results"), env={"MUPGPT_PROFILE_TRACE": str(trace)})
    assert res.returncode == 0, res.stderr
    assert "Self CPU time total" in res.stdout and "no profile" not in res.stdout
    events = json.loads(trace.read_text())["traceEvents"]
    steps = [e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#")]
    assert sorted(set(steps)) == [f"ProfilerStep#{n}" for n in (12, 13, 14, 15)]  # 0-based: steps 13-16
    res = run_cli(trainer_args(tmp_path, corpus, data_dir, "--max_steps", "5", "--run_name", "short",
                               "--print_profile_results"))
    assert res.returncode == 0, res.stderr
    assert "note: no profile: --print_profile_results profiles steps 13-16, this run ended at step 5" in res.stdout
