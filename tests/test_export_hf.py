"""scripts/export_hf.py: a run exported to the GPT-2 layout gives mupgpt's logits in transformers."""
import json
import math
import os
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import save_file

from conftest import ROOT
from mup_model import GPT, GPTConfig, attention_scale, output_scale, residual_scale


def export_cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "export_hf.py"), *map(str, args)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)


def export_inproc(monkeypatch, capsys, *args):
    """The script's main as the command line runs it, in this process (a subprocess costs a torch import)."""
    import export_hf
    monkeypatch.setattr(sys, "argv", ["export_hf.py", *map(str, args)])
    capsys.readouterr()
    try:
        export_hf.exit_on_usage_error(export_hf.main)
        code = 0
    except SystemExit as e:
        code = e.code
    return subprocess.CompletedProcess(args, code, *capsys.readouterr())


def write_run(run_dir, cfg, tokenizer=None):
    """A run directory as the trainer leaves it, holding a random model whose every multiplier matters."""
    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.no_grad():  # LayerNorms away from 1 / 0 and non-zero biases, so their export is tested
        for name, p in model.named_parameters():
            if ".ln_" in name or name.startswith("ln_f.") or name.endswith(".bias"):
                p.add_(0.3 * torch.randn_like(p))
    os.makedirs(run_dir)
    save_file(model.state_dict(), os.path.join(run_dir, "model.safetensors"))
    with open(os.path.join(run_dir, "model_config.json"), "w") as f:
        json.dump(asdict(cfg), f)
    if tokenizer:
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump({"resolved": {"data": {"tokenizer": tokenizer}}}, f)
    return model.eval()


def cfg_with(**kw):
    base = dict(vocab_size=320, block_size=32, n_layer=3, n_head=2, head_width=16, base_head_width=4,
                base_n_layer=1, depth_alpha=1.0, output_mult=2.0, attn_mult=3.0, readout_zero_init=False,
                query_zero_init=False, bias=True)
    return GPTConfig(**{**base, **kw})


@pytest.mark.parametrize("kw", [{}, {"bias": False}, {"parametrization": "sp", "depth_alpha": 0.5}],
                         ids=["mup_bias", "mup_nobias", "sp"])
def test_export_matches_logits(tmp_path, monkeypatch, capsys, kw):
    transformers = pytest.importorskip("transformers")
    cfg = cfg_with(**kw)
    # the test only proves the folds if each multiplier differs from what GPT-2 does by itself
    assert abs(attention_scale(cfg) * math.sqrt(cfg.head_width) - 1) > 0.1
    assert abs(residual_scale(cfg) - 1) > 0.1 and abs(output_scale(cfg) - 1) > 0.1
    model = write_run(tmp_path / "run", cfg, tokenizer="bytes")
    if kw:
        res = export_inproc(monkeypatch, capsys, tmp_path / "run", tmp_path / "hf")
    else:  # once as a user runs it
        res = export_cli(tmp_path / "run", tmp_path / "hf")
    assert res.returncode == 0, res.stderr
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "model.safetensors"]
    exported = json.load(open(tmp_path / "hf" / "config.json"))
    assert exported["mupgpt"]["tokenizer"] == "bytes" and exported["eos_token_id"] == 256
    assert exported["vocab_size"] == 320 and exported["n_positions"] == 32

    hf, info = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf"), output_loading_info=True)
    assert not any(info.values()), info  # every weight came from the file, none was left at its init
    assert not hf.config.tie_word_embeddings  # transformers 4 would tie lm_head to wte otherwise
    assert hf.lm_head.weight.data_ptr() != hf.transformer.wte.weight.data_ptr()
    hf.eval()
    ids = torch.randint(0, cfg.vocab_size, (2, cfg.block_size), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert theirs.shape == ours.shape
    err = (ours - theirs).abs().max().item()
    assert err < 1e-4 * max(1.0, ours.abs().max().item()), err


def test_export_errors(tmp_path, monkeypatch, capsys):
    def export_cli(*args):
        return export_inproc(monkeypatch, capsys, *args)

    missing = export_cli(tmp_path / "nothing", tmp_path / "out")
    assert missing.returncode == 2 and missing.stderr.startswith("error: ") and "not a directory" in missing.stderr
    (tmp_path / "empty").mkdir()
    nofiles = export_cli(tmp_path / "empty", tmp_path / "out")
    assert nofiles.returncode == 2 and "model.safetensors + model_config.json" in nofiles.stderr
    assert not (tmp_path / "out").exists()

    write_run(tmp_path / "run", cfg_with(n_layer=1, base_n_layer=1))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    taken = export_cli(tmp_path / "run", tmp_path / "taken")
    assert taken.returncode == 2 and "not an empty directory" in taken.stderr
    assert os.listdir(tmp_path / "taken") == ["keep.txt"] and (tmp_path / "taken" / "keep.txt").read_text() == "mine"

    cfg_file = tmp_path / "run" / "model_config.json"
    good = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**good, "n_layer": 2}))
    mismatch = export_cli(tmp_path / "run", tmp_path / "out")
    assert (mismatch.returncode == 2 and "model.safetensors does not fit" in mismatch.stderr
            and mismatch.stderr.count("\n") == 1)
    cfg_file.write_text(json.dumps({**good, "arch": "llama"}))
    llama = export_cli(tmp_path / "run", tmp_path / "out")
    assert llama.returncode == 2 and "'llama'" in llama.stderr and "gpt2 only" in llama.stderr
    cfg_file.write_text(json.dumps(good))
    weights = tmp_path / "run" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    cut = export_cli(tmp_path / "run", tmp_path / "out")
    assert cut.returncode == 2 and "model.safetensors is not a readable safetensors file" in cut.stderr
    for res in (missing, nofiles, taken, mismatch, llama, cut):
        assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    assert sorted(os.listdir(tmp_path)) == ["empty", "run", "taken"]  # no output and no temporary left behind


def test_a_stopped_run_is_exported_with_a_note_naming_its_step(tmp_path, corpus, data_dir):
    """A run stopped early still writes its model: export_hf.py and sample.py say which step of how many it is."""
    import signal

    from conftest import losses, trainer_args
    args = trainer_args(tmp_path, corpus, data_dir, "--run_name", "r", "--max_steps", "100000", "--save_interval", "0")
    run = subprocess.Popen([sys.executable, str(ROOT / "run_trainer.py"), *args], cwd=ROOT, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE)
    while not run.stdout.readline().startswith("step"):  # it has started training
        assert run.poll() is None, "the run ended early"
    run.send_signal(signal.SIGTERM)
    run.communicate(timeout=120)
    assert run.returncode == 0
    step = losses(tmp_path / "r", "step")[-1]
    note = f"note: {tmp_path / 'r'} stopped at step {step} of 100000: this model is that step's"
    res = export_cli(tmp_path / "r", tmp_path / "hf")
    assert res.returncode == 0 and note in res.stdout, res.stderr[-3000:]
    mupgpt = json.loads((tmp_path / "hf" / "config.json").read_text())["mupgpt"]
    assert mupgpt["trained_steps"] == {"step": step, "total_steps": 100000}
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "sample.py"), tmp_path / "r", "--max_new_tokens", "2",
                          "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and note in res.stderr, res.stderr[-3000:]


def test_export_bad_arguments_and_unwritable_out_dirs_are_one_line(tmp_path, monkeypatch, capsys):
    def export_cli(*args):
        return export_inproc(monkeypatch, capsys, *args)

    write_run(tmp_path / "run", cfg_with(n_layer=1, base_n_layer=1))
    (tmp_path / "f").write_text("x")
    ro = tmp_path / "ro"
    ro.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M,ro", "tmpfs", str(ro)],
                             capture_output=True).returncode == 0
    try:
        cases = [((), "the following arguments are required: run_dir, out_dir"),
                 ((tmp_path / "run",), "the following arguments are required: out_dir"),
                 ((tmp_path / "run", tmp_path / "out", "--bogus"), "unrecognized arguments: --bogus"),
                 ((tmp_path / "f", tmp_path / "out"), "is not a directory"),
                 ((tmp_path / "run", tmp_path / "f" / "out"), f"cannot create {tmp_path / 'f' / 'out'}")]
        if mounted:
            cases.append(((tmp_path / "run", ro / "out"), f"cannot create {ro / 'out'} (Read-only file system"))
        for args, words in cases:
            res = export_cli(*args)
            lines = res.stderr.strip().splitlines()
            assert (res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ")
                    and words in lines[0]), res.stderr
    finally:
        if mounted:
            subprocess.run(["umount", str(ro)], check=True)
    assert not (tmp_path / "out").exists()
