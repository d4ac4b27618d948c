"""Train a muP GPT. One process, torchrun (DDP / FSDP2) or the deepspeed launcher, same flags.

    python run_trainer.py --dataset stdlib --max_steps 300
    deepspeed --num_gpus 8 run_trainer.py --head_width 32
    torchrun --nproc_per_node 8 run_trainer.py --backend fsdp --head_width 32
"""
import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import time

import torch

from mupgpt import checkpoint
from mupgpt.config import parse_args
from mupgpt.config_checks import check_config, check_shard_group
from mupgpt.data import Batches, load_data
from mupgpt.engines.base import count_params
from mupgpt.engines.factory import build
from mupgpt.errors import UsageError, exit_on_usage_error
from mupgpt.metrics import Reporter, disk_error, duration, flops_per_token, peak_flops, peak_memory, write_atomic
from mupgpt.model_config import check_model_flags, model_config
from mupgpt.optim import schedule_kwargs
from mupgpt.rundir import read_summary, refuse_a_branch, refuse_a_second_run, run_directory, run_lock
from mupgpt.world import exit_process, init_world, resolve_backend, resolve_device, resolve_precision


def global_batch(cfg, world_size):
    per_step = cfg.per_device_train_batch_size * world_size
    total = cfg.train_batch_size or per_step
    if total % per_step:
        raise UsageError(f"--train_batch_size {total} is not a multiple of --per_device_train_batch_size "
                         f"{cfg.per_device_train_batch_size} x {world_size} processes: pick one that divides")
    return total, total // per_step


class StopFlag:
    """SIGTERM or Ctrl-C asks for a checkpoint and a clean exit; a second Ctrl-C stops at once."""

    def __init__(self):
        self.requested, self.signal, self.announced = False, None, False
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        # no printing here: a signal that lands while the loop prints would re-enter stdout's writer
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested, self.signal = True, signal.Signals(signum).name

    def announce(self):
        """Says once, from the loop, that a signal asked for a stop."""
        if self.requested and not self.announced:
            self.announced = True
            print(f"signal {self.signal}: saving a checkpoint and stopping after this step", flush=True)


PROFILE_WAIT = 10  # steps before the profiled ones: compile, recompiles and the allocator settle first


def start_profiler():
    """--print_profile_results: profile steps 13 to 16 (after warm-up) and print the top operators by
    device time and by host time; MUPGPT_PROFILE_TRACE=FILE.json also writes a Chrome trace."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    prof = torch.profiler.profile(activities=activities,
                                  schedule=torch.profiler.schedule(wait=PROFILE_WAIT, warmup=2, active=4))
    prof.start()
    return prof


def step_profiler(prof, is_main):
    prof.step()
    if prof.step_num < PROFILE_WAIT + 6:
        return prof
    prof.stop()
    if is_main:
        table = prof.key_averages()
        if torch.cuda.is_available():
            print(table.table(sort_by="cuda_time_total", row_limit=25), flush=True)
        print(table.table(sort_by="self_cpu_time_total", row_limit=25), flush=True)
        if os.environ.get("MUPGPT_PROFILE_TRACE"):
            prof.export_chrome_trace(os.environ["MUPGPT_PROFILE_TRACE"])
    return None


def evaluate(engine, batches, iters):
    """The mean validation loss over ranks: one all-reduce and one read-back for all its batches."""
    losses = torch.stack([engine.eval_loss(*batches.val(i)) for i in range(iters)])
    return engine.reduce_mean(losses.mean()).item()


@dataclasses.dataclass
class Synced:
    loss: float  # this step's loss, averaged over ranks
    grad_norm: float
    finite: bool  # every rank's every loss and grad norm since the last sync was finite
    stop: bool  # some rank was asked to stop


def sync(loss, grad_norm, finite, stop_requested, world):
    """What the loop needs from the device and the other ranks, as one all-reduce and one read-back.

    Steps in between queue their work and read nothing back, so the host runs ahead of the device; ranks
    agree on a stop only here, so they all stop at the same step whenever each got the signal."""
    flags = torch.stack([(~finite).float(), torch.tensor(float(stop_requested), device=finite.device)])
    stats = torch.cat([loss.detach().float().view(1), torch.as_tensor(grad_norm, device=finite.device)
                       .float().view(1), flags])
    if world.world_size > 1:
        torch.distributed.all_reduce(stats)  # sums: the mean loss, and how many ranks saw a non-finite value or a stop
    loss, grad_norm, nonfinite, stop = stats.tolist()
    return Synced(loss / world.world_size, grad_norm / world.world_size, nonfinite == 0, stop > 0)


def train(cfg):
    with contextlib.ExitStack() as cleanup:
        try:
            return _train(cfg, cleanup)
        except OSError as e:  # a full disk or a read-only place while writing the run's files: one line
            error = disk_error(e, e.filename or cfg.output_dir)
            if error is e:
                raise
            raise error from None


@dataclasses.dataclass
class Run:
    """A run once its flags are checked, its process group is up and its directory is locked."""
    cfg: object
    backend: str
    run_dir: str
    precision: str
    world: object
    global_batch: int
    accum: int
    ds_cfg: dict
    summary: dict  # the directory's summary.json, if any
    resume_path: str
    trainer_state: dict


def start(cfg, cleanup):
    """Every flag is checked before any process group or file exists; then the world and the lock."""
    check_config(cfg)
    check_model_flags(cfg)
    schedule_kwargs(cfg, cfg.max_steps or None)
    backend = resolve_backend(cfg)
    check_shard_group(cfg, backend, int(os.environ.get("WORLD_SIZE", "1")))
    run_dir = run_directory(cfg, backend)
    device_type = resolve_device(cfg)
    precision = resolve_precision(cfg, backend, device_type)
    G, accum = global_batch(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    ds_cfg = None
    if backend == "deepspeed":
        from mupgpt.engines.deepspeed_config import ds_config
        from mupgpt.engines.op_builds import check_op_build_locks
        ds_cfg = ds_config(cfg, precision, G, accum, cfg.n_head * cfg.head_width)
        check_op_build_locks()  # before DeepSpeed builds or loads its ops (init_distributed does, on CPU)
    world = init_world(backend, device_type)
    cleanup.enter_context(run_lock(run_dir, world))  # before anything in the run directory is read or written
    resume_path = checkpoint.find_resume(cfg.resume, run_dir)
    trainer_state = checkpoint.read_trainer_state(resume_path) if resume_path else None
    return Run(cfg, backend, run_dir, precision, world, G, accum, ds_cfg, read_summary(run_dir), resume_path,
               trainer_state)


def refuse_another_history(run):
    """A run directory holds one history: no second run in it, and no branch from one of its earlier steps."""
    cfg, run_dir, state = run.cfg, run.run_dir, run.trainer_state
    named = cfg.resume not in ("", "auto") and os.path.realpath(cfg.resume) == os.path.realpath(run.resume_path or "")
    if state and named and checkpoint.in_run_dir(run.resume_path, run_dir):
        summary = run.summary
        done = summary.get("steps") if summary.get("completed") and isinstance(summary.get("steps"), int) else 0
        later = max([checkpoint.step_of(c) for c in checkpoint.checkpoints(run_dir)] + [done])
        refuse_a_branch(run_dir, run.resume_path, int(state["step"]), later)
    if not cfg.resume:
        refuse_a_second_run(run_dir, bool(checkpoint.checkpoints(run_dir)))


def finished_already(run, total_steps):
    """Whether the checkpoint to resume is this run's end: a finished run stays as it is. One past the
    run's length is refused."""
    state = run.trainer_state
    if not state or state["step"] < total_steps:
        return False
    if run.summary.get("completed") and checkpoint.in_run_dir(run.resume_path, run.run_dir):
        if run.world.is_main:
            print(f"{run.run_dir} holds a finished run ({run.summary.get('steps')} steps): nothing to resume, it is "
                  "left as it is (to train it further, give a larger --max_steps)", flush=True)
        return True
    if state["step"] > total_steps:
        raise UsageError(f"{run.resume_path} is at step {state['step']}, past this run's {total_steps} steps: "
                         "give a larger --max_steps (or --num_train_epochs) to resume it")
    return False


def build_engine(run, mcfg, total_steps):
    """The model, wrapped for its backend; a model too large for the memory is one line naming the flags."""
    cfg, world = run.cfg, run.world
    try:
        return build(run.backend, cfg, mcfg, world, run.precision, total_steps, run.ds_cfg,
                     run.run_dir if world.is_main else None)
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:  # the model's own memory, on host or device
        if not isinstance(e, (torch.OutOfMemoryError, MemoryError)) and "allocate" not in str(e):
            raise
        raise UsageError(f"the model (--n_layer {cfg.n_layer}, --n_head {cfg.n_head} x --head_width {cfg.head_width}, "
                         f"{world.device.type}) does not fit in memory ({str(e).splitlines()[0][:160]}): "
                         "lower --n_layer or --head_width, or shard it (--backend fsdp or deepspeed --zero_stage 3)"
                         ) from None


def restore(run, engine):
    """(step, best validation loss) to start from: the checkpoint's, or a fresh start's."""
    if not run.resume_path:
        return 0, float("inf")
    state = run.trainer_state
    checkpoint.restore(engine, run.resume_path, state, run.backend)
    step = state["step"]
    if run.world.is_main:
        print(f"resumed from {run.resume_path} at step {step}", flush=True)
        if checkpoint.in_run_dir(run.resume_path, run.run_dir):
            for aside in checkpoint.set_aside_later(run.run_dir, step):
                print(f"note: moved the skipped checkpoint aside to {aside}: this run's history goes on from step "
                      f"{step}", flush=True)
    return step, state.get("best_val_loss", float("inf"))


def announce(run, engine, data, mcfg, total_steps):
    """config.json (the flags and what they resolved to) and the run's first line."""
    cfg, world = run.cfg, run.world
    n_params = count_params(engine.model)
    resolved = {"backend": run.backend, "precision": run.precision, "world_size": world.world_size,
                "train_batch_size": run.global_batch, "gradient_accumulation_steps": run.accum,
                "total_steps": total_steps, "device": str(world.device), "n_params": n_params, "data": data.meta,
                "model": dataclasses.asdict(mcfg), "width_mult": mcfg.width_mult, "torch": torch.__version__}
    write_atomic(os.path.join(run.run_dir, "config.json"),
                 json.dumps({"args": dataclasses.asdict(cfg), "resolved": resolved}, indent=2).encode())
    groups = world.world_size // cfg.shard_group_size if 0 < cfg.shard_group_size < world.world_size else 1
    sharding = f" ({groups} replicas, each sharded over {cfg.shard_group_size})" if groups > 1 else ""
    print(f"{run.backend}{sharding} | {world.world_size} rank(s) on {world.device} | {run.precision} | "
          f"{n_params / 1e6:.2f}M params | width {mcfg.width} = {mcfg.n_head}x{mcfg.head_width}, "
          f"base {mcfg.base_width} = "
          f"{mcfg.base_width // mcfg.base_head_width}x{mcfg.base_head_width} (m={mcfg.width_mult:g}, "
          f"{cfg.parametrization}) | batch {run.global_batch}x{cfg.seq_len} (accum {run.accum}) | {total_steps} steps "
          f"| run dir {run.run_dir}", flush=True)


class StepClock:
    """Training time only: evaluation, logging and checkpoints are paused out of tokens/s and the ETA."""

    def __init__(self, step):
        self.t_start = self.t_log = time.time()
        self.start_step = self.last_log_step = step
        self.paused = 0.0

    def interval(self, step, tokens_per_step):
        """(tokens/s since the last logged step, seconds since the start), at a logged step."""
        tps = (step - self.last_log_step) * tokens_per_step / max(time.time() - self.t_log, 1e-9)
        self.t_log, self.last_log_step = time.time(), step
        return tps, time.time() - self.t_start

    def eta(self, step, total_steps):
        elapsed = time.time() - self.t_start
        return (elapsed - self.paused) / (step - self.start_step) * (total_steps - step)

    @contextlib.contextmanager
    def pause(self):
        t = time.time()
        yield
        pause = time.time() - t
        self.t_log += pause  # the interval's start moves with it (not reset: its steps still count)
        self.paused += pause


class Health:
    """Whether every loss and grad norm since the last check was finite, kept on the device and read back
    only at a sync. fp16 loss scaling overflows the grad norm on purpose (that step is skipped), and
    DeepSpeed's ZeRO-0 reports no grad norm (NaN here): there only the loss counts."""

    def __init__(self, run, step):
        self.finite = torch.ones((), dtype=torch.bool, device=run.world.device)
        self.check_norm = run.precision != "fp16" and not (run.ds_cfg and run.ds_cfg["zero_optimization"]["stage"] == 0)
        self.checked_step, self.diverged = step, False

    def add(self, loss, grad_norm):
        self.finite &= torch.isfinite(loss)
        if self.check_norm:
            self.finite &= torch.isfinite(torch.as_tensor(grad_norm, device=self.finite.device))

    def checked(self, synced, step):
        self.diverged = not synced.finite
        self.checked_step = self.checked_step if self.diverged else step

    def where(self, step):
        return (f"at step {step}" if self.checked_step + 1 == step else
                f"between steps {self.checked_step + 1} and {step}")


class Trainer:
    """The loop: train a step; then log, evaluate and save when due, and stop when the ranks agree to.
    The ranks agree on a stop only at a sync (a logged, evaluated or saved step), so they stop together."""

    def __init__(self, run, engine, batches, mcfg, total_steps, step, best_val):
        self.run, self.cfg, self.world, self.engine, self.batches = run, run.cfg, run.world, engine, batches
        self.total_steps, self.step, self.best_val = total_steps, step, best_val
        self.tokens_per_step = run.global_batch * run.cfg.seq_len
        self.flops_token, self.peak = flops_per_token(mcfg), peak_flops(self.world.device) * self.world.world_size
        self.reporter = Reporter(run.run_dir, run.cfg, self.world.is_main, step)
        # a resume at the run's last step (killed before its summary) reports the losses logged before it
        self.last_loss = self.reporter.last.get("loss", float("nan"))
        self.val_loss = self.reporter.last.get("val_loss")
        self.clock, self.health, self.stop = StepClock(step), Health(run, step), StopFlag()
        self.train_mem = peak_memory(self.world.device)
        self.profiler = start_profiler() if self.cfg.print_profile_results else None

    def fit(self):
        cfg, step = self.cfg, self.step
        while self.step < self.total_steps:
            loss, grad_norm = self.engine.train_step(self.batches.train(self.step))
            self.step = step = self.step + 1
            self.stop.announce()
            self.health.add(loss, grad_norm)
            if self.profiler is not None:
                self.profiler = step_profiler(self.profiler, self.world.is_main)
            log_due = step % cfg.log_interval == 0 or step == self.total_steps or step == 1
            save_due = cfg.save and ((cfg.save_interval and step % cfg.save_interval == 0) or step == self.total_steps)
            eval_due = (cfg.eval_interval and step % cfg.eval_interval == 0) or step == self.total_steps
            synced = None
            if log_due or save_due or eval_due or (self.world.world_size == 1 and self.stop.requested):
                synced = sync(loss, grad_norm, self.health.finite, self.stop.requested, self.world)
                self.health.checked(synced, step)
            diverged = self.health.diverged
            row, line = self.log_row(synced) if log_due or diverged else ({}, "")
            with self.clock.pause():
                if eval_due or diverged:
                    row, line = self.evaluated(row, line)
                if row:
                    self.reporter.log(row, line)
                stopping = diverged or (synced is not None and synced.stop)
                if (save_due or (cfg.save and stopping)) and not diverged:  # never a checkpoint of a diverged model
                    self.save(stopping)
            if stopping:
                break
        self.end_profiler()

    def log_row(self, synced):
        step, total = self.step, self.total_steps
        self.last_loss = synced.loss
        tps, elapsed = self.clock.interval(step, self.tokens_per_step)
        eta = self.clock.eta(step, total)
        mfu = self.flops_token * tps / self.peak if self.peak else None  # no known peak (CPU): no MFU
        lr = self.engine.lr()
        row = {"step": step, "loss": synced.loss, "lr": lr, "grad_norm": synced.grad_norm,
               "tokens": step * self.tokens_per_step, "tokens_per_s": tps, "mfu": mfu, "elapsed_s": elapsed,
               "eta_s": eta}
        line = (f"step {step:>6}/{total} | loss {synced.loss:.4f} | lr {lr:.3e} | {tps:,.0f} tok/s"
                + (f" | mfu {100 * mfu:.1f}%" if mfu is not None else "")
                + f" | {duration(elapsed)} elapsed, ETA {duration(eta)}")
        self.train_mem = peak_memory(self.world.device)  # before any eval, checkpoint or export at this step
        return row, line

    def evaluated(self, row, line):
        """The row and line with the validation loss (NaN without evaluating, once diverged)."""
        diverged = self.health.diverged
        self.val_loss = float("nan") if diverged else evaluate(self.engine, self.batches, self.cfg.eval_iters)
        if math.isfinite(self.val_loss):
            self.best_val = min(self.best_val, self.val_loss)
        row = row or {"step": self.step, "tokens": self.step * self.tokens_per_step}
        row["val_loss"] = self.val_loss
        return row, (line or f"step {self.step:>6}/{self.total_steps}") + f" | val {self.val_loss:.4f}"

    def save(self, stopping):
        run = self.run
        path = checkpoint.save(self.engine, run.run_dir, {"step": self.step, "best_val_loss": self.best_val,
                                                          "backend": run.backend, "world_size": self.world.world_size},
                               self.cfg.keep_checkpoints)
        if stopping and self.world.is_main:
            print(f"stopped at step {self.step}; resume with --resume auto (checkpoint {path})", flush=True)

    def end_profiler(self):
        if self.profiler is None:
            return
        self.profiler.stop()  # the run ended before the profiled steps
        if self.world.is_main:
            print(f"note: no profile: --print_profile_results profiles steps {PROFILE_WAIT + 3}-{PROFILE_WAIT + 6}, "
                  f"this run ended at step {self.step}", flush=True)

    def summary(self):
        """summary.json's fields; the peak memory is the training steps' and the max over ranks (a collective)."""
        world, diverged = self.world, self.health.diverged
        mem = torch.tensor([self.train_mem["peak_host_bytes"], self.train_mem["peak_device_bytes"]],
                           dtype=torch.float64, device=world.device)  # NCCL reduces device tensors only
        if world.world_size > 1:
            torch.distributed.all_reduce(mem, op=torch.distributed.ReduceOp.MAX)
        return {"final_train_loss": self.last_loss, "final_val_loss": self.val_loss,
                "best_val_loss": self.best_val if math.isfinite(self.best_val) else None, "steps": self.step,
                "tokens": self.step * self.tokens_per_step, "wall_s": time.time() - self.clock.t_start,
                "diverged": diverged, "completed": self.step >= self.total_steps,
                "peak_host_bytes_per_rank": int(mem[0]), "peak_device_bytes_per_rank": int(mem[1]),
                "backend": self.run.backend, "world_size": world.world_size}


def divergence_line(run_dir, health, step):
    """Where the loss became non-finite and which checkpoint to go back to."""
    good = checkpoint.checkpoints(run_dir)
    if good and health.checked_step + 1 == step and good[-1].endswith(f"step_{health.checked_step:08d}"):
        good = good[:-1]  # the weights it holds gave the non-finite loss at this step
    branch = good and good[-1] != checkpoint.checkpoints(run_dir)[-1]  # a later one exists: a branch, its own directory
    where = (f"last good checkpoint: {good[-1]} (resume from it with a lower --learning_rate"
             f"{' and a new --run_name' if branch else ''})" if good else
             "no checkpoint was saved before it (start again with a lower --learning_rate)")
    return f"error: the loss became non-finite {health.where(step)}; {where}"


def _train(cfg, cleanup):
    run = start(cfg, cleanup)
    refuse_another_history(run)
    world = run.world
    data, _ = load_data(cfg.dataset, cfg.tokenizer, cfg.data_dir, world.is_main, world.together)
    mcfg = model_config(cfg, data.vocab_size)
    if run.trainer_state:  # before the engine writes anything (opt_config.json)
        checkpoint.check_model(run.trainer_state, mcfg)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.num_train_epochs * len(data.train)
                                                    / (run.global_batch * cfg.seq_len)))
    if finished_already(run, total_steps):
        return {**run.summary, "diverged": False}
    engine = build_engine(run, mcfg, total_steps)
    batches = Batches(data, cfg.seq_len, run.global_batch, cfg.per_device_train_batch_size, world.rank,
                      world.world_size, cfg.seed, world.device)
    step, best_val = restore(run, engine)
    if world.is_main:
        announce(run, engine, data, mcfg, total_steps)
    if cfg.debug:
        torch.autograd.set_detect_anomaly(True)
    trainer = Trainer(run, engine, batches, mcfg, total_steps, step, best_val)
    trainer.fit()
    diverged = trainer.health.diverged
    if world.is_main and not diverged:
        print(f"done: {trainer.step} steps in {time.time() - trainer.clock.t_start:.1f}s", flush=True)
    if cfg.save and not diverged:
        checkpoint.export(engine, run.run_dir, mcfg, trainer.step, total_steps)
    summary = trainer.summary()
    if world.is_main and (trainer.step >= total_steps or diverged):
        write_atomic(os.path.join(run.run_dir, "summary.json"), json.dumps(summary, indent=2).encode())
    if world.is_main and diverged:
        print(divergence_line(run.run_dir, trainer.health, trainer.step), file=sys.stderr, flush=True)
    trainer.reporter.finish(summary)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return summary


def main(argv=None):
    return exit_on_usage_error(lambda: train(parse_args(argv)))


if __name__ == "__main__":
    exit_process(1 if main()["diverged"] else 0)
