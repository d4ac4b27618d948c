"""The trainer's typed config and its command line (flag names follow the seed's run_trainer.py)."""
import argparse
import dataclasses
from dataclasses import dataclass, field

from mupgpt.errors import UsageError


def _f(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # model
    head_width: int = _f(32, "width of each attention head; model width = n_head * head_width", aliases=["--width"])
    n_head: int = _f(4, "attention heads")
    n_layer: int = _f(2, "transformer blocks")
    parametrization: str = _f("mup", "mup or sp (standard parametrization, for comparison)", choices=["mup", "sp"])
    base_head_width: int = _f(32, "head width at which muP and SP coincide (width multiplier m = head_width / this)")
    base_n_layer: int = _f(0, "depth at which depth scaling is 1 (0: no depth scaling)")
    depth_alpha: float = _f(0.0, "residual branches scaled by (n_layer/base_n_layer)^-alpha: 1 CompleteP, 0.5 depth-muP")
    output_mult: float = _f(1.0, "logit multiplier (divided by m under muP)")
    attn_mult: float = _f(0.0, "attention multiplier on q.k/d_head under muP (0: sqrt(base_head_width))")
    init_std: float = _f(0.02, "std of the token and position embeddings")
    readout_zero_init: bool = _f(True, "start the readout at zero (both parametrizations)")
    query_zero_init: bool = _f(False, "start the query projection at zero")
    seq_len: int = _f(128, "tokens per training sequence (also the model's context length)")
    vocab_size: int = _f(0, "model vocabulary, padded to a multiple of 64 (0: the tokenizer's); a larger one keeps "
                         "unused rows, e.g. 50304 to benchmark GPT-2's shape on byte tokens")
    # optimisation
    learning_rate: float = _f(3e-3, "base AdamW learning rate (muP scales hidden layers by 1/m)", aliases=["--lr"])
    weight_decay: float = _f(0.0, "AdamW weight decay; kept width-independent per step (see mup_model.py)")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.95, "AdamW beta2")
    adam_eps: float = _f(1e-8, "AdamW epsilon")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0: off)")
    lr_scheduler_type: str = _f("cosine", "a transformers get_scheduler type: linear, cosine, constant, constant_with_warmup, ...")
    num_warmup_steps: int = _f(0, "linear warm-up steps")
    per_device_train_batch_size: int = _f(8, "sequences per micro batch on each rank")
    train_batch_size: int = _f(0, "global sequences per optimizer step (0: micro batch * world size); sets accumulation")
    num_train_epochs: float = _f(1.0, "epochs over the training tokens, used when --max_steps is 0")
    max_steps: int = _f(0, "optimizer steps (0: from --num_train_epochs)")
    seed: int = _f(1234, "seed for init and batches")
    # data
    dataset: str = _f("stdlib", "'stdlib' (this Python's standard-library sources, no download), a hub dataset "
                      "(wikitext-103, openwebtext, fineweb-edu, or any name/config), or a path to .txt/.jsonl/.parquet files or a folder")
    data_dir: str = _f("data", "where prepared token files live (one subfolder per dataset and tokenizer)")
    tokenizer: str = _f("auto", "gpt2 (tiktoken), bytes (no download), or auto: gpt2 when its files can be had, else bytes",
                        choices=["auto", "gpt2", "bytes"])
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
    compile: bool = _f(False, "torch.compile the model")
    device: str = _f("auto", "cpu, cuda or auto")
    # outputs
    output_dir: str = _f("runs", "parent folder of run directories")
    run_name: str = _f("", "run directory name (default: from width, lr, parametrization and seed)")
    log_interval: int = _f(10, "steps between log lines (the loss is only read back from the device on these)")
    eval_interval: int = _f(100, "steps between validation evaluations (0: only at the end)")
    eval_iters: int = _f(10, "validation batches per evaluation")
    save: bool = _f(True, "write checkpoints and the final model export (false: throughput benchmarks)")
    save_interval: int = _f(0, "steps between checkpoints (0: only at the end and on SIGTERM/Ctrl-C)")
    keep_checkpoints: int = _f(2, "how many recent checkpoints to keep")
    resume: str = _f("", "'auto' (the run directory's latest checkpoint, if any) or a checkpoint path")
    wandb: bool = _f(False, "log to Weights & Biases (offline when no API key is set; never prompts)")
    debug: bool = _f(False, "verbose logging, anomaly detection")
    print_profile_results: bool = _f(False, "profile a few steps with torch.profiler and print the table")
    local_rank: int = _f(-1, "set by the deepspeed launcher")

    @property
    def name(self):
        return self.run_name or f"{self.parametrization}_w{self.head_width}_d{self.n_layer}_lr{self.learning_rate:g}_s{self.seed}"


def _bool(s):
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {s!r}")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's own default prints usage first)
        raise UsageError(f"{message} (see --help)")


def build_parser():
    p = _Parser(description="Train a muP GPT (single process, DDP, FSDP2 or DeepSpeed).",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    return p


def parse_args(argv=None):
    args = vars(build_parser().parse_args(argv))
    args.pop("num_gpus")
    return TrainConfig(**args)
