"""Tokenizers beyond gpt2 and bytes: any encoding tiktoken knows, loaded through tiktoken's own path.

tiktoken's BPE files can't be downloaded here, and a file in TIKTOKEN_CACHE_DIR must match the hash
tiktoken pins for its own encodings. So the test registers an encoding of its own the way tiktoken
finds any (a tiktoken_ext plugin module) whose ranks file, named by URL, is already in
TIKTOKEN_CACHE_DIR under tiktoken's cache key: get_encoding runs unchanged and offline. Its
end-of-text id is 70000, so the vocabulary needs uint32 tokens and has a gap of unused ids."""
import base64
import hashlib
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import ROOT, run_cli, trainer_args

URL = "https://example.invalid/tiny_wide.tiktoken"
PLUGIN = f'''
from tiktoken.load import load_tiktoken_bpe


def tiny_wide():
    return {{"name": "tiny_wide", "pat_str": r"\\w+| ?[^\\s\\w]+|\\s+",
             "mergeable_ranks": load_tiktoken_bpe("{URL}"), "special_tokens": {{"<|endoftext|>": 70000}}}}


ENCODING_CONSTRUCTORS = {{"tiny_wide": tiny_wide}}
'''


@pytest.fixture(scope="module")
def tiny_env(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiktoken")
    (d / "plugins" / "tiktoken_ext").mkdir(parents=True)
    (d / "plugins" / "tiktoken_ext" / "mupgpt_tiny_wide.py").write_text(PLUGIN)
    ranks = [bytes([i]) for i in range(256)] + [b"de", b"def", b"re", b"ret", b"return", b"  ", b"    "]
    (d / "cache").mkdir()
    with open(d / "cache" / hashlib.sha1(URL.encode()).hexdigest(), "wb") as f:
        f.writelines(base64.b64encode(t) + b" %d\n" % i for i, t in enumerate(ranks))
    return {"PYTHONPATH": str(d / "plugins"), "TIKTOKEN_CACHE_DIR": str(d / "cache")}


def test_a_wide_tiktoken_encoding_trains_and_samples(tmp_path, corpus, tiny_env):
    data = tmp_path / "data"
    res = run_cli(trainer_args(tmp_path / "runs", corpus, data, "--max_steps", "2", "--run_name", "wide",
                               "--tokenizer", "tiny_wide"), env=tiny_env)
    assert res.returncode == 0, res.stderr
    (prepared,) = data.glob("*-tiny_wide")
    meta = json.loads((prepared / "meta.json").read_text())
    assert (meta["tokenizer"], meta["vocab_size"], meta["eot"], meta["dtype"]) == ("tiny_wide", 70001, 70000, "uint32")
    run = tmp_path / "runs" / "wide"
    assert json.loads((run / "config.json").read_text())["resolved"]["model"]["vocab_size"] == 70016  # padded to 64
    # sampling from the untrained model draws ids from the gap 263..69999 and the padding: they are skipped
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "sample.py"), str(run), "--prompt", "def f",
                          "--max_new_tokens", "64", "--temperature", "1", "--top_k", "0"], cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1",
                              **tiny_env}, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("def f")
    # and the transformers export names its end-of-text id (read from the run, not a table of known tokenizers)
    exported = subprocess.run([sys.executable, str(ROOT / "scripts" / "export_hf.py"), str(run), str(tmp_path / "hf")],
                              capture_output=True, text=True, env=tiny_env, timeout=300)
    assert exported.returncode == 0, exported.stderr
    hf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf["eos_token_id"] == 70000 and hf["mupgpt"]["tokenizer"] == "tiny_wide"


def test_the_choices_list_tiktoken_encodings():
    res = run_cli(["--help"])
    assert res.returncode == 0
    for name in ("bytes", "gpt2", "cl100k_base", "o200k_base", "r50k_base", "p50k_base"):
        assert name in res.stdout


def test_an_encoding_whose_files_cannot_be_had_is_one_line(tmp_path, corpus):
    t = time.time()
    res = run_cli(trainer_args(tmp_path / "runs", corpus, tmp_path / "data", "--tokenizer", "cl100k_base"),
                  env={"TIKTOKEN_CACHE_DIR": str(tmp_path / "empty_cache")})
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "cl100k_base" in lines[0], res.stderr
    assert "TIKTOKEN_CACHE_DIR" in lines[0] and "--tokenizer bytes" in lines[0]
    assert time.time() - t < 60
    assert not (tmp_path / "data").exists()
