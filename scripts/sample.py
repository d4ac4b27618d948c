"""Generate text from a trained run (its consolidated model.safetensors + model_config.json).

    python scripts/sample.py runs/mup_4x32_d2_lr0.003_s1234_single_1000steps --prompt "def " --max_new_tokens 200
"""
import argparse
import dataclasses
import json
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors import SafetensorError  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from mup_model import GPT, GPTConfig  # noqa: E402
from mupgpt.data import get_tokenizer  # noqa: E402
from mupgpt.errors import ArgumentParser, UsageError, exit_on_usage_error  # noqa: E402


def read_json(path, what):
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError) as e:
        raise UsageError(f"{path} is not readable JSON ({type(e).__name__}): {what}") from None
    if not isinstance(obj, dict):
        raise UsageError(f"{path} is not a JSON object: {what}")
    return obj


def load_model(run_dir, device="cpu"):
    """A run directory (or any folder with model.safetensors + model_config.json) -> GPT, tokenizer name."""
    if not os.path.isdir(run_dir):
        raise UsageError(f"{run_dir} is not a directory: give a finished run's directory")
    weights, cfg_file = os.path.join(run_dir, "model.safetensors"), os.path.join(run_dir, "model_config.json")
    if not (os.path.exists(weights) and os.path.exists(cfg_file)):
        raise UsageError(f"{run_dir} has no model.safetensors + model_config.json: give a finished run's directory")
    redo = "export the model again from the run's last checkpoint, or give another run"
    cfg = read_json(cfg_file, redo)
    unknown = sorted(set(cfg) - {f.name for f in dataclasses.fields(GPTConfig)})
    if unknown:
        raise UsageError(f"{cfg_file} has keys a GPTConfig does not: {unknown}: {redo}")
    bad = [k for k in ("vocab_size", "block_size", "n_layer", "n_head", "head_width") if k in cfg
           and (not isinstance(cfg[k], int) or isinstance(cfg[k], bool) or cfg[k] < 1)]
    if bad:
        raise UsageError(f"{cfg_file} has {bad[0]} {cfg[bad[0]]!r}, not a positive integer: {redo}")
    try:
        model = GPT(GPTConfig(**cfg))
    except Exception as e:
        raise UsageError(f"{cfg_file} does not describe a model ({type(e).__name__}: {e}): {redo}") from None
    try:
        state = load_file(weights)
    except (SafetensorError, OSError) as e:
        raise UsageError(f"{weights} is not a readable safetensors file ({e}): {redo}") from None
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = [k for k, v in state.items() if k in own and v.shape != own[k].shape]
    if missing or unexpected or wrong:
        raise UsageError(f"{weights} does not fit {cfg_file} (missing {missing[:3]}, unexpected {unexpected[:3]}, "
                         f"other shapes {wrong[:3]}): {redo}")
    model.load_state_dict(state)
    tokenizer = "bytes"
    run_cfg = os.path.join(run_dir, "config.json")
    if os.path.exists(run_cfg):
        try:
            tokenizer = read_json(run_cfg, "")["resolved"]["data"]["tokenizer"]
        except (UsageError, KeyError, TypeError):
            raise UsageError(f"{run_cfg} does not name the run's tokenizer (resolved.data.tokenizer): "
                             "restore the run's config.json, or move it away to use the byte tokenizer") from None
    return model.to(device).eval(), tokenizer


def trained_steps(run_dir):
    """(the step model.safetensors is from, the run's steps), or None where the run does not record them."""
    try:
        with safe_open(os.path.join(run_dir, "model.safetensors"), "pt") as f:
            meta = f.metadata() or {}
        return int(meta["step"]), int(meta["total_steps"])
    except (SafetensorError, OSError, KeyError, ValueError, TypeError):
        pass
    try:  # written before the weights recorded their step: a finished run has a summary saying so
        with open(os.path.join(run_dir, "config.json")) as f:
            total = int(json.load(f)["resolved"]["total_steps"])
        with open(os.path.join(run_dir, "summary.json")) as f:
            summary = json.load(f)
        return int(summary["steps"]), total
    except (OSError, ValueError, KeyError, TypeError):
        return None


def unfinished_note(run_dir):
    """One line when the model is from a run that stopped before its last step, else None."""
    steps = trained_steps(run_dir)
    if steps and steps[0] < steps[1]:
        return (f"note: {run_dir} stopped at step {steps[0]} of {steps[1]}: this model is that step's, not a finished "
                "run's (resume the run with --resume auto to finish it)")
    return None


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature, top_k):
    """Sample max_new_tokens tokens; temperature 0 is greedy (the most likely token each step)."""
    for _ in range(max_new_tokens):
        logits = model(idx[:, -model.cfg.block_size:])[:, -1, :].float()
        if temperature == 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            nxt = torch.multinomial(F.softmax(logits, dim=-1), 1)
        idx = torch.cat((idx, nxt), dim=1)
    return idx


def check_args(args):
    if args.max_new_tokens < 1:
        raise UsageError(f"--max_new_tokens must be at least 1, not {args.max_new_tokens}")
    if not args.temperature >= 0 or math.isinf(args.temperature):
        raise UsageError(f"--temperature must be a finite number >= 0 (0: greedy), not {args.temperature}")
    if args.top_k < 0:
        raise UsageError(f"--top_k must be >= 0 (0: no limit), not {args.top_k}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UsageError(f"--device {args.device!r} is not a device: use cpu or cuda (cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA GPU is visible here: use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {args.device!r}: use cpu or cuda (cuda:N)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {args.device}: only {torch.cuda.device_count()} GPU(s) here")


def main():
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a finished run's directory (model.safetensors + model_config.json)")
    p.add_argument("--prompt", default="\n", help="text to continue (empty: start from the end-of-text token)")
    p.add_argument("--max_new_tokens", type=int, default=200, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="softmax temperature (0: greedy, always the likeliest token)")
    p.add_argument("--top_k", type=int, default=50, help="sample from the k likeliest tokens (0: no limit)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    args = p.parse_args()
    check_args(args)
    model, tok_name = load_model(args.run_dir, args.device)
    note = unfinished_note(args.run_dir)
    if note:
        print(note, file=sys.stderr, flush=True)
    tok = get_tokenizer(tok_name)
    try:
        torch.manual_seed(args.seed)
    except (RuntimeError, ValueError, OverflowError):
        raise UsageError(f"--seed {args.seed} is out of range: use a 64-bit integer") from None
    prompt = tok.encode(args.prompt) or [tok.eot]  # an empty prompt starts as a new document does
    idx = torch.tensor([prompt], dtype=torch.long, device=args.device)
    out = generate(model, idx, args.max_new_tokens, args.temperature, args.top_k)
    print(tok.decode(out[0].tolist()))


if __name__ == "__main__":
    exit_on_usage_error(main)
