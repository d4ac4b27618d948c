import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# A tiny model and batch that train in about a second per 20 steps on one CPU core.
TINY = ["--n_layer", "1", "--n_head", "2", "--head_width", "16", "--base_head_width", "16", "--seq_len", "32",
        "--per_device_train_batch_size", "4", "--tokenizer", "bytes", "--eval_iters", "2", "--log_interval", "1",
        "--eval_interval", "0", "--precision", "fp32", "--lr_scheduler_type", "constant"]


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
