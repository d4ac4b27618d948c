"""Plan a run before renting the GPUs: for each engine and shard group size that fits, the memory per GPU,
the step time (compute, communication not hidden, host overhead), tokens/s per GPU and the time to a token
budget, fastest first.

    python scripts/plan.py --arch llama --n_layer 32 --n_head 32 --head_width 128 --n_kv_head 8 \\
        --mlp_hidden 14336 --vocab_size 128256 --seq_len 8192 --per_device_train_batch_size 1 \\
        --gradient_checkpointing --gpu H100 --gpus_per_node 8 --nodes 4 --tokens 1e12
    python scripts/plan.py --config configs/my_run.toml --gpu A100 --nodes 2

The model flags are the trainer's (and --config reads the trainer's config files; keys other than the model's
are ignored here). --shard_group_size K shards within groups of K ranks and replicates across groups (hybrid
sharding, HSDP): the planner models it for ZeRO-3 and FSDP2 ahead of the trainer's flag. The model and its
sources: docs/planner.md.
"""
import argparse
import dataclasses
import json
from types import SimpleNamespace

from mupgpt.config import TrainConfig, field_type
from mupgpt.config import build_parser as trainer_parser
from mupgpt.config_file import read_config_file
from mupgpt.errors import ArgumentParser, exit_on_usage_error
from mupgpt.plan import (
    ATTENTION_EFFICIENCY,
    BANDWIDTH_EFFICIENCY,
    ENGINES,
    GPUS,
    HOST_GBPS,
    INTER_GBPS,
    MATMUL_EFFICIENCY,
    check_model,
    cluster,
    human_hours,
    model_summary,
    plan,
    smallest_memory,
)

MODEL_FLAGS = ("arch", "n_layer", "n_head", "head_width", "n_kv_head", "mlp_hidden", "vocab_size", "seq_len",
               "per_device_train_batch_size", "precision", "gradient_checkpointing")
DEFAULT_VOCAB = 50304  # GPT-2's vocabulary padded to a multiple of 64, for a trainer default of 0 (the tokenizer's)


def build_parser():
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    trainer = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for name in MODEL_FLAGS:
        f = trainer[name]
        kw = {"default": f.default, "help": f.metadata["help"]}
        if field_type(f) is bool:
            kw["action"] = "store_true"
        else:
            kw.update(type=field_type(f), choices=f.metadata.get("choices"))
        p.add_argument(f"--{name}", **kw)
    p.add_argument("--config", default="", help="the trainer's TOML or JSON config: its model keys set the flags "
                   "above (flags given here override it)")
    p.add_argument("--gpu", default="H100", help=f"one of {', '.join(GPUS)}, or custom (with --peak_tflops, "
                   "--gpu_memory_gb and --hbm_gbps)")
    p.add_argument("--gpus_per_node", type=int, default=8, help="GPUs in each node")
    p.add_argument("--nodes", type=int, default=1, help="nodes")
    p.add_argument("--peak_tflops", type=float, default=0.0, help="dense bf16 TFLOP/s per GPU (0: the GPU's)")
    p.add_argument("--gpu_memory_gb", type=float, default=0.0, help="GiB per GPU (0: the GPU's)")
    p.add_argument("--hbm_gbps", type=float, default=0.0, help="GPU memory GB/s (0: the GPU's)")
    p.add_argument("--intra_gbps", type=float, default=0.0, help="in-node GB/s per GPU per direction (0: the GPU's "
                   "NVLink)")
    p.add_argument("--inter_gbps", type=float, default=INTER_GBPS, help="inter-node GB/s per GPU per direction")
    p.add_argument("--pcie_gbps", type=float, default=0.0, help="host link GB/s per direction, for offload (0: the "
                   "GPU's PCIe)")
    p.add_argument("--host_gbps", type=float, default=HOST_GBPS, help="a GPU's share of host memory GB/s, for "
                   "offload's CPU Adam")
    p.add_argument("--mfu", type=float, default=0.0, help="fraction of peak every FLOP runs at on one GPU, the "
                   "optimizer and memory-bound work inside it (0: the roofline of measured matmul, attention and "
                   "bandwidth efficiencies)")
    p.add_argument("--tokens", type=float, default=0.0, help="token budget, for the time to reach it")
    p.add_argument("--shard_group_size", type=int, default=0, help="shard ZeRO-3 and FSDP2 within groups of this "
                   "many ranks, replicated across groups (0: try the whole world, each node and its divisors)")
    p.add_argument("--engine", action="append", choices=list(ENGINES), help="only this engine (repeatable)")
    p.add_argument("--json", action="store_true", help="print JSON")
    return p


def parse(argv=None):
    """The planner's flags, with a trainer --config's model keys as defaults."""
    parser = build_parser()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default="")
    path = pre.parse_known_args(argv)[0].config
    if path:
        types = {f.name: field_type(f) for f in dataclasses.fields(TrainConfig)}
        values = read_config_file(path, trainer_parser(), types)
        parser.set_defaults(**{k: v for k, v in values.items() if k in MODEL_FLAGS})
    return parser.parse_args(argv)


def model_of(args):
    """The estimator's view of the model flags."""
    return SimpleNamespace(arch=args.arch, n_layer=args.n_layer, n_head=args.n_head, head_width=args.head_width,
                           n_kv_head=args.n_kv_head, mlp_hidden=args.mlp_hidden,
                           vocab=args.vocab_size or DEFAULT_VOCAB, seq_len=args.seq_len,
                           batch=args.per_device_train_batch_size,
                           precision="bf16" if args.precision == "auto" else args.precision,
                           gradient_checkpointing=args.gradient_checkpointing)


def print_table(rows, model, c, args):
    speed = (f"at MFU {c.mfu:g}" if c.mfu else f"(matmuls at {MATMUL_EFFICIENCY:g}, attention at "
             f"{ATTENTION_EFFICIENCY:g}), HBM {c.hbm_gbps:g} GB/s (at {BANDWIDTH_EFFICIENCY:g})")
    print(f"{model_summary(model)}; {c.nodes} node(s) x {c.gpus_per_node} {args.gpu}, {c.peak_tflops:g} TFLOP/s "
          f"{speed}, {c.memory_gib:g} GiB, links {c.intra_gbps:g} / {c.inter_gbps:g} GB/s in / across nodes")
    head = (f"{'engine':<15}{'shard':>6}{'GiB/GPU':>9}{'compute':>9}{'comm':>8}{'exposed':>9}{'offload':>9}"
            f"{'host':>7}{'step s':>8}{'tok/s/GPU':>11}")
    print(head + ("   to budget" if args.tokens else ""))
    for r in rows:
        line = (f"{r['engine']:<15}{r['shard_group']:>6}{r['memory_gib']:>9.1f}{r['compute_s']:>9.3f}"
                f"{r['comm_s']:>8.3f}{r['exposed_comm_s']:>9.3f}{r['offload_s']:>9.3f}{r['host_s']:>7.3f}"
                f"{r['step_s']:>8.3f}{r['tokens_per_s_per_gpu']:>11,.0f}")
        print(line + (f"   {human_hours(r['hours_to_budget']):>9}" if args.tokens else ""))


def main():
    args = parse()
    model = model_of(args)
    check_model(model)
    c = cluster(args.gpu, args.gpus_per_node, args.nodes, args.peak_tflops, args.gpu_memory_gb, args.intra_gbps,
                args.inter_gbps, args.pcie_gbps, args.host_gbps, args.mfu, args.hbm_gbps)
    rows = plan(model, c, args.tokens, args.shard_group_size, args.engine)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        engine, gib = smallest_memory(model, c)
        print(f"nothing fits in {c.memory_gib:g} GiB per GPU: the smallest, {engine}, needs {gib:.1f} GiB "
              "(try more GPUs, --gradient_checkpointing or a smaller --per_device_train_batch_size)")
        return 1
    print_table(rows, model, c, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(exit_on_usage_error(main))
