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

from mup_model import GPTConfig
from mupgpt import checkpoint
from mupgpt.config import check_config, parse_args
from mupgpt.data import Batches, load_data
from mupgpt.engines.base import count_params
from mupgpt.engines.factory import build
from mupgpt.errors import UsageError, exit_on_usage_error
from mupgpt.metrics import Reporter, disk_error, duration, flops_per_token, peak_flops, peak_memory, write_atomic
from mupgpt.optim import schedule_kwargs
from mupgpt.rundir import read_summary, refuse_a_branch, refuse_a_second_run, run_directory, run_lock
from mupgpt.world import exit_process, init_world, resolve_backend, resolve_device, resolve_precision


def model_config(cfg, vocab_size):
    if cfg.vocab_size and cfg.vocab_size < vocab_size:
        raise UsageError(f"--vocab_size {cfg.vocab_size} is smaller than the tokenizer's {vocab_size}: "
                         "drop it or give at least that")
    vocab_size = 64 * math.ceil(max(vocab_size, cfg.vocab_size) / 64)
    try:
        return GPTConfig(vocab_size=vocab_size, block_size=cfg.seq_len, n_layer=cfg.n_layer, n_head=cfg.n_head,
                         head_width=cfg.head_width, parametrization=cfg.parametrization,
                         base_head_width=cfg.base_head_width, base_width=cfg.base_width, base_n_layer=cfg.base_n_layer,
                         depth_alpha=cfg.depth_alpha, init_std=cfg.init_std, output_mult=cfg.output_mult,
                         attn_mult=cfg.attn_mult, readout_zero_init=cfg.readout_zero_init,
                         query_zero_init=cfg.query_zero_init, arch=cfg.arch, n_kv_head=cfg.n_kv_head,
                         mlp_hidden=cfg.mlp_hidden)
    except ValueError as e:
        raise UsageError(str(e)) from None


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


def _train(cfg, cleanup):
    check_config(cfg)
    model_config(cfg, 0)  # the width and schedule flags fail here too, before any process group or file exists
    schedule_kwargs(cfg, cfg.max_steps or None)
    backend = resolve_backend(cfg)
    run_dir = run_directory(cfg, backend)
    device_type = resolve_device(cfg)
    precision = resolve_precision(cfg, backend, device_type)
    G, accum = global_batch(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    ds_cfg = None
    if backend == "deepspeed":
        from mupgpt.engines.deepspeed_zero import check_op_build_locks, ds_config
        ds_cfg = ds_config(cfg, precision, G, accum, cfg.n_head * cfg.head_width)
        check_op_build_locks()  # before DeepSpeed builds or loads its ops (init_distributed does, on CPU)
    world = init_world(backend, device_type)
    cleanup.enter_context(run_lock(run_dir, world))  # before anything in the run directory is read or written
    summary = read_summary(run_dir)
    resume_path = checkpoint.find_resume(cfg.resume, run_dir)
    trainer_state = checkpoint.read_trainer_state(resume_path) if resume_path else None
    if trainer_state and cfg.resume not in ("", "auto") and os.path.realpath(cfg.resume) == os.path.realpath(resume_path) \
            and checkpoint.in_run_dir(resume_path, run_dir):  # a step folder of this run directory, named
        step = int(trainer_state["step"])
        done = summary.get("steps") if summary.get("completed") and isinstance(summary.get("steps"), int) else 0
        later = max([checkpoint.step_of(c) for c in checkpoint.checkpoints(run_dir)] + [done])
        refuse_a_branch(run_dir, resume_path, step, later)
    if not cfg.resume:
        refuse_a_second_run(run_dir, bool(checkpoint.checkpoints(run_dir)))

    data, tokenizer = load_data(cfg.dataset, cfg.tokenizer, cfg.data_dir, world.is_main, world.barrier)
    mcfg = model_config(cfg, data.vocab_size)
    if trainer_state:  # before the engine writes anything (opt_config.json)
        checkpoint.check_model(trainer_state, mcfg)
    tokens_per_step = G * cfg.seq_len
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.num_train_epochs * len(data.train) / tokens_per_step))
    if trainer_state and trainer_state["step"] >= total_steps:
        if summary.get("completed") and checkpoint.in_run_dir(resume_path, run_dir):
            # a finished run stays finished: its summary, metrics and model are left as they are
            if world.is_main:
                print(f"{run_dir} holds a finished run ({summary.get('steps')} steps): nothing to resume, it is left "
                      "as it is (to train it further, give a larger --max_steps)", flush=True)
            return {**summary, "diverged": False}
        if trainer_state["step"] > total_steps:
            raise UsageError(f"{resume_path} is at step {trainer_state['step']}, past this run's {total_steps} steps: "
                             "give a larger --max_steps (or --num_train_epochs) to resume it")

    try:
        engine = build(backend, cfg, mcfg, world, precision, total_steps, ds_cfg, run_dir if world.is_main else None)
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:  # the model's own memory, on host or device
        if not isinstance(e, (torch.OutOfMemoryError, MemoryError)) and "allocate" not in str(e):
            raise
        raise UsageError(f"the model (--n_layer {cfg.n_layer}, --n_head {cfg.n_head} x --head_width {cfg.head_width}, "
                         f"{world.device.type}) does not fit in memory ({str(e).splitlines()[0][:160]}): lower --n_layer "
                         "or --head_width, or shard it (--backend fsdp or deepspeed --zero_stage 3)") from None
    n_params = count_params(engine.model)
    batches = Batches(data, cfg.seq_len, G, cfg.per_device_train_batch_size, world.rank, world.world_size,
                      cfg.seed, world.device)

    step, best_val = 0, float("inf")
    if resume_path:
        checkpoint.restore(engine, resume_path, trainer_state, backend)
        step, best_val = trainer_state["step"], trainer_state.get("best_val_loss", float("inf"))
        if world.is_main:
            print(f"resumed from {resume_path} at step {step}", flush=True)
            for aside in checkpoint.set_aside_later(run_dir, step) if checkpoint.in_run_dir(resume_path, run_dir) else []:
                print(f"note: moved the skipped checkpoint aside to {aside}: this run's history goes on from step {step}",
                      flush=True)
    if world.is_main:
        resolved = {"backend": backend, "precision": precision, "world_size": world.world_size,
                    "train_batch_size": G, "gradient_accumulation_steps": accum, "total_steps": total_steps,
                    "device": str(world.device), "n_params": n_params, "data": data.meta,
                    "model": dataclasses.asdict(mcfg), "width_mult": mcfg.width_mult, "torch": torch.__version__}
        write_atomic(os.path.join(run_dir, "config.json"),
                     json.dumps({"args": dataclasses.asdict(cfg), "resolved": resolved}, indent=2).encode())
        print(f"{backend} | {world.world_size} rank(s) on {world.device} | {precision} | {n_params / 1e6:.2f}M params "
              f"| width {mcfg.width} = {mcfg.n_head}x{mcfg.head_width}, base {mcfg.base_width} = "
              f"{mcfg.base_width // mcfg.base_head_width}x{mcfg.base_head_width} (m={mcfg.width_mult:g}, "
              f"{cfg.parametrization}) | batch {G}x{cfg.seq_len} "
              f"(accum {accum}) | {total_steps} steps | run dir {run_dir}", flush=True)

    if cfg.debug:
        torch.autograd.set_detect_anomaly(True)
    profiler = start_profiler() if cfg.print_profile_results else None
    reporter = Reporter(run_dir, cfg, world.is_main, step)
    flops_token = flops_per_token(mcfg)
    peak = peak_flops(world.device) * world.world_size
    stop = StopFlag()
    t_start = t_log = time.time()
    start_step, paused = step, 0.0  # paused: evaluation, checkpoint and logging time, left out of the ETA
    # a resume at the run's last step (killed before its summary) reports the losses logged before it
    last_log_step, last_loss, val_loss, diverged = step, reporter.last.get("loss", float("nan")), reporter.last.get("val_loss"), False
    # every loss and grad norm since the last check was finite; read back only on log and save steps.
    # fp16 loss scaling overflows the grad norm on purpose (that step is skipped), and DeepSpeed's ZeRO-0
    # reports no grad norm (NaN here): there only the loss counts
    finite, checked_step = torch.ones((), dtype=torch.bool, device=world.device), step
    check_norm = precision != "fp16" and not (ds_cfg and ds_cfg["zero_optimization"]["stage"] == 0)
    train_mem = peak_memory(world.device)
    while step < total_steps:
        loss, grad_norm = engine.train_step(batches.train(step))
        step += 1
        stop.announce()
        finite &= torch.isfinite(loss)
        if check_norm:
            finite &= torch.isfinite(torch.as_tensor(grad_norm, device=finite.device))
        if profiler is not None:
            profiler = step_profiler(profiler, world.is_main)
        row = None
        log_now = step % cfg.log_interval == 0 or step == total_steps or step == 1
        save_due = cfg.save and ((cfg.save_interval and step % cfg.save_interval == 0) or step == total_steps)
        eval_due = (cfg.eval_interval and step % cfg.eval_interval == 0) or step == total_steps
        stopping = False
        if log_now or save_due or eval_due or (world.world_size == 1 and stop.requested):
            synced = sync(loss, grad_norm, finite, stop.requested, world)
            diverged, stopping = not synced.finite, synced.stop
            checked_step = checked_step if diverged else step
        if log_now or diverged:
            last_loss = synced.loss
            dt = time.time() - t_log
            tps = (step - last_log_step) * tokens_per_step / max(dt, 1e-9)
            mfu = flops_token * tps / peak if peak else None  # no known peak (CPU): no MFU
            elapsed = time.time() - t_start
            eta = (elapsed - paused) / (step - start_step) * (total_steps - step)
            row = {"step": step, "loss": last_loss, "lr": engine.lr(), "grad_norm": synced.grad_norm,
                   "tokens": step * tokens_per_step, "tokens_per_s": tps, "mfu": mfu, "elapsed_s": elapsed, "eta_s": eta}
            line = (f"step {step:>6}/{total_steps} | loss {last_loss:.4f} | lr {engine.lr():.3e} | "
                    f"{tps:,.0f} tok/s" + (f" | mfu {100 * mfu:.1f}%" if mfu is not None else "")
                    + f" | {duration(elapsed)} elapsed, ETA {duration(eta)}")
            t_log, last_log_step = time.time(), step
            train_mem = peak_memory(world.device)  # before any eval, checkpoint or export at this step
        t_pause = time.time()  # evaluation, logging and checkpoints are not counted as training time
        if eval_due or diverged:
            val_loss = evaluate(engine, batches, cfg.eval_iters) if not diverged else float("nan")
            best_val = min(best_val, val_loss) if math.isfinite(val_loss) else best_val
            row = row or {"step": step, "tokens": step * tokens_per_step}
            row["val_loss"] = val_loss
            line = (line if "loss" in row else f"step {step:>6}/{total_steps}") + f" | val {val_loss:.4f}"
        if row:
            reporter.log(row, line)
        stopping = stopping or diverged
        save_due = save_due or (cfg.save and stopping)  # a stop request's checkpoint (the sync checked the weights)
        if save_due and not diverged:  # never a checkpoint of a diverged model
            path = checkpoint.save(engine, run_dir, {"step": step, "best_val_loss": best_val, "backend": backend,
                                                          "world_size": world.world_size}, cfg.keep_checkpoints)
            if stopping and world.is_main:
                print(f"stopped at step {step}; resume with --resume auto (checkpoint {path})", flush=True)
        pause = time.time() - t_pause
        t_log += pause  # the interval's start moves with it (not reset: its steps still count)
        paused += pause
        if stopping or diverged:
            break

    if profiler is not None:  # the run ended before the profiled steps
        profiler.stop()
        if world.is_main:
            print(f"note: no profile: --print_profile_results profiles steps {PROFILE_WAIT + 3}-{PROFILE_WAIT + 6}, "
                  f"this run ended at step {step}", flush=True)
    if world.is_main and not diverged:
        print(f"done: {step} steps in {time.time() - t_start:.1f}s", flush=True)
    if cfg.save and not diverged:
        checkpoint.export(engine, run_dir, mcfg, step, total_steps)
    mem_t = torch.tensor([train_mem["peak_host_bytes"], train_mem["peak_device_bytes"]], dtype=torch.float64,
                         device=world.device)  # NCCL reduces device tensors only
    if world.world_size > 1:
        torch.distributed.all_reduce(mem_t, op=torch.distributed.ReduceOp.MAX)
    summary = {"final_train_loss": last_loss, "final_val_loss": val_loss,
               "best_val_loss": best_val if math.isfinite(best_val) else None, "steps": step,
               "tokens": step * tokens_per_step, "wall_s": time.time() - t_start, "diverged": diverged,
               "completed": step >= total_steps, "peak_host_bytes_per_rank": int(mem_t[0]),
               "peak_device_bytes_per_rank": int(mem_t[1]),  # training steps only: max over ranks
               "backend": backend, "world_size": world.world_size}
    if world.is_main and (step >= total_steps or diverged):
        write_atomic(os.path.join(run_dir, "summary.json"), json.dumps(summary, indent=2).encode())
    if world.is_main and diverged:
        when = f"at step {step}" if checked_step + 1 == step else f"between steps {checked_step + 1} and {step}"
        good = checkpoint.checkpoints(run_dir)
        if good and checked_step + 1 == step and good[-1].endswith(f"step_{checked_step:08d}"):
            good = good[:-1]  # the weights it holds gave the non-finite loss at this step
        branch = good and good[-1] != checkpoint.checkpoints(run_dir)[-1]  # a later one exists: a branch, its own directory
        where = (f"last good checkpoint: {good[-1]} (resume from it with a lower --learning_rate"
                 f"{' and a new --run_name' if branch else ''})" if good else
                 "no checkpoint was saved before it (start again with a lower --learning_rate)")
        print(f"error: the loss became non-finite {when}; {where}", file=sys.stderr, flush=True)
    reporter.finish(summary)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return summary


def main(argv=None):
    return exit_on_usage_error(lambda: train(parse_args(argv)))


if __name__ == "__main__":
    exit_process(1 if main()["diverged"] else 0)
