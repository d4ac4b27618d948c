"""The trainer's typed config and its command line (flag names follow the seed's run_trainer.py)."""
import argparse
import dataclasses
import json
import math
import os
import re
import tomllib
from dataclasses import dataclass, field

from mupgpt.errors import UsageError, did_you_mean

# transformers' get_scheduler types that run from the step count alone
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt",
              "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay")
MAX_SEQ_LEN = 1 << 20


def tokenizer_names():
    """bytes and every encoding tiktoken has here (its own and any tiktoken_ext plugin's); no download."""
    import tiktoken
    return ["bytes", *tiktoken.list_encoding_names()]


def _f(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # model
    arch: str = _f("gpt2", "gpt2 (LayerNorm, GELU MLP, learned positions, biases) or llama (RMSNorm, SwiGLU, rotary "
                   "positions, grouped-query attention, no biases); both under the same muP rules", choices=["gpt2", "llama"])
    head_width: int = _f(32, "width of each attention head; model width = n_head * head_width", aliases=["--width"])
    n_head: int = _f(4, "attention heads")
    n_layer: int = _f(2, "transformer blocks")
    n_kv_head: int = _f(0, "llama: key/value heads, dividing --n_head (grouped-query attention; 0: n_head)")
    mlp_hidden: int = _f(0, "MLP hidden size (0: 4 x width for gpt2, 8/3 x width rounded up to a multiple of 64 for llama)")
    parametrization: str = _f("mup", "mup or sp (standard parametrization, for comparison)", choices=["mup", "sp"])
    base_head_width: int = _f(32, "the base model's head width: muP's attention scale is sqrt(this) / head_width "
                              "(with --base_width 0 the base width is n_head x this)")
    base_width: int = _f(0, "the base model's width, where muP and SP coincide: m = n_head x head_width / this, however "
                         "the model was widened (0: n_head x base_head_width)")
    base_n_layer: int = _f(0, "depth at which depth scaling is 1 (0: no depth scaling)")
    depth_alpha: float = _f(0.0, "residual branches scaled by (n_layer/base_n_layer)^-alpha: 1 CompleteP, 0.5 depth-muP")
    output_mult: float = _f(1.0, "logit multiplier (divided by m under muP)")
    attn_mult: float = _f(0.0, "attention multiplier on q.k/d_head under muP (0: sqrt(base_head_width))")
    init_std: float = _f(0.02, "std of the token and position embeddings")
    readout_zero_init: bool = _f(True, "start the readout at zero (both parametrizations)")
    query_zero_init: bool = _f(True, "start the query projection at zero (microsoft/mup's advice: the attention "
                                "logits start at 0 at every width instead of shrinking like head_width^-1/2)")
    seq_len: int = _f(128, "tokens per training sequence (also the model's context length)")
    vocab_size: int = _f(0, "model vocabulary, padded to a multiple of 64 (0: the tokenizer's); a larger one keeps "
                         "unused rows, e.g. 50304 to benchmark GPT-2's shape on byte tokens")
    # optimisation
    learning_rate: float = _f(3e-3, "base AdamW learning rate (muP scales hidden layers by 1/m)", aliases=["--lr"])
    weight_decay: float = _f(0.0, "AdamW weight decay; kept width-independent per step (see mup_model.py)")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.95, "AdamW beta2")
    adam_eps: float = _f(1e-8, "AdamW epsilon")
    optimizer: str = _f("adamw", "adamw, or muon: Muon for the hidden matrices, AdamW (the flags above) for "
                        "embeddings, vectors and the readout", choices=["adamw", "muon"])
    muon_lr: float = _f(0.02, "--optimizer muon: base Muon learning rate of the hidden matrices (times --muon_scale's factor)")
    muon_scale: str = _f("mup", "--optimizer muon: the update's scale per matrix: mup sqrt(fan_out/fan_in), moonlight "
                         "0.2 sqrt(max(fan_out, fan_in)) (AdamW's RMS), none (see mup_model.py)",
                         choices=["mup", "moonlight", "none"])
    muon_momentum: float = _f(0.95, "--optimizer muon: Muon's (Nesterov) momentum")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0: off)")
    lr_scheduler_type: str = _f("cosine", "a transformers get_scheduler type: " + ", ".join(SCHEDULERS))
    num_warmup_steps: int = _f(0, "linear warm-up steps")
    num_decay_steps: int = _f(0, "warmup_stable_decay: steps of the final decay (0: the last 20%% of the steps)")
    decay_type: str = _f("1-sqrt", "warmup_stable_decay: shape of the final decay", choices=["1-sqrt", "linear", "cosine"])
    min_lr_ratio: float = _f(0.0, "cosine_with_min_lr, cosine_warmup_with_min_lr, warmup_stable_decay: the LR floor "
                             "as a fraction of each group's LR")
    per_device_train_batch_size: int = _f(8, "sequences per micro batch on each rank")
    train_batch_size: int = _f(0, "global sequences per optimizer step (0: micro batch * world size); sets accumulation")
    num_train_epochs: float = _f(1.0, "epochs over the training tokens, used when --max_steps is 0")
    max_steps: int = _f(0, "optimizer steps (0: from --num_train_epochs)")
    seed: int = _f(1234, "seed for init and batches")
    # data
    dataset: str = _f("stdlib", "'stdlib' (this Python's standard-library sources, no download), a hub dataset "
                      "(wikitext-103, openwebtext, fineweb-edu, or any name/config), or a path to .txt/.jsonl/.parquet files or a folder")
    data_dir: str = _f("data", "where prepared token files live (one subfolder per dataset and tokenizer)")
    tokenizer: str = _f("auto", "bytes (no download), gpt2 or any other tiktoken encoding (cl100k_base, o200k_base, ...: "
                        "downloaded once, or from TIKTOKEN_CACHE_DIR), or auto: gpt2 when its files can be had, else bytes",
                        choices=["auto", *tokenizer_names()])
    # systems
    backend: str = _f("auto", "single, ddp, fsdp or deepspeed; auto: deepspeed under the deepspeed launcher, ddp under torchrun, else single",
                      choices=["auto", "single", "ddp", "fsdp", "deepspeed"])
    precision: str = _f("auto", "bf16, fp16 or fp32; auto: bf16 on GPUs that have it and under DeepSpeed, else fp32",
                        choices=["auto", "bf16", "fp16", "fp32"])
    zero_stage: int = _f(3, "DeepSpeed ZeRO stage 0-3")
    offload: str = _f("none", "DeepSpeed offload of parameters and optimizer: none, cpu or nvme")
    nvme_path: str = _f("", "folder for --offload nvme")
    ds_config: str = _f("", "a DeepSpeed JSON config of your own (the batch, precision and clipping flags are filled in)")
    gradient_checkpointing: bool = _f(False, "recompute block activations in the backward pass to save memory")
    compile: bool = _f(False, "torch.compile the model (DeepSpeed: DeepCompile under ZeRO-3 on a GPU; refused under ZeRO-0/1/2)")
    device: str = _f("auto", "cpu, cuda or auto", choices=["auto", "cpu", "cuda"])
    # outputs
    output_dir: str = _f("runs", "parent folder of run directories")
    run_name: str = _f("", "run directory name (default: from parametrization, n_head x head_width, depth, lr, seed, "
                       "backend and steps, e.g. mup_4x32_d2_lr0.003_s1234_single_1000steps)")
    log_interval: int = _f(10, "steps between log lines (the loss is only read back from the device on these)")
    eval_interval: int = _f(100, "steps between validation evaluations (0: only at the end)")
    eval_iters: int = _f(10, "validation batches per evaluation")
    save: bool = _f(True, "write checkpoints and the final model export (false: throughput benchmarks)")
    save_interval: int = _f(0, "steps between checkpoints (0: only at the end and on SIGTERM/Ctrl-C)")
    keep_checkpoints: int = _f(2, "how many recent checkpoints to keep (0: keep all)")
    resume: str = _f("", "'auto' (the run directory's latest checkpoint, if any) or a checkpoint path")
    wandb: bool = _f(False, "log to Weights & Biases (offline when no API key is set; never prompts)")
    debug: bool = _f(False, "verbose logging, anomaly detection")
    print_profile_results: bool = _f(False, "profile a few steps with torch.profiler and print the table")
    local_rank: int = _f(-1, "set by the deepspeed launcher")

    def run_dir_name(self, backend):
        """--run_name, or one from what tells runs apart: model, LR, seed, engine and length, so the README's
        runs (and a rerun on another backend or for more steps) never land in one another's directory."""
        if self.run_name:
            return self.run_name
        engine = backend
        if backend == "deepspeed" and not self.ds_config:
            engine = f"zero{self.zero_stage}" + ("" if self.offload == "none" else f"-{self.offload}")
        length = f"{self.max_steps}steps" if self.max_steps else f"{self.num_train_epochs:g}epochs"
        arch = "" if self.arch == "gpt2" else f"{self.arch}_"
        if self.optimizer == "muon":
            arch += f"muon-{self.muon_scale}_mlr{self.muon_lr:g}_"
        return (f"{arch}{self.parametrization}_{self.n_head}x{self.head_width}_d{self.n_layer}_lr{self.learning_rate:g}"
                f"_s{self.seed}_{engine}_{length}")


def _bool(s):
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {s!r}")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends '(default: X)' only where the help does not say it and there is a default to show."""

    def _get_help_string(self, action):
        if action.default in ("", None) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's own default prints usage first)
        raise UsageError(f"{message} (see --help)")


def build_parser():
    p = _Parser(description="Train a muP GPT (single process, DDP, FSDP2 or DeepSpeed).",
                formatter_class=_HelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        names = [f"--{f.name}"] + f.metadata.get("aliases", [])
        if f.name == "local_rank":
            names.append("--local-rank")
        kw = dict(default=f.default, help=f.metadata["help"], dest=f.name)
        if f.type is bool or f.type == "bool":
            kw.update(type=_bool, nargs="?", const=True, metavar="BOOL")
        else:
            kw["type"] = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            if "choices" in f.metadata:
                kw["choices"] = f.metadata["choices"]
        p.add_argument(*names, **kw)
    p.add_argument("--num_gpus", type=int, default=None, help=argparse.SUPPRESS)  # tolerated, set by some launch scripts
    p.add_argument("--config", default="", help="a TOML or JSON file whose keys are these flags' names (tables may "
                   "group them); flags given here override it")
    return p


def parse_args(argv=None):
    parser = build_parser()
    pre = _Parser(add_help=False)
    pre.add_argument("--config", default="")
    path = pre.parse_known_args(argv)[0].config
    if path:
        parser.set_defaults(**read_config_file(path, parser))
    args = vars(parser.parse_args(argv))
    args.pop("num_gpus")
    args.pop("config")
    cfg = TrainConfig(**args)
    check_config(cfg)
    return cfg


_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


class _RepeatedKey(Exception):
    pass


def _no_repeated_keys(pairs):
    """json's object hook: a key given twice in one object is refused, as TOML does."""
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise _RepeatedKey(key)
        seen.add(key)
    return dict(pairs)


def _load_config_text(path):
    """The file's text and its parsed table (one line per way a file can be wrong)."""
    if not os.path.isfile(path):
        raise UsageError(f"--config {path}: {'is a folder' if os.path.isdir(path) else 'no such file'}: "
                         "give a .toml or .json file")
    kind = os.path.splitext(path)[1].lower()
    if kind not in (".toml", ".json"):
        raise UsageError(f"--config {path}: name it .toml or .json (the suffix picks the format)")
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--config {path} is unreadable ({type(e).__name__}): give a UTF-8 .toml or .json file") from None
    try:
        data = tomllib.loads(text) if kind == ".toml" else json.loads(text, object_pairs_hook=_no_repeated_keys)
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path} is not valid TOML: {e}") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
    except _RepeatedKey as e:
        key = e.args[0]
        at = [n for n, line in enumerate(text.splitlines(), 1) if re.search(rf'"{re.escape(key)}"\s*:', line)]
        where = f" (lines {', '.join(map(str, at))})" if len(at) > 1 else ""
        raise UsageError(f"{path}: key {key!r} is given twice{where}: keep one") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path} holds a JSON {type(data).__name__}, not an object of flag names and values")
    return kind, text, data


def _flatten(table, prefix=""):
    """(dotted name, key, value) for every value; tables only group keys."""
    for key, value in table.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield prefix + key, key, value


def _checked_value(action, full, value, where):
    """The value for a flag, or one line saying what kind or choice it must be."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    want = fields[action.dest].type if action.dest in fields else "int"
    want = {"bool": bool, "int": int, "float": float, "str": str}.get(want, want)
    ok = (isinstance(value, bool) if want is bool else
          isinstance(value, want) and not isinstance(value, bool) or
          want is float and isinstance(value, int) and not isinstance(value, bool))
    if not ok:
        raise UsageError(f"{where}: {full} must be {_KINDS[want]}, not {value!r}")
    if action.choices is not None and value not in action.choices:
        raise UsageError(f"{where}: {full} must be one of {', '.join(map(str, action.choices))}, not {value!r}"
                         f"{did_you_mean(str(value), [str(c) for c in action.choices])}")
    return float(value) if want is float else value


def read_config_file(path, parser=None):
    """A TOML (.toml) or JSON (.json) file of flag values -> {dest: value}. Keys are the flag names without
    dashes (aliases such as lr and width too); tables only group keys and their names are ignored."""
    kind, text, data = _load_config_text(path)
    parser = parser or build_parser()
    dests = {}  # a key as written in the file ('lr', 'learning_rate') -> the flag it sets
    for a in parser._actions:
        if a.dest not in ("help", "config", "num_gpus"):
            for opt in a.option_strings:
                dests[opt.lstrip("-")] = a

    def where(key):
        pattern = rf'^\s*"?{re.escape(key)}"?\s*=' if kind == ".toml" else rf'"{re.escape(key)}"\s*:'
        n = next((n for n, line in enumerate(text.splitlines(), 1) if re.search(pattern, line)), None)
        return f"{path} line {n}" if n else path

    out, seen = {}, {}
    for full, key, value in _flatten(data):
        action = dests.get(key)
        if action is None:
            raise UsageError(f"{where(key)}: unknown key {full!r}{did_you_mean(key, sorted(dests))}: "
                             "keys are the trainer's flag names (see --help)")
        if action.dest in seen:
            raise UsageError(f"{where(key)}: {full!r} sets {action.dest} again (also set by {seen[action.dest]!r}): "
                             "keep one")
        seen[action.dest] = full
        out[action.dest] = _checked_value(action, full, value, where(key))
    return out


def check_scheduler(name):
    if name in SCHEDULERS:
        return
    from transformers import SchedulerType
    known = [s.value for s in SchedulerType]
    if name in ("reduce_lr_on_plateau", "greedy"):
        raise UsageError(f"--lr_scheduler_type {name} steps on a validation metric, not on the step count: "
                         f"use one of {', '.join(SCHEDULERS)}")
    if name in known:
        raise UsageError(f"--lr_scheduler_type {name} is not supported by this trainer yet: use one of {', '.join(SCHEDULERS)}")
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
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    dims = {"n_layer": cfg.n_layer, "n_head": cfg.n_head, "head_width": cfg.head_width}
    # the flag at fault: the one whose default value shrinks the model the most
    fault = min(dims, key=lambda k: model_params(**{**dims, k: min(dims[k], defaults[k])}, cfg=cfg))
    raise UsageError(f"--{fault} {dims[fault]} makes a model of {params / 1e9:,.1f}B parameters: its fp32 weights alone "
                     f"({4 * params / 2**30:,.0f} GiB) exceed this machine's {host / 2**30:,.0f} GiB of memory: "
                     f"lower --{fault}")


def check_config(cfg):
    """Bad flags fail here, before any process group or file exists (parse_args and train call it)."""
    for name in ("head_width", "n_head", "n_layer", "base_head_width", "seq_len", "per_device_train_batch_size",
                 "log_interval", "eval_iters"):
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name} must be at least 1, not {getattr(cfg, name)}")
    for name in ("n_kv_head", "mlp_hidden", "base_n_layer", "vocab_size", "train_batch_size", "max_steps", "num_warmup_steps", "eval_interval",
                 "save_interval", "keep_checkpoints"):
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
    if cfg.zero_stage not in (0, 1, 2, 3):
        raise UsageError(f"--zero_stage must be 0, 1, 2 or 3, not {cfg.zero_stage}")
    if cfg.offload not in ("none", "cpu", "nvme"):
        raise UsageError(f"--offload must be none, cpu or nvme, not {cfg.offload!r}")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device must be cpu, cuda or auto, not {cfg.device!r}")
    check_scheduler(cfg.lr_scheduler_type)
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
    for name in ("output_dir", "data_dir"):
        path = getattr(cfg, name)
        if os.path.exists(path) and not os.path.isdir(path):
            raise UsageError(f"--{name} {path} is a file, not a folder: give a folder (it is created if missing)")
    if cfg.nvme_path and not os.path.isdir(cfg.nvme_path):
        raise UsageError(f"--nvme_path {cfg.nvme_path}: NVMe offload needs an existing folder: create it, "
                         "or pass one on an NVMe drive")
    if cfg.resume not in ("", "auto") and os.path.isfile(cfg.resume):
        raise UsageError(f"--resume {cfg.resume} is a file: give a checkpoints/step_N folder, a run directory, or 'auto'")
    if cfg.ds_config and not os.path.isfile(cfg.ds_config):
        what = "is a folder" if os.path.isdir(cfg.ds_config) else "no such file"
        raise UsageError(f"--ds_config {cfg.ds_config}: {what}: give a DeepSpeed JSON file (see ds_configs/)")
