"""The peak bytes torch allocates on this CPU while an engine is built and trains 2 steps, per rank.

    python tests/mem_probe.py --backend single --precision fp32 --n_layer 2 --n_head 8 --head_width 64 ...
    deepspeed --num_gpus 2 tests/mem_probe.py --backend deepspeed --zero_stage 3 --precision bf16 ...

Prints one JSON line per rank: {"rank", "peak_bytes"}. The peak comes from the profiler's
record of every allocation and free (sizes in time order, summed), so unlike peak RSS it does not
move with the machine's load or with what torch and DeepSpeed load at start-up. (torch's own
memory-timeline export is deprecated, and its data-flow pass fails on DeepSpeed's multi-rank runs,
hence the raw event tree.)
"""
import json
import os
import sys

import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from mupgpt.config import parse_args
from mupgpt.engines.factory import build
from mupgpt.model_config import model_config
from mupgpt.world import exit_process, init_world, resolve_backend


def peak_bytes(prof):
    """The most CPU bytes alive at once, from the profiler's allocation events."""
    sizes, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            sizes.append((event.start_time_ns, event.extra_fields.alloc_size))  # negative for a free
    now = peak = 0
    for _, size in sorted(sizes):
        now += size
        peak = max(peak, now)
    return peak


cfg = parse_args(sys.argv[1:])  # the deepspeed launcher puts --local_rank first
backend = resolve_backend(cfg)
micro, world_size = cfg.per_device_train_batch_size, int(os.environ.get("WORLD_SIZE", "1"))
ds_cfg = None
if backend == "deepspeed":
    from mupgpt.engines.deepspeed_config import ds_config
    ds_cfg = ds_config(cfg, cfg.precision, micro * world_size, 1, cfg.n_head * cfg.head_width)
world = init_world(backend, "cpu")
x = torch.randint(0, 257, (micro, cfg.seq_len), generator=torch.Generator().manual_seed(world.rank))
with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:  # no stacks: FSDP2 swaps tensors
    engine = build(backend, cfg, model_config(cfg, 257), world, cfg.precision, 10, ds_cfg)
    for _ in range(2):
        engine.train_step([(x, x.roll(-1, 1))])
print(json.dumps({"rank": world.rank, "peak_bytes": peak_bytes(prof)}), flush=True)
exit_process(0)
