"""DeepSpeed's config for a run: the JSON template read and checked, the flags' values filled in.

The JSON in ds_configs/ (or --ds_config) says how to shard; the values the command line owns
(micro batch, global batch, accumulation, precision, clipping) are filled in from the flags, and a
config that sets them differently is refused. Sections DeepSpeed would act on silently are checked
against DeepSpeed's own names and models, so a typo or a removed key is one error line.
"""
import functools
import json
import os
import re
from pathlib import Path

from mupgpt.errors import UsageError, did_you_mean
from mupgpt.world import deepspeed_environment, resolve_device

CONFIG_DIR = Path(__file__).resolve().parents[2] / "ds_configs"


def template_path(cfg):
    if cfg.ds_config:  # config_checks.check_paths has checked that it is a file
        return cfg.ds_config
    if cfg.offload != "none":
        if cfg.zero_stage != 3:
            raise UsageError(f"--offload {cfg.offload} needs --zero_stage 3 (the shipped offload configs are ZeRO-3)")
        return str(CONFIG_DIR / f"zero3_offload_{cfg.offload}.json")
    return str(CONFIG_DIR / f"zero{cfg.zero_stage}.json")


def _set(node, key, value, source, flag):
    """Fill an 'auto' or absent value; refuse a different one (the flag owns it)."""
    current = node.get(key, "auto")
    if current != "auto" and current != value:
        raise UsageError(f"{source} sets {key}={current!r} but the flags give {value!r}: "
                         f"set it with {flag} or write \"auto\" in the config")
    node[key] = value


def bucket_elements(width):
    """DeepSpeed's reduce / all-gather bucket: about one layer, and at least 2^20 elements, so that a small
    model's parameters share collectives rather than each being its own (bench/RESULTS.md)."""
    return max(width * width, 2**20)


def read_template(path):
    try:
        config = json.load(open(path))
    except ValueError as e:
        raise UsageError(f"{path} is not valid JSON ({e}): fix it or use one from ds_configs/") from None
    if not isinstance(config, dict):
        raise UsageError(f"{path} holds a JSON {type(config).__name__}, not an object of DeepSpeed settings: "
                         "start from one in ds_configs/")
    check_keys(config, path)
    for key in ("optimizer", "scheduler"):
        if key in config:
            raise UsageError(f"{path} has an '{key}' section: remove it; the muP per-group optimizer and schedule "
                             "come from the trainer")
    return config


def fill_from_flags(config, cfg, precision, global_batch, accum, path):
    """The values the command line owns: batches, accumulation, clipping and precision."""
    micro = cfg.per_device_train_batch_size
    _set(config, "train_micro_batch_size_per_gpu", micro, path, "--per_device_train_batch_size")
    _set(config, "train_batch_size", global_batch, path, "--train_batch_size")
    _set(config, "gradient_accumulation_steps", accum, path, "--train_batch_size")
    _set(config, "gradient_clipping", cfg.grad_clip, path, "--grad_clip")
    if cfg.optimizer == "muon":  # Muon clips by the gradient's norm before DeepSpeed's step (deepspeed_muon.py)
        config["gradient_clipping"] = 0.0
        config["zero_allow_untested_optimizer"] = True  # MuonWithAdamW: torch's AdamW and Muon's step, elementwise
    for key, on in (("bf16", precision == "bf16"), ("fp16", precision == "fp16")):
        _set(config.setdefault(key, {}), "enabled", on, path, "--precision")
    if precision == "fp16":
        config["fp16"].setdefault("loss_scale", 0)  # 0 = dynamic loss scaling
        config["fp16"].setdefault("initial_scale_power", 16)


def fill_sizes(zero, width):
    """'auto' sizes from the model: buckets (bucket_elements). Small (norm/bias) parameters stay resident
    only without leaf modules: ZeRO-3 all-gathers each resident parameter on its own after every optimizer
    step, while a leaf block's small parameters come in the block's one coalesced gather."""
    bucket = bucket_elements(width)
    auto_sizes = {"reduce_bucket_size": bucket, "allgather_bucket_size": bucket,
                  "stage3_prefetch_bucket_size": int(0.9 * bucket),
                  "stage3_param_persistence_threshold": 0 if "leaf_module" in zero else 10 * width}
    for key, value in auto_sizes.items():
        if zero.get(key) == "auto":
            zero[key] = value


def fill_shard_group(zero, size, world_size, path):
    """--shard_group_size as ZeRO++'s hierarchical partitioning (hpZ): besides the ZeRO-3 partition over every
    rank, each group of `size` consecutive ranks keeps a second partition of the parameters, so the backward
    pass gathers them inside a node. Gradients and optimizer states stay partitioned over every rank: unlike
    FSDP2's hybrid sharding the forward gather and the gradient reduce-scatter still span all ranks."""
    if not size or size >= world_size:
        return
    if zero.get("stage") != 3:
        raise UsageError(f"--shard_group_size {size} under DeepSpeed is ZeRO-3's hierarchical partitioning, but "
                         f"{path} is stage {zero.get('stage')}: use a stage 3 config (or --backend fsdp)")
    _set(zero, "zero_hpz_partition_size", size, path, "--shard_group_size")


def offloads(zero):
    return any(zero.get(p, {}).get("device", "none") != "none" for p in ("offload_param", "offload_optimizer"))


def check_offload(config, zero, cfg, path):
    """Offload devices this machine has; an NVMe folder that exists (asked of the user before libaio)."""
    for part in ("offload_param", "offload_optimizer"):
        device = zero.get(part, {}).get("device", "none")
        if device == "nvme":
            nvme = zero[part].get("nvme_path", "auto")
            nvme = cfg.nvme_path if nvme == "auto" else nvme
            if not nvme or not os.path.isdir(nvme):
                raise UsageError(f"NVMe offload needs an existing folder: pass --nvme_path DIR (got {nvme!r})")
            check_aio()
            zero[part]["nvme_path"] = nvme
        elif device not in ("none", "cpu"):
            raise UsageError(f"{part}.device {device!r} is not available here: use cpu or nvme (or none)")
    if offloads(zero):
        config["zero_force_ds_cpu_optimizer"] = False
        if zero.get("stage") != 3 and "offload_param" in zero:
            raise UsageError(f"{path}: offload_param needs zero_optimization.stage 3")


def ds_config(cfg, precision, global_batch, accum, width):
    """The effective DeepSpeed config for this run (also written to the run directory)."""
    deepspeed_environment(resolve_device(cfg))  # checking the config imports DeepSpeed
    path = template_path(cfg)
    config = read_template(path)
    fill_from_flags(config, cfg, precision, global_batch, accum, path)
    zero = config.setdefault("zero_optimization", {"stage": cfg.zero_stage})
    for part in ("offload_param", "offload_optimizer"):
        if not isinstance(zero.get(part, {}), dict):
            raise UsageError(f"{path}: zero_optimization.{part} must be an object like {{\"device\": \"cpu\"}}")
    if zero.get("stage") not in (0, 1, 2, 3):
        raise UsageError(f"{path}: zero_optimization.stage must be 0, 1, 2 or 3, not {zero.get('stage')!r}")
    if zero["stage"] == 0 and precision != "fp32":  # DeepSpeed's stage-0 half-precision optimizer drifts from fp32
        raise UsageError("ZeRO stage 0 runs fp32 only here: use --zero_stage 1 (same memory, fp32 master weights) "
                         "or --backend ddp for mixed precision")
    fill_sizes(zero, width)
    fill_shard_group(zero, cfg.shard_group_size, int(os.environ.get("WORLD_SIZE", "1")), path)
    if cfg.compile:
        deepcompile(config, zero, path, resolve_device(cfg), cfg.gradient_checkpointing)
    check_offload(config, zero, cfg, path)
    if zero["stage"] == 3 and "leaf_module" not in zero and os.environ.get("RANK", "0") == "0":
        print(f"note: {path} has no zero_optimization.leaf_module; the shipped ZeRO-3 configs set "
              '{"classes": ["mup_model.Block"]} (a block\'s parameters gathered and its gradients reduced at once)',
              flush=True)
    leftover = [k for k, v in zero.items() if v == "auto"]
    if leftover:
        raise UsageError(f"{path}: no value for {leftover} ('auto' is only filled for the keys in ds_configs/)")
    check_zero(zero, path)
    return config


def deepcompile(config, zero, path, device_type, checkpointing):
    """--compile under DeepSpeed is DeepCompile under ZeRO-3 on a GPU and nothing else: DeepCompile is what
    makes ZeRO-3 faster, torch.compile under ZeRO-0/1/2 gains nothing, and plain torch.compile under
    ZeRO-3 is slower than eager because DeepSpeed's parameter hooks break its graph (bench/RESULTS.md)."""
    if zero["stage"] != 3:
        raise UsageError("--compile under ZeRO-0/1/2 is no faster than without it: drop --compile, or use "
                         "--zero_stage 3 on a GPU (DeepCompile)")
    if device_type != "cuda":
        raise UsageError("--compile under ZeRO-3 runs DeepSpeed's DeepCompile, whose op needs a CUDA GPU: "
                         "drop --compile here")
    if checkpointing or offloads(zero):
        raise UsageError("--compile under ZeRO-3 (DeepCompile) does not go with --offload or "
                         "--gradient_checkpointing here: drop --compile or the other flag")
    node = config.setdefault("compile", {})
    if not isinstance(node, dict) or node.get("deepcompile", True) is not True:
        raise UsageError(f"{path}: compile.deepcompile must be true (or absent) with --compile under ZeRO-3: plain "
                         "torch.compile under ZeRO-3 is slower than without it")
    node["deepcompile"] = True


@functools.lru_cache(maxsize=1)
def deepspeed_keys():
    """Every top-level key DeepSpeed's config code reads: DeepSpeed names them in module constants
    (TRAIN_BATCH_SIZE = "train_batch_size"), in literal lookups (param_dict.get("compile", ...)), and
    in the monitor's pydantic model. A superset: only a key found nowhere is refused."""
    import deepspeed
    from deepspeed.monitor.config import DeepSpeedMonitorConfig
    const = re.compile(r"""^[A-Z][A-Z0-9_]*\s*=\s*['"]([a-z][a-z0-9_]*)['"]""", re.M)
    lookup = re.compile(r"""param_dict(?:\.get\(|\[)\s*['"]([a-z][a-z0-9_]*)['"]"""
                        r"""|['"]([a-z][a-z0-9_]*)['"] in param_dict\b""")
    keys = set(DeepSpeedMonitorConfig.model_fields)
    for source in Path(deepspeed.__file__).parent.rglob("*.py"):
        text = source.read_text(errors="ignore")
        keys.update(const.findall(text))
        keys.update(a or b for a, b in lookup.findall(text))
    return keys


# top-level keys of ds_configs/ and those this module fills in
SHIPPED_KEYS = {"train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps",
                "gradient_clipping", "bf16", "fp16", "zero_optimization", "zero_force_ds_cpu_optimizer",
                "steps_per_print", "wall_clock_breakdown", "aio", "timers", "compile"}


def check_keys(config, path):
    """Unknown or removed top-level keys fail here (DeepSpeed ignores unknown ones silently)."""
    from deepspeed.runtime import config as ds
    removed = getattr(ds, "_REMOVED_TOP_LEVEL_CONFIG_KEYS", {})
    for key in config:
        if key in removed:
            raise UsageError(f"{path}: '{key}' is not supported by this DeepSpeed: {removed[key].split('. ')[0]}; "
                             "remove it")
        # deepspeed_keys() reads DeepSpeed's sources: only for keys the shipped configs do not have
        if key not in SHIPPED_KEYS and key not in deepspeed_keys():
            raise UsageError(f"{path}: unknown DeepSpeed setting '{key}'{did_you_mean(key, sorted(deepspeed_keys()))}")
    for key in ("zero_optimization", "bf16", "fp16"):
        if not isinstance(config.get(key, {}), dict):
            raise UsageError(f"{path}: '{key}' must be an object, like {{\"enabled\": \"auto\"}} or {{\"stage\": 2}}")


def check_zero(zero, path):
    """zero_optimization against DeepSpeed's own model, as one line (DeepSpeed prints a pydantic trace)."""
    import pydantic
    from deepspeed.runtime import config as ds
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from deepspeed.runtime.zero.offload_config import (
        DeepSpeedZeroOffloadOptimizerConfig,
        DeepSpeedZeroOffloadParamConfig,
    )
    try:
        getattr(ds, "_reject_removed_config_keys", lambda d: None)({"zero_optimization": zero})
        DeepSpeedZeroConfig(**zero)
    except ds.DeepSpeedConfigError as e:
        raise UsageError(f"{path}: {str(e).split('. ')[0]}: remove it") from None
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        where = ".".join(map(str, ("zero_optimization", *err["loc"])))
        if err["type"] == "extra_forbidden":
            model = {"offload_param": DeepSpeedZeroOffloadParamConfig,
                     "offload_optimizer": DeepSpeedZeroOffloadOptimizerConfig}.get(err["loc"][0], DeepSpeedZeroConfig)
            names = [f.alias or n for n, f in model.model_fields.items()] + list(model.model_fields)
            raise UsageError(f"{path}: unknown key {where}{did_you_mean(str(err['loc'][-1]), names)}") from None
        raise UsageError(f"{path}: {where}: {err['msg']} (got {err.get('input')!r})") from None


def check_aio():
    from deepspeed.ops.op_builder import AsyncIOBuilder
    if not AsyncIOBuilder().is_compatible(verbose=False):
        raise UsageError("NVMe offload needs libaio, which was not found: apt-get install libaio-dev "
                         "(or set CFLAGS/LDFLAGS to where it is), or use --offload cpu")
