"""A trained run read back for sampling and export: its consolidated model and tokenizer name, and whether
the model is from the run's last step."""
import dataclasses
import json
import os

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from mup_model import GPT, GPTConfig
from mupgpt.errors import UsageError


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
