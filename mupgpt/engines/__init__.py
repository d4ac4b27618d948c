"""Engines: where the model meets the hardware. One module per backend, the factory in factory.py.

    factory.py         build(): model, muP optimizer groups and the engine for a backend
    base.py            the Engine interface, the pieces every backend shares, and the single-process engine
    ddp.py             DistributedDataParallel
    fsdp.py            FSDP2 (fully_shard)
    deepspeed_zero.py  DeepSpeed ZeRO-0..3 with CPU / NVMe offload

Backends import only base (and their own library); only the factory imports backends, and only the
one asked for, so nothing imports in a circle and DeepSpeed is never imported unless it is used.
"""
