"""The trainer's typed config, TrainConfig, and its command line: one flag per field, checked as parsed."""
import argparse
import dataclasses
from dataclasses import dataclass, field

from mupgpt.config_checks import SCHEDULERS, check_config
from mupgpt.config_file import read_config_file
from mupgpt.errors import ArgumentParser


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
                   "positions, grouped-query attention, no biases); both under the same muP rules",
                   choices=["gpt2", "llama"])
    head_width: int = _f(32, "width of each attention head; model width = n_head * head_width", aliases=["--width"])
    n_head: int = _f(4, "attention heads")
    n_layer: int = _f(2, "transformer blocks")
    n_kv_head: int = _f(0, "llama: key/value heads, dividing --n_head (grouped-query attention; 0: n_head)")
    mlp_hidden: int = _f(0, "MLP hidden size (0: 4 x width for gpt2, 8/3 x width rounded up to a multiple of 64 "
                         "for llama)")
    parametrization: str = _f("mup", "mup or sp (standard parametrization, for comparison)", choices=["mup", "sp"])
    base_head_width: int = _f(32, "the base model's head width: muP's attention scale is sqrt(this) / head_width "
                              "(with --base_width 0 the base width is n_head x this)")
    base_width: int = _f(0, "the base model's width, where muP and SP coincide: m = n_head x head_width / this, "
                         "however the model was widened (0: n_head x base_head_width)")
    base_n_layer: int = _f(0, "depth at which depth scaling is 1 (0: no depth scaling)")
    depth_alpha: float = _f(0.0, "residual branches scaled by (n_layer/base_n_layer)^-alpha: 1 CompleteP, "
                            "0.5 depth-muP")
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
    muon_lr: float = _f(0.02, "--optimizer muon: base Muon learning rate of the hidden matrices "
                        "(times --muon_scale's factor)")
    muon_scale: str = _f("mup", "--optimizer muon: the update's scale per matrix: mup sqrt(fan_out/fan_in), moonlight "
                         "0.2 sqrt(max(fan_out, fan_in)) (AdamW's RMS), none (see mup_model.py)",
                         choices=["mup", "moonlight", "none"])
    muon_momentum: float = _f(0.95, "--optimizer muon: Muon's (Nesterov) momentum")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0: off)")
    lr_scheduler_type: str = _f("cosine", "a transformers get_scheduler type: " + ", ".join(SCHEDULERS))
    num_warmup_steps: int = _f(0, "linear warm-up steps")
    num_decay_steps: int = _f(0, "warmup_stable_decay: steps of the final decay (0: the last 20%% of the steps)")
    decay_type: str = _f("1-sqrt", "warmup_stable_decay: shape of the final decay",
                         choices=["1-sqrt", "linear", "cosine"])
    min_lr_ratio: float = _f(0.0, "cosine_with_min_lr, cosine_warmup_with_min_lr, warmup_stable_decay: the LR floor "
                             "as a fraction of each group's LR")
    per_device_train_batch_size: int = _f(8, "sequences per micro batch on each rank")
    train_batch_size: int = _f(0, "global sequences per optimizer step (0: micro batch * world size); "
                               "sets accumulation")
    num_train_epochs: float = _f(1.0, "epochs over the training tokens, used when --max_steps is 0")
    max_steps: int = _f(0, "optimizer steps (0: from --num_train_epochs)")
    seed: int = _f(1234, "seed for init and batches")
    # data
    dataset: str = _f("stdlib", "'stdlib' (this Python's standard-library sources, no download), a hub dataset "
                      "(wikitext-103, openwebtext, fineweb-edu, or any name/config), or a path to "
                      ".txt/.jsonl/.parquet files or a folder")
    data_dir: str = _f("data", "where prepared token files live (one subfolder per dataset and tokenizer)")
    tokenizer: str = _f("auto", "bytes (no download), gpt2 or any other tiktoken encoding (cl100k_base, o200k_base, "
                        "...: downloaded once, or from TIKTOKEN_CACHE_DIR), or auto: gpt2 when its files can be had, "
                        "else bytes",
                        choices=["auto", *tokenizer_names()])
    # systems
    backend: str = _f("auto", "single, ddp, fsdp or deepspeed; auto: deepspeed under the deepspeed launcher, ddp "
                      "under torchrun, else single",
                      choices=["auto", "single", "ddp", "fsdp", "deepspeed"])
    precision: str = _f("auto", "bf16, fp16 or fp32; auto: bf16 on GPUs that have it and under DeepSpeed, else fp32",
                        choices=["auto", "bf16", "fp16", "fp32"])
    zero_stage: int = _f(3, "DeepSpeed ZeRO stage 0-3")
    offload: str = _f("none", "DeepSpeed offload of parameters and optimizer: none, cpu or nvme")
    nvme_path: str = _f("", "folder for --offload nvme")
    ds_config: str = _f("", "a DeepSpeed JSON config of your own (the batch, precision and clipping flags are "
                        "filled in)")
    shard_group_size: int = _f(0, "shard within groups of this many consecutive ranks (a node's GPUs) and replicate "
                               "across the groups: FSDP2's hybrid sharding, or ZeRO-3's hierarchical partitioning "
                               "(hpZ) under deepspeed; it divides the number of ranks (0: one group of all ranks)")
    gradient_checkpointing: bool = _f(False, "recompute block activations in the backward pass to save memory")
    compile: bool = _f(False, "torch.compile the model (DeepSpeed: DeepCompile under ZeRO-3 on a GPU; refused under "
                       "ZeRO-0/1/2)")
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


def field_type(f):
    """A TrainConfig field's Python type (bool, int, float or str)."""
    return {"bool": bool, "int": int, "float": float, "str": str}.get(f.type, f.type)


def build_parser():
    p = ArgumentParser(description="Train a muP GPT (single process, DDP, FSDP2 or DeepSpeed).",
                       formatter_class=_HelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        names = [f"--{f.name}"] + f.metadata.get("aliases", [])
        if f.name == "local_rank":
            names.append("--local-rank")
        kw = dict(default=f.default, help=f.metadata["help"], dest=f.name)
        if field_type(f) is bool:
            kw.update(type=_bool, nargs="?", const=True, metavar="BOOL")
        else:
            kw["type"] = field_type(f)
            if "choices" in f.metadata:
                kw["choices"] = f.metadata["choices"]
        p.add_argument(*names, **kw)
    # set by some launch scripts: accepted and ignored
    p.add_argument("--num_gpus", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--config", default="", help="a TOML or JSON file whose keys are these flags' names (tables may "
                   "group them); flags given here override it")
    return p


def parse_args(argv=None):
    """The command line (and any --config file under it) as a checked TrainConfig."""
    parser = build_parser()
    pre = ArgumentParser(add_help=False)
    pre.add_argument("--config", default="")
    path = pre.parse_known_args(argv)[0].config
    if path:
        types = {f.name: field_type(f) for f in dataclasses.fields(TrainConfig)}
        parser.set_defaults(**read_config_file(path, parser, types))
    args = vars(parser.parse_args(argv))
    args.pop("num_gpus")
    args.pop("config")
    cfg = TrainConfig(**args)
    check_config(cfg)
    return cfg
