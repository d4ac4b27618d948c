"""Generate text from a trained run (its consolidated model.safetensors + model_config.json).

    python scripts/sample.py runs/mup_4x32_d2_lr0.003_s1234_single_1000steps --prompt "def " --max_new_tokens 200
"""
import argparse
import math
import sys

import torch
import torch.nn.functional as F

from mupgpt.data import get_tokenizer
from mupgpt.errors import ArgumentParser, UsageError, exit_on_usage_error
from mupgpt.trained import load_model, unfinished_note


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
    p.add_argument("--temperature", type=float, default=0.8,
                   help="softmax temperature (0: greedy, always the likeliest token)")
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
