"""Checkpoint folders: written atomically, checked on resume, the last K kept, found by --resume auto|PATH.

<run_dir>/checkpoints/step_00000100/ holds the engine's native state, trainer.json (step, tokens,
best val loss, model config) and, written last, manifest.json: every file's size and sha256 and the
step. A folder is written as step_N.tmp and renamed when complete, so a run killed while saving
resumes from the previous complete one. A resume checks the manifest before anything is loaded or
changed: --resume auto skips a damaged checkpoint (saying so) for the one before it.
"""
import dataclasses
import errno
import glob
import hashlib
import json
import os
import re
import shutil

from safetensors.torch import save_file

from mupgpt.errors import UsageError

STEP_DIR = re.compile(r"^step_(\d+)$")
MANIFEST = "manifest.json"
# GPTConfig field -> the flag that sets it
FLAGS = {"vocab_size": "--vocab_size/--tokenizer", "block_size": "--seq_len"}


class Damaged(Exception):
    def __init__(self, file, why):
        super().__init__(f"{file}: {why}")


def checkpoints(run_dir):
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), os.path.join(root, d)) for d in os.listdir(root) if (m := STEP_DIR.match(d))]
    return [path for _, path in sorted(found)]


def step_of(folder):
    return int(STEP_DIR.match(os.path.basename(os.path.normpath(folder))).group(1))


def in_run_dir(folder, run_dir):
    """Whether a checkpoint folder is one of run_dir's own."""
    parent = os.path.dirname(os.path.normpath(folder))
    return os.path.realpath(parent) == os.path.realpath(os.path.join(run_dir, "checkpoints"))


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def folder_files(folder):
    out = []
    for dirpath, _, names in os.walk(folder):
        out += [os.path.relpath(os.path.join(dirpath, n), folder) for n in names]
    return sorted(f for f in out if f != MANIFEST)


def write_manifest(folder, step):
    files = {rel: {"size": os.path.getsize(os.path.join(folder, rel)), "sha256": sha256(os.path.join(folder, rel))}
             for rel in folder_files(folder)}
    with open(os.path.join(folder, MANIFEST), "w") as f:
        json.dump({"step": step, "files": files}, f, indent=1)


def verify(folder):
    """Raises Damaged(file, why); returns False when the folder has no manifest (an older version wrote it)."""
    m = STEP_DIR.match(os.path.basename(os.path.normpath(folder)))
    try:
        with open(os.path.join(folder, "trainer.json")) as f:
            step = int(json.load(f)["step"])
    except FileNotFoundError:
        raise Damaged("trainer.json", "missing") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise Damaged("trainer.json", f"unreadable ({e})") from None
    if m and step != int(m.group(1)):
        raise Damaged("trainer.json", f"says step {step} in folder {os.path.basename(os.path.normpath(folder))}")
    if not os.path.exists(os.path.join(folder, MANIFEST)):
        return False
    try:
        with open(os.path.join(folder, MANIFEST)) as f:
            manifest = json.load(f)
        files, manifest_step = manifest["files"], int(manifest["step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise Damaged(MANIFEST, f"unreadable ({e.__class__.__name__}: {e})") from None
    # every entry {"size": int, "sha256": str}: any other shape is damage or another version's format
    if not isinstance(files, dict) or not all(
            isinstance(info, dict) and isinstance(info.get("size"), int) and isinstance(info.get("sha256"), str)
            for info in files.values()):
        raise Damaged(MANIFEST, "not in this version's format (each file needs a size and a sha256)")
    if manifest_step != step:
        raise Damaged(MANIFEST, f"says step {manifest_step}, trainer.json says {step}")
    for rel in folder_files(folder):
        if rel not in files:
            raise Damaged(rel, "not in the manifest (added after the checkpoint was written)")
    for rel, info in files.items():
        path = os.path.join(folder, rel)
        if not os.path.exists(path):
            raise Damaged(rel, "missing")
        if os.path.getsize(path) != info["size"]:
            raise Damaged(rel, f"{os.path.getsize(path)} bytes, the manifest says {info['size']} (truncated or "
                               "overwritten)")
        if sha256(path) != info["sha256"]:
            raise Damaged(rel, "contents differ from the manifest's sha256 (corrupted)")
    return True


def _is_main():
    return int(os.environ.get("RANK", "0")) == 0


def _checked(folder):
    if not verify(folder) and _is_main():
        print(f"note: {folder} has no {MANIFEST} (written by an older version): its files are not checked for damage",
              flush=True)
    return folder


def set_aside_later(run_dir, step):
    """After a resume at `step`, the run directory's checkpoints past it (damaged ones --resume auto skipped)
    are renamed step_N.damaged: kept for a look, but out of the run's history, so keep-last-K never keeps
    them in place of the new ones and a later --resume auto never weighs them again. Rank 0 calls this."""
    moved = []
    for folder in checkpoints(run_dir):
        if step_of(folder) > step:
            aside, k = f"{folder}.damaged", 1
            while os.path.exists(aside):
                aside, k = f"{folder}.damaged.{k}", k + 1
            os.rename(folder, aside)
            moved.append(aside)
    return moved


def _newest_sound(found, where):
    """The newest checkpoint that verifies; a damaged one is skipped, saying so."""
    damaged = []
    for folder in reversed(found):
        try:
            _checked(folder)
        except Damaged as e:
            damaged.append((folder, e))
            continue
        for bad, e in damaged if _is_main() else []:
            print(f"warning: checkpoint {os.path.basename(bad)} is damaged ({e}); resuming from "
                  f"{os.path.basename(folder)}", flush=True)
        return folder
    if damaged:
        raise UsageError(f"every checkpoint in {where} is damaged (newest {damaged[0][0]}: {damaged[0][1]}): "
                         "start afresh with another --run_name")
    return None


def find_resume(resume, run_dir):
    """--resume auto -> newest sound checkpoint or None; a path -> that checkpoint, checked (damaged: error)."""
    if not resume:
        return None
    if resume == "auto":
        return _newest_sound(checkpoints(run_dir), run_dir)
    if any(os.path.exists(os.path.join(resume, f)) for f in ("trainer.json", MANIFEST)):
        try:
            return _checked(resume)
        except Damaged as e:
            raise UsageError(f"{resume} is not a complete checkpoint, it is damaged ({e}): resume from an earlier "
                             "checkpoints/step_N "
                             "folder, or with --resume auto") from None
    # a run directory, or its checkpoints/ folder: take the newest sound checkpoint in it
    found = checkpoints(resume) or checkpoints(os.path.dirname(os.path.abspath(resume)))
    if os.path.isdir(resume) and found:
        return _newest_sound(found, resume)
    if os.path.isdir(resume):
        return resume  # read_trainer_state names what is missing
    raise UsageError(f"--resume {resume}: no such checkpoint: give a checkpoints/step_N folder, a run directory, or "
                     "'auto'")


def read_trainer_state(path):
    try:
        with open(os.path.join(path, "trainer.json")) as f:
            state = json.load(f)
        state["step"] = int(state["step"])
        if not isinstance(state.get("model_config", {}), dict):
            raise TypeError("model_config is not an object")
        return state
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(f"{path} is not a complete checkpoint (trainer.json missing or corrupt): "
                         "resume from an earlier checkpoints/step_N folder, or start afresh") from None


def check_model(trainer_state, mcfg):
    """The checkpoint's model against this run's flags, before any state is built or loaded."""
    saved = trainer_state.get("model_config")
    if saved is None:
        return  # written by an older version: load_model names missing weights
    current = dataclasses.asdict(mcfg)
    differ = [f"{FLAGS.get(k, '--' + k)} {current[k]} (the checkpoint has {saved[k]})"
              for k in current if k in saved and saved[k] != current[k]]
    if differ:
        raise UsageError(f"the checkpoint's model differs from this run's: {', '.join(differ)}: resume with the "
                         "checkpoint's model flags (its trainer.json lists them)")


def _disk_full(e, folder):
    """torch.save and safetensors report a full disk in their own words ('unexpected pos', 'iostream
    error'): the free space left says it too."""
    text = str(e)
    if (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or "No space left" in text:
        return True
    try:
        return shutil.disk_usage(folder).free < 2**20
    except OSError:
        return False


def save(engine, run_dir, trainer_state, keep):
    """All ranks call this; rank 0 owns the folder. Returns the final path.

    A failed or interrupted save removes its .tmp folder; a full disk is one error line and the
    previous checkpoints stay."""
    world = engine.world
    root = os.path.join(run_dir, "checkpoints")
    final = os.path.join(root, f"step_{trainer_state['step']:08d}")
    tmp = final + ".tmp"

    def each(work):  # every rank hears of a failure on any rank; a full disk is the same line on all
        return world.together(lambda: _full_disk_said(work, run_dir, final))
    try:
        each(lambda: _start_folder(root, tmp) if world.is_main else None)
        each(lambda: engine.save(tmp))
        each(lambda: _finish_folder(tmp, trainer_state, engine.model.cfg) if world.is_main else None)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    each(lambda: _put_in_place(tmp, final, run_dir, keep) if world.is_main else None)
    return final


def _full_disk_said(work, run_dir, final):
    """work(), with a full disk turned into the line that says what is kept and what to do."""
    root = os.path.dirname(final)
    try:
        return work()
    except Exception as e:
        if not _disk_full(e, root):
            raise
        shutil.rmtree(final + ".tmp", ignore_errors=True)
        previous = checkpoints(run_dir)
        kept = f"the previous checkpoint {previous[-1]} is kept" if previous else "no earlier checkpoint exists"
        raise UsageError(f"the disk is full: could not write checkpoint {os.path.basename(final)} in {root} "
                         f"({e.__class__.__name__}); "
                         f"{kept}: free space (or lower --keep_checkpoints) and rerun with --resume auto") from None


def _start_folder(root, tmp):
    for stale in glob.glob(os.path.join(root, "step_*.tmp")):  # left by a kill during an earlier save
        shutil.rmtree(stale, ignore_errors=True)
    os.makedirs(tmp)


def _finish_folder(tmp, trainer_state, model_cfg):
    state = {**trainer_state, "model_config": dataclasses.asdict(model_cfg)}
    with open(os.path.join(tmp, "trainer.json"), "w") as f:
        json.dump(state, f)
    write_manifest(tmp, trainer_state["step"])  # last: a folder with a manifest is complete


def _put_in_place(tmp, final, run_dir, keep):
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    for old in checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def _write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def export(engine, run_dir, model_cfg, step=None, total_steps=None):
    """The run's final model.safetensors + model_config.json (all ranks call this; rank 0 writes). Written
    beside and renamed into place: a full disk leaves no half file, says so in one line and names the
    last checkpoint, which holds the same weights. The weights' metadata records the step they are from
    and the run's length, so a model of a stopped run is never taken for a finished one."""
    state = engine.full_state_dict()  # a collective under the sharded backends
    world = engine.world
    world.together(lambda: _write_model(state, run_dir, model_cfg, step, total_steps) if world.is_main else None)


def _write_model(state, run_dir, model_cfg, step, total_steps):
    meta = {"step": str(step), "total_steps": str(total_steps)} if step is not None else None
    files = {"model.safetensors": lambda f: save_file(state, f, metadata=meta),
             "model_config.json": lambda f: _write_json(f, dataclasses.asdict(model_cfg))}
    tmps = {name: os.path.join(run_dir, f".{name}.tmp") for name in files}
    try:
        for name, write in files.items():
            write(tmps[name])
        for name, tmp in tmps.items():
            os.replace(tmp, os.path.join(run_dir, name))
    except Exception as e:
        for tmp in tmps.values():
            if os.path.exists(tmp):
                os.remove(tmp)
        if not _disk_full(e, run_dir):
            raise
        last = checkpoints(run_dir)
        where = (f"the last checkpoint {last[-1]} holds the trained weights (its model.safetensors)" if last
                 else "no checkpoint holds the weights (--save was off or none was written)")
        raise UsageError(f"the disk is full: could not write the final model.safetensors in {run_dir} "
                         f"({e.__class__.__name__}); {where}: free space and copy it from there") from None


def restore(engine, path, trainer_state, backend):
    """Native state when the same backend and world size wrote it; otherwise the consolidated weights."""
    check_model(trainer_state, engine.model.cfg)
    same = trainer_state.get("backend") == backend and trainer_state.get("world_size") == engine.world.world_size
    if same:
        engine.load(path)
        return
    from mupgpt.safe_load import load_weights
    weights = os.path.join(path, "model.safetensors")
    if not os.path.exists(weights):
        raise UsageError(f"{path} has no model.safetensors: resume it with the backend and world size that wrote it")
    engine.load_model(load_weights(weights))
    continue_schedule(engine.scheduler, int(trainer_state["step"]))
    if engine.world.is_main:
        print(f"note: {path} was written by {trainer_state.get('backend')} on {trainer_state.get('world_size')} "
              "rank(s); "
              "loaded its weights, the optimizer state starts afresh and the LR schedule continues from step "
              f"{trainer_state['step']}", flush=True)


def continue_schedule(scheduler, step):
    """The LR schedule is a function of the step alone: a fresh optimizer's schedule is set to the
    checkpoint's step, so a resume on another backend or world size logs the LRs of a straight run."""
    import warnings
    scheduler.last_epoch = step - 1
    with warnings.catch_warnings():  # its 'scheduler stepped before the optimizer' warning: no optimizer step here
        warnings.simplefilter("ignore", UserWarning)
        scheduler.step()
