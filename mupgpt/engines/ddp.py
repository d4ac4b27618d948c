"""DDP (torch DistributedDataParallel) behind the Engine interface: whole replicas, gradients all-reduced."""
import contextlib

from torch.nn.parallel import DistributedDataParallel

from mupgpt.engines.base import Engine


class DDPEngine(Engine):
    def __init__(self, cfg, model, groups, world, precision, total_steps):
        super().__init__(cfg, model, groups, world, precision, total_steps)
        ids = [world.local_rank] if self.device.type == "cuda" else None
        # gradients as views into the all-reduce buckets, not a second copy: 4 B/param less per rank
        self.forward_model = DistributedDataParallel(self.forward_model, device_ids=ids, gradient_as_bucket_view=True)

    def no_sync(self, last):
        return contextlib.nullcontext() if last else self.forward_model.no_sync()
