"""One process on a CPU or one GPU: the model as it is, torch's AdamW and GradScaler."""
import os

import torch

from mupgpt.engines.base import Engine, check_fits
from mupgpt.optim import clean_name
from mupgpt.safe_load import load_weights, safe_load


class SingleEngine(Engine):
    def __init__(self, cfg, model, world, precision, total_steps, run_dir=None, ds_config=None):
        super().__init__(cfg, model, world, precision, total_steps, run_dir, ds_config)
        groups = self.param_groups()
        model.to(self.device)
        self.checkpoint_activations()
        self.forward_model = self.compiled(model) if cfg.compile else model
        self.start_optimizer(groups)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision == "fp16")

    def compiled(self, model):
        return torch.compile(model)

    def save(self, path):
        """The consolidated weights, and the optimizer, schedule and scaler as one torch-saved dict."""
        self.save_consolidated(path)
        if self.is_main:
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                        "scaler": self.scaler.state_dict()}, os.path.join(path, "optimizer.pt"))

    def load(self, path):
        self.load_model(load_weights(os.path.join(path, "model.safetensors"), self.device))
        state = safe_load(os.path.join(path, "optimizer.pt"), map_location=self.device)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.load_rng(path)

    def full_state_dict(self):
        return {clean_name(k): v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}

    def load_model(self, state):
        check_fits(self.model.state_dict(), state)
        self.model.load_state_dict(state, strict=False)
