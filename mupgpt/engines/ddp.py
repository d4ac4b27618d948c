"""DDP (torch DistributedDataParallel): whole replicas, gradients all-reduced; otherwise the single engine."""
import contextlib

from torch.nn.parallel import DistributedDataParallel

from mupgpt.engines.single import SingleEngine


class DDPEngine(SingleEngine):
    def __init__(self, cfg, model, world, precision, total_steps, run_dir=None, ds_config=None):
        super().__init__(cfg, model, world, precision, total_steps, run_dir, ds_config)
        ids = [world.local_rank] if self.device.type == "cuda" else None
        # gradients as views into the all-reduce buckets rather than a second copy of them
        self.forward_model = DistributedDataParallel(self.forward_model, device_ids=ids, gradient_as_bucket_view=True)

    def no_sync(self, last):
        return contextlib.nullcontext() if last else self.forward_model.no_sync()
