"""Engines: where the model meets the hardware. One module per backend, the factory in factory.py.

    factory.py           build(): model and engine for a backend
    base.py              the Engine interface, the pieces every backend shares, and check_fits
    single.py            one process on a CPU or one GPU
    ddp.py               DistributedDataParallel (the single engine, replicated)
    fsdp.py              FSDP2 (fully_shard)
    deepspeed_zero.py    DeepSpeed ZeRO-0..3 with CPU / NVMe offload
    deepspeed_config.py  DeepSpeed's config for a run: read, checked, filled in from the flags
    op_builds.py         stale lock files of DeepSpeed's op builds

Every engine's constructor takes the same arguments and calls Engine.__init__ first. Backends import
only base (DDP also the single engine it extends, DeepSpeed its config helpers); only the factory
imports backends, and only the one asked for, so nothing imports in a circle and DeepSpeed is never
imported unless it is used. What a checkpoint may hold when it is read back is mupgpt/safe_load.py's.
"""
