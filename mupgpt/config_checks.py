"""The checks that refuse bad training flags in one line, before any process group or file exists."""
import dataclasses
import math
import os

from mupgpt.errors import UsageError, did_you_mean

# transformers' get_scheduler types that run from the step count alone
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay")
MAX_SEQ_LEN = 1 << 20


def check_scheduler(name):
    if name in SCHEDULERS:
        return
    from transformers import SchedulerType
    known = [s.value for s in SchedulerType]
    if name in ("reduce_lr_on_plateau", "greedy"):
        raise UsageError(f"--lr_scheduler_type {name} steps on a validation metric, not on the step count: "
                         f"use one of {', '.join(SCHEDULERS)}")
    if name in known:
        raise UsageError(f"--lr_scheduler_type {name} is not supported by this trainer yet: "
                         f"use one of {', '.join(SCHEDULERS)}")
    raise UsageError(f"--lr_scheduler_type {name!r} is not a transformers scheduler{did_you_mean(name, SCHEDULERS)}: "
                     f"use one of {', '.join(SCHEDULERS)}")


def _host_memory():
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def model_params(n_layer, n_head, head_width, cfg):
    """About the parameters of a model of these dimensions (the blocks' matrices and the embeddings)."""
    width = n_head * head_width
    kv = (cfg.n_kv_head or n_head) * head_width if cfg.arch == "llama" else width
    hidden = cfg.mlp_hidden or (4 * width if cfg.arch == "gpt2" else 64 * math.ceil(8 * width / 3 / 64))
    mlp = (3 if cfg.arch == "llama" else 2) * width * hidden
    vocab = max(cfg.vocab_size, 256)
    return n_layer * (2 * width * width + 2 * width * kv + mlp) + 2 * vocab * width


def check_model_size(cfg, host):
    """A model whose fp32 weights alone exceed this machine's memory (the memory of all ranks under ZeRO-3,
    which partitions them as they are made) cannot be built: say which flag makes it so, before anything."""
    if not host:
        return
    ranks = int(os.environ.get("WORLD_SIZE", "1")) if cfg.backend == "deepspeed" and cfg.zero_stage == 3 else 1
    params = model_params(cfg.n_layer, cfg.n_head, cfg.head_width, cfg)
    if 4 * params <= host * ranks:
        return
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    dims = {"n_layer": cfg.n_layer, "n_head": cfg.n_head, "head_width": cfg.head_width}
    # the flag at fault: the one whose default value shrinks the model the most
    fault = min(dims, key=lambda k: model_params(**{**dims, k: min(dims[k], defaults[k])}, cfg=cfg))
    raise UsageError(f"--{fault} {dims[fault]} makes a model of {params / 1e9:,.1f}B parameters: its fp32 weights "
                     f"alone ({4 * params / 2**30:,.0f} GiB) exceed this machine's {host / 2**30:,.0f} GiB of memory: "
                     f"lower --{fault}")


def check_numbers(cfg):
    """Every numeric flag inside the range where it means something."""
    for name in ("head_width", "n_head", "n_layer", "base_head_width", "seq_len", "per_device_train_batch_size",
                 "log_interval", "eval_iters"):
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name} must be at least 1, not {getattr(cfg, name)}")
    for name in ("n_kv_head", "mlp_hidden", "base_n_layer", "vocab_size", "train_batch_size", "max_steps",
                 "num_warmup_steps", "eval_interval", "save_interval", "keep_checkpoints", "shard_group_size"):
        if getattr(cfg, name) < 0:
            raise UsageError(f"--{name} must be 0 or more, not {getattr(cfg, name)} (see --help for what 0 means)")
    if not 0 <= cfg.seed < 2 ** 63:
        raise UsageError(f"--seed must be between 0 and 2^63 - 1, not {cfg.seed}")
    if cfg.head_width % 2 or cfg.base_head_width % 2:
        raise UsageError(f"--head_width {cfg.head_width} and --base_head_width {cfg.base_head_width} must be even "
                         "(widths are n_head x head_width; use 2^k head widths for a muP sweep)")
    for name, low, high, rule in (("learning_rate", 0, None, "positive"), ("adam_eps", 0, None, "positive"),
                                  ("num_train_epochs", 0, None, "positive"),
                                  ("weight_decay", 0, None, "0 or more"), ("grad_clip", 0, None, "0 or more"),
                                  ("init_std", 0, None, "0 or more"), ("output_mult", 0, None, "0 or more"),
                                  ("attn_mult", 0, None, "0 or more"),
                                  ("adam_beta1", 0, 1, "in [0, 1)"), ("adam_beta2", 0, 1, "in [0, 1)"),
                                  ("muon_lr", 0, None, "positive"), ("muon_momentum", 0, 1, "in [0, 1)"),
                                  ("depth_alpha", None, None, "a finite number")):
        v = getattr(cfg, name)
        strict = rule == "positive"
        if (not math.isfinite(v) or (low is not None and (v < low or (strict and v == low)))
                or (high is not None and v >= high)):
            raise UsageError(f"--{name} must be {rule}, not {v}")
    if cfg.depth_alpha and not cfg.base_n_layer:
        raise UsageError("--depth_alpha needs --base_n_layer (the depth at which the depth scaling is 1)")


def check_choices(cfg):
    """The flags that name one of a few settings."""
    if cfg.zero_stage not in (0, 1, 2, 3):
        raise UsageError(f"--zero_stage must be 0, 1, 2 or 3, not {cfg.zero_stage}")
    if cfg.offload not in ("none", "cpu", "nvme"):
        raise UsageError(f"--offload must be none, cpu or nvme, not {cfg.offload!r}")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device must be cpu, cuda or auto, not {cfg.device!r}")
    check_scheduler(cfg.lr_scheduler_type)


def check_sizes(cfg):
    """A model or a sequence too large for this machine's memory, named by the flag that makes it so."""
    # gpt2's position table alone is seq_len x width floats, times 4 with its gradient and two Adam moments;
    # llama's rotary positions have no table
    width = cfg.n_head * cfg.head_width
    table_bytes = 16 * cfg.seq_len * width if cfg.arch == "gpt2" else 0
    host = _host_memory()
    check_model_size(cfg, host)  # first: a huge width is the width's fault, not the position table's
    if cfg.seq_len > MAX_SEQ_LEN or (host and table_bytes > host):
        what = (f"its position table and attention would not fit (the table alone needs {table_bytes / 2**30:.1f} GiB "
                "with its optimizer state)" if table_bytes else "its attention and activations would not fit")
        raise UsageError(f"--seq_len {cfg.seq_len} is too long: {what}; use at most {MAX_SEQ_LEN}")


def check_paths(cfg):
    """The folders and files the flags name are of the kind each flag needs."""
    for name in ("output_dir", "data_dir"):
        path = getattr(cfg, name)
        if os.path.exists(path) and not os.path.isdir(path):
            raise UsageError(f"--{name} {path} is a file, not a folder: give a folder (it is created if missing)")
    if cfg.nvme_path and not os.path.isdir(cfg.nvme_path):
        raise UsageError(f"--nvme_path {cfg.nvme_path}: NVMe offload needs an existing folder: create it, "
                         "or pass one on an NVMe drive")
    if cfg.resume not in ("", "auto") and os.path.isfile(cfg.resume):
        raise UsageError(f"--resume {cfg.resume} is a file: give a checkpoints/step_N folder, a run directory, "
                         "or 'auto'")
    if cfg.ds_config and not os.path.isfile(cfg.ds_config):
        what = "is a folder" if os.path.isdir(cfg.ds_config) else "no such file"
        raise UsageError(f"--ds_config {cfg.ds_config}: {what}: give a DeepSpeed JSON file (see ds_configs/)")


def check_shard_group(cfg, backend, world_size):
    """--shard_group_size once the backend and the number of ranks are known: groups that tile the ranks, on an
    engine that shards. Under DeepSpeed it is ZeRO++'s hierarchical partitioning (zero_hpz_partition_size), which
    is ZeRO-3's; MiCS (mics_shard_size) is gone from this DeepSpeed."""
    size = cfg.shard_group_size
    if not size:
        return
    if backend not in ("fsdp", "deepspeed"):
        raise UsageError(f"--shard_group_size {size} shards the model, which --backend {backend} does not: "
                         "use --backend fsdp, or deepspeed with --zero_stage 3 (or drop the flag)")
    if backend == "deepspeed" and not cfg.ds_config and cfg.zero_stage != 3:
        raise UsageError(f"--shard_group_size {size} under DeepSpeed is ZeRO-3's hierarchical partitioning: add "
                         "--zero_stage 3 (or use --backend fsdp)")
    if size > world_size or world_size % size:
        divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
        raise UsageError(f"--shard_group_size {size} does not split the {world_size} rank(s) into equal groups: use "
                         f"one of {', '.join(map(str, divisors))} (0 or {world_size}: one group of all ranks)")


def check_config(cfg):
    """Bad flags fail here, before any process group or file exists (parse_args and train call it)."""
    check_numbers(cfg)
    check_choices(cfg)
    check_sizes(cfg)
    check_paths(cfg)
