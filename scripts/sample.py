"""Generate text from a trained run (its consolidated model.safetensors + model_config.json).

    python scripts/sample.py runs/mup_w32_d2_lr0.003_s1234 --prompt "def " --max_new_tokens 200
"""
import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from mup_model import GPT, GPTConfig  # noqa: E402
from mupgpt.data import get_tokenizer  # noqa: E402
from mupgpt.errors import UsageError, exit_on_usage_error  # noqa: E402


def load_model(run_dir, device="cpu"):
    """A run directory (or any folder with model.safetensors + model_config.json) -> GPT, tokenizer name."""
    weights, cfg_file = os.path.join(run_dir, "model.safetensors"), os.path.join(run_dir, "model_config.json")
    if not (os.path.exists(weights) and os.path.exists(cfg_file)):
        raise UsageError(f"{run_dir} has no model.safetensors + model_config.json: give a finished run's directory")
    model = GPT(GPTConfig(**json.load(open(cfg_file))))
    model.load_state_dict(load_file(weights, device=device))
    tokenizer = "bytes"
    run_cfg = os.path.join(run_dir, "config.json")
    if os.path.exists(run_cfg):
        tokenizer = json.load(open(run_cfg))["resolved"]["data"]["tokenizer"]
    return model.to(device).eval(), tokenizer


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--prompt", default="\n")
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top_k", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    model, tok_name = load_model(args.run_dir, args.device)
    tok = get_tokenizer("gpt2" if tok_name == "gpt2" else "bytes")
    torch.manual_seed(args.seed)
    idx = torch.tensor([tok.encode(args.prompt)], device=args.device)
    out = model.generate(idx, args.max_new_tokens, args.temperature, args.top_k)
    print(tok.decode(out[0].tolist()))


if __name__ == "__main__":
    exit_on_usage_error(main)
