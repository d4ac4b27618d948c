import json
import os
import runpy
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


def trainer_args(out, corpus, data_dir, *extra):
    return ["--output_dir", str(out), "--dataset", str(corpus), "--data_dir", str(data_dir), *TINY, *extra]


def run_cli(args, launcher=(sys.executable,), env=None, timeout=600):
    """Run the trainer as a user would; returns the CompletedProcess."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([*launcher, str(ROOT / "run_trainer.py"), *map(str, args)], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def losses(run_dir, key="loss"):
    rows = [json.loads(l) for l in open(Path(run_dir) / "metrics.jsonl")]
    return [r[key] for r in rows if key in r]


def pytest_configure(config):
    config.addinivalue_line("markers", "multinode: runs on real hosts made from network namespaces (skips where they can't be made)")


@pytest.fixture
def script(capsys, monkeypatch):
    """Run a script (path from the repository root) in this process as `python path args` would: faster than a
    subprocess; returns returncode, stdout and stderr."""
    def run(path, *args):
        path = str(ROOT / path)
        monkeypatch.setattr(sys, "argv", [path, *map(str, args)])
        monkeypatch.setattr(sys, "path", list(sys.path))
        capsys.readouterr()
        try:
            runpy.run_path(path, run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code
        out, err = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out, stderr=err)
    return run


def assert_one_error_line(res, *words):
    """The bad-input contract: exit status 2 and one stderr line, 'error: ...', with the given words."""
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), res.stderr[-3000:]
    assert all(w in lines[0] for w in words), lines[0]
