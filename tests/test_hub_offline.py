"""A hub dataset when the hub can't be reached: one line at once, not ~30 s of datasets' retries."""
import socket
import time

import pytest

from conftest import run_cli, trainer_args
from mupgpt.data import hub_reachable


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens on it once closed: a connection is refused


@pytest.mark.parametrize("endpoint", ["closed", "default"])
def test_an_unreachable_hub_is_said_at_once(tmp_path, corpus, endpoint):
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"} if endpoint == "closed" else {}
    if endpoint == "default" and hub_reachable():
        pytest.skip("huggingface.co answers from here")
    t = time.time()
    res = run_cli(trainer_args(tmp_path / "runs", corpus, tmp_path / "data", "--dataset", "someone/some-dataset",
                               "--max_steps", "1"), env={**env, "HF_HUB_OFFLINE": "", "HF_DATASETS_OFFLINE": ""})
    took = time.time() - t
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "error: the hub cannot be reached (no network?) for dataset 'someone/some-dataset': use --dataset stdlib or "
        "a local path (or set HF_HUB_OFFLINE=1 to load it from the datasets cache)"]
    assert took < 25, took  # interpreter and torch start-up included; datasets' retries took about 30 s alone
    assert not (tmp_path / "data").exists()


def test_hub_reachable_connects_for_real(monkeypatch):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert hub_reachable()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    t = time.time()
    assert not hub_reachable()
    assert time.time() - t < 4
