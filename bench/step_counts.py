"""Per-step host work of a real training run, counted: collectives by kind, ZeRO-3 parameter fetches and
releases, engine hooks, optimizer (sub-)steps and device-to-host read-backs.

    python bench/step_counts.py OUT.json -- <run_trainer.py flags>
    deepspeed --num_gpus 2 bench/step_counts.py OUT.json -- --backend deepspeed --zero_stage 3 ...
    torchrun --nproc_per_node 2 bench/step_counts.py OUT.json -- --backend fsdp ...

The trainer runs unchanged in this process; before it is imported, the functions below are wrapped by
counters that call straight through. A step runs from one `Batches.train` call (the loop asks for the
step's batches first) to the next, so the loop's own work (logging, the stop agreement) counts in the
step it belongs to. Each rank writes OUT.rank<R>.json: one dict of counts per step.
"""
import collections
import functools
import json
import os
import sys

COLLECTIVES = ["all_reduce", "all_gather_single", "reduce_scatter_single", "all_gather", "all_gather_into_tensor",
               "reduce_scatter", "reduce_scatter_tensor", "broadcast", "barrier", "all_to_all_single", "reduce",
               "all_gather_object", "broadcast_object_list"]
READ_BACKS = ["item", "tolist", "__bool__", "__float__", "__int__", "numpy"]
# (module, class, method, counter name): the engines' per-step Python work
HOOKS = [
    ("deepspeed.runtime.zero.partitioned_param_coordinator", "PartitionedParameterCoordinator", "fetch_sub_module",
     "zero3.fetch"),
    ("deepspeed.runtime.zero.partitioned_param_coordinator", "PartitionedParameterCoordinator", "release_sub_module",
     "zero3.release"),
    ("deepspeed.runtime.zero.stage3", "DeepSpeedZeroOptimizer_Stage3", "reduce_ready_partitions_and_remove_grads",
     "zero3.grad_per_param"),
    ("deepspeed.runtime.zero.stage_1_and_2", "DeepSpeedZeroOptimizer", "reduce_ready_partitions_and_remove_grads",
     "zero12.grad_per_param"),
    ("deepspeed.runtime.zero.stage_1_and_2", "DeepSpeedZeroOptimizer", "get_grad_norm_direct", "zero12.grad_norm"),
    ("mupgpt.engines.fsdp", "LocalShardStep", "step", "fsdp.local_shard_step"),
    ("torch.distributed.fsdp._fully_shard._fsdp_param_group", "FSDPParamGroup", "unshard", "fsdp.unshard"),
    ("torch.distributed.fsdp._fully_shard._fsdp_param_group", "FSDPParamGroup", "reshard", "fsdp.reshard"),
    ("torch.distributed.fsdp._fully_shard._fsdp_param_group", "FSDPParamGroup", "pre_forward", "fsdp.pre_forward"),
    ("torch.distributed.fsdp._fully_shard._fsdp_param_group", "FSDPParamGroup", "post_forward", "fsdp.post_forward"),
    ("torch.distributed.fsdp._fully_shard._fsdp_param_group", "FSDPParamGroup", "pre_backward", "fsdp.pre_backward"),
    ("torch.distributed.fsdp._fully_shard._fsdp_param_group", "FSDPParamGroup", "post_backward", "fsdp.post_backward"),
]

steps = []  # one Counter per step
current = collections.Counter()


WHERE = os.environ.get("STEP_COUNTS_WHERE", "")  # a counter name: also count it by its caller's file:line


def counted(fn, name):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        current[name] += 1
        if name == WHERE:
            frames = [sys._getframe(i) for i in range(1, 1 + int(os.environ.get("STEP_COUNTS_DEPTH", "1")))]
            where = "<".join(f"{os.path.basename(f.f_code.co_filename)}:{f.f_lineno}" for f in frames)
            current[name + "@" + where] += 1
        return fn(*args, **kwargs)
    return wrapper


def install():
    import importlib

    import torch
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d
    for name in COLLECTIVES:
        fn = getattr(c10d, name, None)
        if fn is not None:
            wrapped = counted(fn, f"collective.{name}")
            setattr(c10d, name, wrapped)
            setattr(dist, name, wrapped)
    for name in READ_BACKS:
        setattr(torch.Tensor, name, counted(getattr(torch.Tensor, name), "read_back"))
    from torch.optim.optimizer import register_optimizer_step_pre_hook
    register_optimizer_step_pre_hook(lambda *a: current.update(["optimizer.step"]))
    for module, cls, method, name in HOOKS:
        try:
            klass = getattr(importlib.import_module(module), cls)
        except (ImportError, AttributeError):
            continue
        setattr(klass, method, counted(getattr(klass, method), name))
    import mupgpt.data
    train = mupgpt.data.Batches.train

    def train_marked(self, step):
        global current
        steps.append(current)
        current = collections.Counter()
        return train(self, step)
    mupgpt.data.Batches.train = train_marked


def main():
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher adds it
    out, rest = argv[0], argv[1:]
    if rest[:1] == ["--"]:
        rest = rest[1:]
    install()
    import run_trainer
    rank = int(os.environ.get("RANK", "0"))
    try:
        return run_trainer.main(rest)
    finally:
        steps.append(current)
        with open(f"{out}.rank{rank}.json", "w") as f:
            json.dump([dict(c) for c in steps[2:]], f)  # [0]: before step 1; [1]: the first step (set-up)


if __name__ == "__main__":
    main()
