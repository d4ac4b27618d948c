"""Checkpoint folders: written atomically, the last K kept, found again by --resume auto|PATH.

<run_dir>/checkpoints/step_00000100/ holds the engine's native state plus trainer.json (step,
tokens, best val loss). A folder is written as step_N.tmp and renamed when complete, so a run
killed while saving resumes from the previous complete one.
"""
import json
import os
import re
import shutil

from mupgpt.errors import UsageError

STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoints(run_dir):
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), os.path.join(root, d)) for d in os.listdir(root) if (m := STEP_DIR.match(d))]
    return [path for _, path in sorted(found)]


def save(engine, run_dir, trainer_state, keep):
    """All ranks call this; rank 0 owns the folder. Returns the final path."""
    world = engine.world
    final = os.path.join(run_dir, "checkpoints", f"step_{trainer_state['step']:08d}")
    tmp = final + ".tmp"
    if world.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    world.barrier()
    engine.save(tmp)
    world.barrier()
    if world.is_main:
        with open(os.path.join(tmp, "trainer.json"), "w") as f:
            json.dump(trainer_state, f)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        for old in checkpoints(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    world.barrier()
    return final


def find_resume(resume, run_dir):
    """--resume auto -> latest complete checkpoint or None; a path -> that checkpoint (checked)."""
    if not resume:
        return None
    if resume == "auto":
        found = checkpoints(run_dir)
        return found[-1] if found else None
    if os.path.exists(os.path.join(resume, "trainer.json")):
        return resume
    # a run directory, or its checkpoints/ folder: take the latest complete checkpoint in it
    found = checkpoints(resume) or checkpoints(os.path.dirname(os.path.abspath(resume)))
    if os.path.isdir(resume) and found:
        return found[-1]
    if os.path.isdir(resume):
        return resume  # read_trainer_state names what is missing
    raise UsageError(f"--resume {resume}: no such checkpoint: give a checkpoints/step_N folder, a run directory, or 'auto'")


def read_trainer_state(path):
    try:
        with open(os.path.join(path, "trainer.json")) as f:
            state = json.load(f)
        int(state["step"])
        return state
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(f"{path} is not a complete checkpoint (trainer.json missing or corrupt): "
                         "resume from an earlier checkpoints/step_N folder, or start afresh") from None


def restore(engine, path, trainer_state, backend):
    """Native state when the same backend and world size wrote it; otherwise the consolidated weights."""
    same = trainer_state.get("backend") == backend and trainer_state.get("world_size") == engine.world.world_size
    if same:
        engine.load(path)
        return
    from safetensors.torch import load_file
    weights = os.path.join(path, "model.safetensors")
    if not os.path.exists(weights):
        raise UsageError(f"{path} has no model.safetensors: resume it with the backend and world size that wrote it")
    engine.load_model(load_file(weights))
    if engine.world.is_main:
        print(f"note: {path} was written by {trainer_state.get('backend')} on {trainer_state.get('world_size')} rank(s); "
              "loaded its weights, the optimizer state starts afresh", flush=True)
