"""--config FILE: a TOML or JSON file of flag values; the command line overrides it; bad files are one line."""
import json

import pytest

from conftest import ROOT, run_cli, trainer_args
from mupgpt.config import parse_args
from mupgpt.errors import UsageError


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_toml_tables_aliases_and_command_line_override(tmp_path):
    path = write(tmp_path, "run.toml", 'dataset = "stdlib"\nlr = 0.01\n\n[model]\nn_head = 8\nwidth = 16\n'
                                       'readout_zero_init = false\n[optimizer]\nweight_decay = 1\n')
    cfg = parse_args(["--n_head", "2", "--config", path, "--seed", "7"])
    assert (cfg.learning_rate, cfg.head_width, cfg.readout_zero_init, cfg.weight_decay) == (0.01, 16, False, 1.0)
    assert isinstance(cfg.weight_decay, float)
    assert (cfg.n_head, cfg.seed) == (2, 7)  # the command line wins, before or after --config
    cfg = parse_args([f"--config={path}", "--learning_rate", "0.5"])
    assert (cfg.learning_rate, cfg.n_head) == (0.5, 8)


def test_json_file(tmp_path):
    path = write(tmp_path, "run.json", json.dumps({"n_layer": 3, "tokenizer": "bytes", "compile": True}))
    cfg = parse_args(["--config", path])
    assert (cfg.n_layer, cfg.tokenizer, cfg.compile) == (3, "bytes", True)


@pytest.mark.parametrize("name,text,words", [
    ("a.toml", "n_head = 4\n\n[model]\nn_heads = 4\n", ["line 4", "n_heads", "did you mean n_head"]),
    ("a.toml", 'seq_len = "64"\n', ["line 1", "seq_len", "integer", "'64'"]),
    ("a.toml", "learning_rate = true\n", ["learning_rate", "a number"]),
    ("a.toml", "compile = 1\n", ["compile", "true or false"]),
    ("a.toml", 'n_layer = 2\nprecision = "bf61"\n', ["line 2", "precision", "did you mean bf16"]),
    ("a.toml", "n_layer = 2\nseq_len = 64 64\nseed = 1\n", ["not valid TOML", "line 2"]),
    ("a.toml", "lr = 1e-3\nlearning_rate = 2e-3\n", ["learning_rate", "again"]),
    ("a.json", '{"n_layer": 2,\n "seq_len": 64,,\n}', ["not valid JSON", "line 2"]),
    ("a.json", "[1, 2]", ["not an object"]),
    ("a.json", '{"n_layer": 2,\n "seq_len": 64,\n "n_layer": 3}', ["'n_layer' is given twice (lines 1, 3)",
                                                                   "keep one"]),
    ("a.yaml", "n_layer: 2\n", [".toml or .json"]),
])
def test_bad_files_name_the_key_and_line(tmp_path, name, text, words):
    with pytest.raises(UsageError) as e:
        parse_args(["--config", write(tmp_path, name, text)])
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg


def test_missing_file(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        parse_args(["--config", str(tmp_path / "nope.toml")])


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_parse(path):
    assert parse_args(["--config", str(path)]).seq_len > 0


def test_the_trainer_records_the_resolved_config(tmp_path, corpus, data_dir):
    path = write(tmp_path, "run.toml", '[optimizer]\nlearning_rate = 0.002\nweight_decay = 0.05\n'
                                       '[schedule]\nmax_steps = 2\nseed = 5\n')
    res = run_cli(trainer_args(tmp_path / "runs", corpus, data_dir, "--config", path, "--seed", "9", "--run_name", "r"))
    assert res.returncode == 0, res.stderr
    args = json.loads((tmp_path / "runs" / "r" / "config.json").read_text())["args"]
    assert (args["learning_rate"], args["weight_decay"], args["max_steps"], args["seed"]) == (0.002, 0.05, 2, 9)
    assert json.loads((tmp_path / "runs" / "r" / "summary.json").read_text())["steps"] == 2


def test_a_bad_file_is_one_line_from_the_command_line(tmp_path, corpus, data_dir):
    path = write(tmp_path, "run.toml", "max_step = 2\n")
    res = run_cli(trainer_args(tmp_path / "runs", corpus, data_dir, "--config", path))
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [f"error: {path} line 1: unknown key 'max_step' (did you mean "
                                               "max_steps?): "
                                               "keys are the trainer's flag names (see --help)"]
    assert not (tmp_path / "runs").exists()
