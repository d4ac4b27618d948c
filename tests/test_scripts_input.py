"""Nonsense given to prepare_data.py and sample.py: one 'error: ' line on stderr, status 2, nothing written.

Most cases run the script in this process (runpy, as __main__, stderr captured): interpreter start-up
on a loaded machine took ~10 s a run. One case per script runs it as a real subprocess."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, assert_one_error_line
from mup_model import GPT, GPTConfig


def subprocess_script(name, *args):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / name), *map(str, args)], cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)


@pytest.fixture
def script(script):
    """These scripts live in scripts/."""
    return lambda name, *args: script(f"scripts/{name}", *args)



def texts(folder, n=12):
    folder.mkdir()
    for i in range(n):
        (folder / f"doc{i:02d}.txt").write_text(f"plain text number {i}\n" * 20)
    return folder


def bad_binary(d):
    (d / "zz.txt").write_bytes(bytes(range(256)) * 8)
    return "zz.txt", "not UTF-8"


def bad_utf16(d):
    (d / "zz.txt").write_text("text saved as UTF-16\n" * 10, encoding="utf-16")
    return "zz.txt", "not UTF-8"


def bad_latin1(d):
    (d / "zz.txt").write_bytes("café crème\n".encode("latin-1"))
    return "zz.txt", "line 1 does not decode"


def bad_jsonl(d):
    for f in d.iterdir():
        f.unlink()
    lines = [json.dumps({"text": f"document {i}"}) for i in range(20)]
    (d / "docs.jsonl").write_text("\n".join(lines[:7] + ['{"text": "cut off'] + lines[7:]) + "\n")
    return "docs.jsonl", "line 8 is not JSON"


def bad_jsonl_record(d):
    for f in d.iterdir():
        f.unlink()
    rows = [{"text": None if i == 3 else "x", "id": i} for i in range(20)]
    (d / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return "docs.jsonl", "line 4 is not an object with a 'text' string"


def bad_parquet(d):
    for f in d.iterdir():
        f.unlink()
    (d / "docs.parquet").write_text("this is not parquet")
    return "docs.parquet", "not a readable parquet file"


@pytest.mark.parametrize("make", [bad_binary, bad_utf16, bad_latin1, bad_jsonl, bad_jsonl_record, bad_parquet])
def test_prepare_refuses_a_malformed_input_file_by_name(tmp_path, script, make):
    src = texts(tmp_path / "src")
    name, words = make(src)
    res = script("prepare_data.py", "--dataset", src, "--tokenizer", "bytes", "--data_dir", tmp_path / "d")
    assert_one_error_line(res, str(src / name), words)
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("flags,words", [
    (["--num_proc", "-1"], ["--num_proc must be at least 1"]),
    (["--num_proc", "0"], ["--num_proc must be at least 1"]),
    (["--data_dir", "{tmp}/src/doc00.txt"], ["is a file, not a folder"]),
    (["--data_dir", "{tmp}/src/doc00.txt/below"], ["is a file, not a folder"]),
])
def test_prepare_refuses_bad_flags(tmp_path, script, flags, words):
    src = texts(tmp_path / "src")
    before = sorted(os.listdir(src))
    flags = [f.format(tmp=tmp_path) for f in flags]
    res = script("prepare_data.py", "--dataset", src, "--tokenizer", "bytes", *(["--data_dir", tmp_path / "d"] + flags))
    assert_one_error_line(res, *words)
    assert not (tmp_path / "d").exists() and sorted(os.listdir(src)) == before


def test_too_few_documents_is_one_line_without_the_loaders_progress_bar(tmp_path, script):
    res = script("prepare_data.py", "--dataset", texts(tmp_path / "src", n=3), "--tokenizer", "bytes", "--data_dir",
                 tmp_path / "d")
    assert_one_error_line(res, "only 3 document(s)")
    assert not (tmp_path / "d").exists()


def test_prepare_shows_progress_while_writing_tokens(tmp_path, script):
    res = script("prepare_data.py", "--dataset", texts(tmp_path / "src"), "--tokenizer", "bytes", "--data_dir",
                 tmp_path / "d")
    assert res.returncode == 0, res.stderr
    assert "writing train.bin: 100%" in res.stderr and "writing val.bin: 100%" in res.stderr


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """An exported model as the trainer writes one (untrained: its zero read-out gives every token the
    same logit, so sampling at any temperature but 0 depends on the seed)."""
    d = tmp_path_factory.mktemp("model")
    cfg = GPTConfig(vocab_size=320, block_size=32, n_layer=1, n_head=2, head_width=16, base_head_width=16)
    from safetensors.torch import save_file
    save_file(GPT(cfg).state_dict(), d / "model.safetensors")
    (d / "model_config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    return d


@pytest.mark.parametrize("flags,words", [
    (["--max_new_tokens", "-3"], ["--max_new_tokens must be at least 1"]),
    (["--max_new_tokens", "0"], ["--max_new_tokens must be at least 1"]),
    (["--temperature", "-1"], ["--temperature must be a finite number >= 0"]),
    (["--temperature", "nan"], ["--temperature must be"]),
    (["--top_k", "-1"], ["--top_k must be >= 0"]),
    (["--seed", str(2**70)], ["--seed"]),
    (["--device", "nonsense"], ["--device 'nonsense'"]),
    (["--max_new_tokens", "x"], ["--max_new_tokens: invalid int value: 'x'", "see --help"]),
    (["--temperature", "warm"], ["--temperature: invalid float value"]),
    (["--bogus"], ["unrecognized arguments: --bogus"]),
])
def test_sample_refuses_bad_flags(model_dir, script, flags, words):
    assert_one_error_line(script("sample.py", model_dir, *flags), *words)


@pytest.mark.parametrize("where,words", [("missing", ["is not a directory"]), ("a file", ["is not a directory"]),
                                         ("empty", ["has no model.safetensors + model_config.json"]),
                                         ("none", ["the following arguments are required: run_dir"])])
def test_sample_refuses_a_missing_or_empty_run_dir(tmp_path, script, where, words):
    path = tmp_path / "x"
    if where == "a file":
        path.write_text("x")
    elif where == "empty":
        path.mkdir()
    assert_one_error_line(script("sample.py", *([] if where == "none" else [path])), *words)


@pytest.mark.parametrize("config,words", [
    ("{not json", ["model_config.json is not readable JSON"]),
    ('{"n_layer": 1, "n_heads": 2}', ["keys a GPTConfig does not: ['n_heads']"]),
    ('{"n_layer": 0}', ["n_layer 0, not a positive integer"]),
    ('{"n_layer": 2, "n_head": 2, "head_width": 16, "block_size": 32, "base_head_width": 16}', ["does not fit"]),
    (None, ["model.safetensors is not a readable safetensors file"]),
])
def test_sample_refuses_a_broken_model_folder(tmp_path, model_dir, script, config, words):
    d = tmp_path / "m"
    d.mkdir()
    (d / "model_config.json").write_text(config or (model_dir / "model_config.json").read_text())
    (d / "model.safetensors").write_bytes((model_dir / "model.safetensors").read_bytes() if config else b"\x00" * 64)
    assert_one_error_line(script("sample.py", d), *words)


def test_sample_empty_prompt_and_greedy_temperature_zero(model_dir, script):
    res = script("sample.py", model_dir, "--prompt", "", "--max_new_tokens", "8", "--top_k", "0")
    assert res.returncode == 0 and res.stdout.strip(), res.stderr
    greedy = [script("sample.py", model_dir, "--prompt", "ab", "--max_new_tokens", "6", "--temperature", "0",
                     "--seed", seed) for seed in (1, 2)]
    assert greedy[0].returncode == 0, greedy[0].stderr
    # every logit ties, so the most likely token is the first: byte 0, whatever the seed
    assert greedy[0].stdout == greedy[1].stdout == "ab" + "\x00" * 6 + "\n"


def test_each_script_as_a_real_process(tmp_path, model_dir):
    res = subprocess_script("prepare_data.py", "--dataset", texts(tmp_path / "src"), "--num_proc", "-1",
                            "--data_dir", tmp_path / "d")
    assert_one_error_line(res, "--num_proc must be at least 1")
    assert_one_error_line(subprocess_script("sample.py", model_dir, "--temperature", "-0.5"), "--temperature")
