"""DeepSpeed ZeRO-0/1/2/3 (with CPU or NVMe offload) behind the Engine interface.

deepspeed_config.py makes the run's DeepSpeed config. The muP groups go to DeepSpeed as the client
optimizer's param groups and the schedule stays client-side (a LambdaLR over those groups):
DeepSpeed's own config-file schedulers would set one LR for every group. DeepSpeed's checkpoint files
are read through safe_load.safe_ds_load.
"""
import torch

from mup_model import GPT
from mupgpt.engines.base import Engine, check_fits, checkpoint_blocks
from mupgpt.engines.deepspeed_muon import ZeroMuon
from mupgpt.errors import UsageError
from mupgpt.optim import adamw, clean_name, lr_scheduler, optimizer
from mupgpt.safe_load import safe_ds_load
from mupgpt.world import unlink_shm_buffer


def build_model(mcfg, config):
    """Under ZeRO-3 each rank builds only its shard (zero.Init); the muP init runs inside each leaf."""
    import deepspeed
    if config["zero_optimization"].get("stage") == 3:
        with deepspeed.zero.Init(config_dict_or_path=config):
            return GPT(mcfg)
    return GPT(mcfg)


def check_muon(cfg, precision):
    """Muon under DeepSpeed runs in fp32 or bf16: under fp16 the loss scale would reach its updates."""
    if cfg.optimizer == "muon" and precision == "fp16":
        raise UsageError("--optimizer muon under deepspeed runs in fp32 or bf16, not fp16: use --precision bf16")


class DeepSpeedEngine(Engine):
    def __init__(self, cfg, model, world, precision, total_steps, run_dir=None, ds_config=None):
        import deepspeed
        super().__init__(cfg, model, world, precision, total_steps, run_dir, ds_config)
        check_muon(cfg, precision)
        groups = self.param_groups()
        self.muon = ZeroMuon(model, groups, cfg.grad_clip, self.device) if cfg.optimizer == "muon" else None
        offload_opt = ds_config["zero_optimization"].get("offload_optimizer", {}).get("device", "none") != "none"
        if cfg.gradient_checkpointing:
            # with the optimizer offloaded, GPU memory is what is short: keep the checkpoints in host memory
            # too; on a CPU device they are there already, and DeepSpeed's CPU path loses the input under ZeRO-3
            in_cpu = offload_opt and self.device.type == "cuda"
            deepspeed.checkpointing.configure(None, checkpoint_in_cpu=in_cpu, partition_activations=False)
            checkpoint_blocks(model, deepspeed.checkpointing.checkpoint)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=self.client_optimizer(groups, offload_opt), config=ds_config,
            dist_init_required=False, lr_scheduler=lambda opt: lr_scheduler(opt, cfg, total_steps))
        if self.device.type == "cpu":  # DeepSpeed's comm starts here where torch.distributed was started first
            unlink_shm_buffer()
        self.share_first_group()
        self.engine.checkpoint_engine.load = safe_ds_load  # DeepSpeed's own load would run pickled code
        if cfg.compile:
            self.engine.compile()  # compiles the module in place: parameter names stay bare
        self.forward_model = self.engine

    def client_optimizer(self, groups, offload_opt):
        """DeepSpeed's CPU Adam where the optimizer is offloaded, torch's AdamW elsewhere; under Muon, AdamW
        with Muon groups that apply the updates ZeroMuon writes as their gradients."""
        cfg = self.cfg
        if self.muon:
            return optimizer(groups, cfg, given_updates=True)
        if not offload_opt:
            return adamw(groups, cfg)
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        return DeepSpeedCPUAdam(groups, adamw_mode=True, lr=cfg.learning_rate, eps=cfg.adam_eps,
                                betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay)

    def share_first_group(self):
        """Partial offload (offload_optimizer.ratio < 1) steps the GPU-resident part with a second optimizer
        that shares the param-group dicts except the first, which it copies once: share that one too, or
        the schedule never reaches the first muP group's GPU part."""
        backup = getattr(self.engine.optimizer, "backup_optimizer", None)
        if backup is None:
            return
        first = self.engine.optimizer.optimizer.param_groups[0]
        for key, value in backup.defaults.items():
            first.setdefault(key, value)
        backup.param_groups[0] = first

    def train_step(self, micro_batches):
        total, norm = torch.zeros((), device=self.device), None
        for i, (x, y) in enumerate(micro_batches):
            loss = self.engine(x, y)
            self.engine.backward(loss)  # DeepSpeed divides by the accumulation steps itself
            if self.muon and i == len(micro_batches) - 1:
                norm = self.muon.prepare()
            self.engine.step()  # a real optimizer step (and schedule step) only at the boundary
            total += loss.detach().float()
        norm = self.engine.get_global_grad_norm() if norm is None else norm
        norm = torch.as_tensor(float("nan") if norm is None else norm, dtype=torch.float32)
        return total / len(micro_batches), norm

    def eval_loss(self, x, y):
        if self.ds_config.get("compile", {}).get("deepcompile"):
            # DeepCompile compiles a second graph for no_grad or eval mode (slowly, and cuDNN's attention then
            # fails there): evaluate through the training graph, without backward
            return self.engine(x, y).detach().float()
        with torch.no_grad():
            self.engine.eval()
            loss = self.engine(x, y)
            self.engine.train()
        return loss.float()

    def save(self, path):
        self.engine.save_checkpoint(path, tag="deepspeed")
        if self.muon:
            self.muon.save(path)
        self.save_consolidated(path)

    def load(self, path):
        load_path, _ = self.engine.load_checkpoint(path, tag="deepspeed", load_module_strict=True)
        if load_path is None:
            raise UsageError(f"{path} holds no DeepSpeed state: resume it with the backend that wrote it")
        if self.muon:
            self.muon.load(path)
        self.load_rng(path)

    def full_state_dict(self):
        """fp32 master weights gathered from every rank's shard (all ranks must call this)."""
        from deepspeed.utils import safe_get_full_fp32_param
        out = {}
        for name, p in self.engine.module.named_parameters():
            full = safe_get_full_fp32_param(p)
            if full is None:  # ZeRO-0 / no master copy: the parameter itself is whole
                full = p.detach().float()
            out[clean_name(name)] = full.cpu().contiguous()
        return out

    def load_model(self, state):
        from deepspeed.utils import safe_set_full_fp32_param
        params = dict(self.engine.module.named_parameters())
        check_fits(map(clean_name, params), state)
        for name, p in params.items():
            value = state[clean_name(name)].to(self.device)
            if self.engine.zero_optimization_stage() == 0:
                with torch.no_grad():
                    p.copy_(value)
            else:
                safe_set_full_fp32_param(p, value)
