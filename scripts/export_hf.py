"""Export a trained run to the GPT-2 layout of transformers, with every muP and depth multiplier folded
into the weights, so any tool that loads GPT2LMHeadModel can take it:

    python scripts/export_hf.py runs/mup_4x32_d2_lr0.003_s1234_single_1000steps exported/
    # then: transformers.GPT2LMHeadModel.from_pretrained("exported/")

OUT_DIR gets config.json + model.safetensors (fp32). The padded vocabulary is kept, so ids at and above
the tokenizer's vocabulary are never produced by it; config.json's "mupgpt" section says which
tokenizer the ids belong to.
"""
import argparse
import errno
import json
import math
import os
import shutil
import tempfile

import torch
from safetensors.torch import save_file

from mup_model import attention_scale, output_scale, residual_scale
from mupgpt.errors import ArgumentParser, UsageError, exit_on_usage_error
from mupgpt.trained import load_model, trained_steps, unfinished_note

TOKENIZERS = {  # what the ids mean, for people and tools reading config.json
    "gpt2": (50256, "GPT-2 BPE (tiktoken 'gpt2', the same ids as the transformers 'gpt2' tokenizer)"),
    "bytes": (256, "UTF-8 bytes: ids 0..255 are the bytes, 256 is end-of-text"),
}


def run_eot(run_dir):
    """The end-of-text id the run's data was prepared with (config.json's resolved data), if recorded."""
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            return json.load(f)["resolved"]["data"]["eot"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


@torch.no_grad()
def gpt2_export(model):
    """mupgpt GPT -> (state dict of GPT2LMHeadModel, GPT2Config fields), multipliers folded in."""
    cfg = model.cfg
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    C = cfg.width
    # GPT-2 scales q.k by 1/sqrt(d_head); ours is attention_scale, so q carries the ratio.
    q_fold = attention_scale(cfg) * math.sqrt(cfg.head_width)
    branch = residual_scale(cfg)

    def linear(src, dst, scale=1.0, rows_scale=None):
        # nn.Linear keeps (out, in); transformers' Conv1D keeps (in, out).
        w = sd[f"{src}.weight"].clone()
        b = sd[f"{src}.bias"].clone() if f"{src}.bias" in sd else torch.zeros(w.shape[0])
        if rows_scale is not None:
            w, b = w * rows_scale[:, None], b * rows_scale
        out[f"{dst}.weight"] = (w * scale).t().contiguous()
        out[f"{dst}.bias"] = (b * scale).contiguous()

    def norm(src, dst):
        out[f"{dst}.weight"] = sd[f"{src}.weight"].clone()
        out[f"{dst}.bias"] = sd[f"{src}.bias"].clone() if f"{src}.bias" in sd else torch.zeros(C)

    out = {"transformer.wte.weight": sd["wte.weight"].clone(), "transformer.wpe.weight": sd["wpe.weight"].clone()}
    qkv_rows = torch.ones(3 * C)
    qkv_rows[:C] = q_fold  # the fused projection is q, k, v along the output dim in both layouts
    for i in range(cfg.n_layer):
        s, d = f"h.{i}", f"transformer.h.{i}"
        norm(f"{s}.ln_1", f"{d}.ln_1")
        linear(f"{s}.attn.c_attn", f"{d}.attn.c_attn", rows_scale=qkv_rows)
        linear(f"{s}.attn.c_proj", f"{d}.attn.c_proj", scale=branch)
        norm(f"{s}.ln_2", f"{d}.ln_2")
        linear(f"{s}.mlp.c_fc", f"{d}.mlp.c_fc")
        linear(f"{s}.mlp.c_proj", f"{d}.mlp.c_proj", scale=branch)
    norm("ln_f", "transformer.ln_f")
    out["lm_head.weight"] = (sd["lm_head.weight"] * output_scale(cfg)).contiguous()

    fields = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "dtype": "float32",
        "vocab_size": cfg.vocab_size, "n_positions": cfg.block_size, "n_embd": C, "n_layer": cfg.n_layer,
        "n_head": cfg.n_head, "n_inner": 4 * C,
        "activation_function": "gelu",  # exact erf GELU, as F.gelu; "gelu_new" would be the tanh one
        "layer_norm_epsilon": 1e-5, "initializer_range": cfg.init_std,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "summary_first_dropout": 0.0,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "tie_word_embeddings": False,  # lm_head is its own (scaled) matrix
        "use_cache": True,
    }
    return out, fields


EXPORTERS = {"gpt2": gpt2_export}  # model_config.json "arch" (absent: gpt2) -> exporter


def read_arch(run_dir):
    cfg_file = os.path.join(run_dir, "model_config.json")
    if not os.path.isfile(cfg_file):
        return "gpt2"  # load_model says what is missing
    try:
        arch = json.load(open(cfg_file)).get("arch", "gpt2")
    except (ValueError, AttributeError):
        raise UsageError(f"{cfg_file} is not a JSON object: give a finished run's directory") from None
    if arch not in EXPORTERS:
        raise UsageError(f"{run_dir} holds a {arch!r} model; export_hf.py exports {', '.join(EXPORTERS)} only")
    return arch


def export(run_dir, out_dir):
    if not os.path.isdir(run_dir):
        raise UsageError(f"{run_dir} is not a directory: give a finished run's directory")
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise UsageError(f"{out_dir} already exists and is not an empty directory: give a new OUT_DIR")
    arch = read_arch(run_dir)
    try:
        model, tokenizer = load_model(run_dir)
    except (TypeError, ValueError, KeyError) as e:
        raise UsageError(f"{run_dir}'s model_config.json (or config.json) is not mupgpt's ({e}): "
                         "give a finished run's directory") from None
    note = unfinished_note(run_dir)
    if note:
        print(note, flush=True)
    state, fields = EXPORTERS[arch](model)
    eot, meaning = TOKENIZERS.get(tokenizer, (run_eot(run_dir), f"tiktoken '{tokenizer}'"))
    fields.update(bos_token_id=eot, eos_token_id=eot, mupgpt={
        "tokenizer": tokenizer, "tokenizer_ids": meaning, "source_run": os.path.abspath(run_dir),
        "model_config": dict(vars(model.cfg)),
        "trained_steps": dict(zip(("step", "total_steps"), trained_steps(run_dir) or ())) or None,
        "note": "muP, depth and attention multipliers are folded into the weights; vocab_size is the "
                "padded one the model was trained with"})

    parent = os.path.dirname(os.path.abspath(out_dir))
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out_dir))}.tmp-", dir=parent)
    except OSError as e:
        raise UsageError(f"cannot create {out_dir} ({e.strerror}: {e.filename}): give an OUT_DIR in a writable "
                         "folder") from None
    try:
        save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(fields, f, indent=2)
        umask = os.umask(0)
        os.umask(umask)
        for name in os.listdir(tmp):  # mkdtemp and safetensors make owner-only files
            os.chmod(os.path.join(tmp, name), 0o666 & ~umask)
        os.chmod(tmp, 0o777 & ~umask)
        os.replace(tmp, out_dir)  # replaces an empty OUT_DIR too
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UsageError(f"the disk is full: could not write {out_dir} (nothing was left there): free space and "
                             "export again") from None
        raise
    return out_dir


def main():
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a finished run (model.safetensors + model_config.json)")
    p.add_argument("out_dir", help="a new (or empty) folder for config.json + model.safetensors")
    args = p.parse_args()
    print(f"exported {args.run_dir} to {export(args.run_dir, args.out_dir)}")


if __name__ == "__main__":
    exit_on_usage_error(main)
