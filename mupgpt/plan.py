"""What a run on N GPUs delivers, per engine, before anyone rents them: memory per GPU (mupgpt.memory), and
a step time built from a roofline of FLOPs and memory traffic, the bytes each engine moves over the links it
crosses, the overlap the engine allows, and the host work it adds per step. docs/planner.md gives every formula
with its source."""
from dataclasses import dataclass
from types import SimpleNamespace

from mupgpt.errors import UsageError, did_you_mean
from mupgpt.memory import GIB, count_params, estimate

# name -> (peak dense bf16 TFLOP/s, memory GiB, NVLink GB/s per direction, PCIe GB/s per direction, HBM GB/s);
# sources in docs/planner.md
GPUS = {
    "H100": (989.0, 80.0, 450.0, 64.0, 3350.0),
    "H200": (989.0, 141.0, 450.0, 64.0, 4800.0),
    "A100": (312.0, 80.0, 300.0, 32.0, 2039.0),
    "B200": (2250.0, 180.0, 900.0, 64.0, 8000.0),
}
INTER_GBPS = 50.0  # one 400 Gb/s InfiniBand or RoCE port per GPU
HOST_GBPS = 50.0  # a GPU's share of its host's DRAM bandwidth, for the CPU Adam of offloaded runs

# The fractions of a data sheet's figure that each kind of kernel reaches, from the profiles of the project's single
# backend, compiled, at GPT-2 124M's shape (bench/RESULTS.md; docs/planner.md derives each): the matmuls' of peak
# FLOP/s, the flash-attention kernels' of peak (on the bench's attention FLOP count), and the fused AdamW's of HBM
# bandwidth, which stands for every memory-bound kernel. The same for every GPU and model size.
MATMUL_EFFICIENCY = 0.76
ATTENTION_EFFICIENCY = 0.44
BANDWIDTH_EFFICIENCY = 0.75
ADAMW_BYTES = 28  # per parameter: fp32 weight, gradient and two moments read; weight and moments written

# Host work per step that the device waits for, in ms, at GPT-2 124M's shape (12 blocks and the head: 13 groups):
# each engine's step time on one GPU less the device's busy time, from bench/RESULTS.md's GPU sections
# (docs/planner.md lists the runs each comes from). It scales with the number of groups, since it is each
# block's hooks and bookkeeping.
HOST_OVERHEAD_MS = {"DDP": 3.3, "ZeRO-1": 34.1, "ZeRO-2": 38.3, "ZeRO-3": 158.6, "FSDP2": 34.9}
HOST_OVERHEAD_GROUPS = 13

# engine -> (ZeRO stage, FSDP2's layout, CPU offload, takes a shard group smaller than the world)
ENGINES = {
    "DDP": (0, False, False, False),
    "ZeRO-1": (1, False, False, False),
    "ZeRO-2": (2, False, False, False),
    "ZeRO-3": (3, False, False, True),
    "ZeRO-3 offload": (3, False, True, True),
    "FSDP2": (3, True, False, True),
}


@dataclass
class Cluster:
    gpus_per_node: int
    nodes: int
    peak_tflops: float
    memory_gib: float
    intra_gbps: float
    inter_gbps: float
    pcie_gbps: float
    host_gbps: float
    mfu: float  # 0: the roofline of compute_times; above 0, the one fraction of peak every FLOP runs at
    hbm_gbps: float

    @property
    def world(self):
        return self.gpus_per_node * self.nodes


def cluster(gpu, gpus_per_node, nodes, peak_tflops=0.0, gpu_memory_gb=0.0, intra_gbps=0.0, inter_gbps=INTER_GBPS,
            pcie_gbps=0.0, host_gbps=HOST_GBPS, mfu=0.0, hbm_gbps=0.0):
    """A Cluster from a GPU name in GPUS (or 'custom' with peak and memory given); a value given overrides it."""
    for name, value in (("gpus_per_node", gpus_per_node), ("nodes", nodes)):
        if value < 1:
            raise UsageError(f"--{name} must be at least 1, not {value}")
    gpu = {name.lower(): name for name in GPUS}.get(gpu.lower(), gpu)  # h100 is H100
    if gpu not in GPUS and gpu != "custom":
        raise UsageError(f"--gpu {gpu} is not one of {', '.join(GPUS)}{did_you_mean(gpu, list(GPUS))}: "
                         "or pass --gpu custom with --peak_tflops, --gpu_memory_gb and --hbm_gbps")
    peak, mem, intra, pcie, hbm = GPUS.get(gpu, (0.0, 0.0, 0.0, 0.0, 0.0))
    c = Cluster(gpus_per_node, nodes, peak_tflops or peak, gpu_memory_gb or mem, intra_gbps or intra or inter_gbps,
                inter_gbps, pcie_gbps or pcie or 16.0, host_gbps, mfu, hbm_gbps or hbm)
    needed = [("peak_tflops", c.peak_tflops), ("gpu_memory_gb", c.memory_gib), ("intra_gbps", c.intra_gbps),
              ("inter_gbps", c.inter_gbps), ("host_gbps", c.host_gbps)] + ([] if mfu else [("hbm_gbps", c.hbm_gbps)])
    for name, value in needed:
        if value <= 0:
            raise UsageError(f"--{name} must be above 0, not {value}" + (" (--gpu custom needs it)" if gpu == "custom"
                                                                          else ""))
    if not 0 <= mfu <= 1:
        raise UsageError(f"--mfu is a fraction in (0, 1] (or 0 for the roofline), not {mfu}")
    return c


def flops_per_token(model):
    """(matmul, attention) FLOPs of one token's forward and backward: 6 x the matmul weights (the readout counted,
    embedding lookups not) and 12 x layers x width x sequence for the attention scores and their weighted sum (the
    bench's MFU convention); each x 4/3 with activation checkpointing, which runs each block's forward again in the
    backward."""
    n_params, cfg, layer = count_params(model)
    recompute = 4 / 3 if model.gradient_checkpointing else 1
    matmul = 6 * (cfg.n_layer * layer + cfg.vocab_size * cfg.width)
    return matmul * recompute, 12 * cfg.n_layer * cfg.width * model.seq_len * recompute


def block_values(cfg):
    """Values per token that one block's memory-bound kernels read and write, (forward, backward), each op reading
    its inputs and writing its output once (as a compiled step fuses them). Forward: two norms (x in, y out), two
    residual adds (2 in, 1 out), the MLP's activation (GELU 1 in 1 out; SwiGLU's silu(gate) x up 2 in 1 out) and
    llama's RoPE on q and k (1 in 1 out). Backward: each norm and activation reads its saved inputs and the output's
    gradient and writes its inputs' gradients; each residual add sums the branch's gradient into the stream's; RoPE
    rotates the gradient back."""
    h, f, kv = cfg.width, cfg.mlp_hidden, cfg.n_kv_head * cfg.head_width
    fwd, bwd = 2 * 2 * h + 2 * 3 * h, 2 * 3 * h + 2 * 3 * h
    if cfg.arch == "llama":
        return fwd + 3 * f + 2 * (h + kv), bwd + 5 * f + 2 * (h + kv)
    return fwd + 2 * f, bwd + 3 * f


def memory_bytes_per_token(model):
    """(forward, backward) bytes per token of the memory-bound kernels: every block's (block_values), again in the
    backward under activation checkpointing, plus the final norm and the loss over the V logits (forward reads them;
    backward reads them and writes their gradient), in the activation dtype."""
    n_params, cfg, layer = count_params(model)
    a = 4 if model.precision == "fp32" else 2
    fwd, bwd = block_values(cfg)
    recompute = fwd if model.gradient_checkpointing else 0
    h, V = cfg.width, cfg.vocab_size
    return a * (cfg.n_layer * fwd + 2 * h + V), a * (cfg.n_layer * (bwd + recompute) + 3 * h + 2 * V)


def compute_times(model, c, optimizer_params):
    """Seconds of one step's device work on one GPU: {fwd, bwd, optimizer} and the roofline's terms. Matmul and
    attention FLOPs run at their measured fractions of peak, the memory-bound kernels' bytes and AdamW's over the
    rank's optimizer_params at BANDWIDTH_EFFICIENCY of HBM; the terms add (one kernel runs at a time). With --mfu
    every FLOP runs at that fraction of peak instead, the optimizer inside it."""
    tokens = model.batch * model.seq_len
    matmul, attention = flops_per_token(model)
    fwd_share = 1 / 4 if model.gradient_checkpointing else 1 / 3  # the forward's share of the FLOPs
    peak, bandwidth = c.peak_tflops * 1e12, c.hbm_gbps * 1e9 * BANDWIDTH_EFFICIENCY
    if c.mfu:
        total = tokens * (matmul + attention) / (peak * c.mfu)
        return {"fwd": total * fwd_share, "bwd": total * (1 - fwd_share), "optimizer": 0.0, "matmul_s": None,
                "attention_s": None, "memory_s": None}
    t_matmul = tokens * matmul / (peak * MATMUL_EFFICIENCY)
    t_attention = tokens * attention / (peak * ATTENTION_EFFICIENCY)
    mem_fwd, mem_bwd = (tokens * b / bandwidth for b in memory_bytes_per_token(model))
    flops_fwd = (t_matmul + t_attention) * fwd_share
    return {"fwd": flops_fwd + mem_fwd, "bwd": t_matmul + t_attention - flops_fwd + mem_bwd,
            "optimizer": ADAMW_BYTES * optimizer_params / bandwidth, "matmul_s": t_matmul,
            "attention_s": t_attention, "memory_s": mem_fwd + mem_bwd}


def ring(kind, nbytes, n):
    """Bytes a rank sends in a ring collective over n ranks on a buffer of nbytes (NCCL's bus bandwidth rule):
    all-gather and reduce-scatter (n-1)/n, all-reduce 2(n-1)/n."""
    return (2 if kind == "all-reduce" else 1) * nbytes * (n - 1) / n


def collectives(engine, P, w, K, R):
    """(kind, phase, bytes per rank, group) for one step of `engine` on P parameters, weights of w bytes, shard
    groups of K ranks and R replicas of each shard. Phases: fwd, bwd (overlappable with that pass) and after
    (exposed). Dtypes as the trainer runs them: DDP all-reduces fp32 gradients (the weights are fp32 under
    autocast), DeepSpeed communicates in the weight dtype, FSDP2 gathers in it and reduces in fp32."""
    stage, fsdp, _offload, _ = ENGINES[engine]
    out = []
    if stage == 0:
        return [("all-reduce", "bwd", ring("all-reduce", 4 * P, K), "shard")]
    grad_bytes = 4 if fsdp else w
    if stage == 3 and not fsdp and R > 1:
        # DeepSpeed's hpZ: the partition over every rank stays; a second copy partitioned K ways serves the
        # backward's gathers inside the group, while the forward gather and the gradient reduce-scatter span
        # all K x R ranks, and the replicas need no all-reduce
        n = K * R
        return [("all-gather", "fwd", ring("all-gather", w * P, n), "world"),
                ("all-gather", "bwd", ring("all-gather", w * P, K), "shard"),
                ("reduce-scatter", "bwd", ring("reduce-scatter", grad_bytes * P, n), "world")]
    if stage == 3:
        out.append(("all-gather", "fwd", ring("all-gather", w * P, K), "shard"))
        out.append(("all-gather", "bwd", ring("all-gather", w * P, K), "shard"))
    # ZeRO-1 ships without overlap_comm (its reduce waits for the backward); ZeRO-2 and ZeRO-3 overlap it
    out.append(("reduce-scatter", "after" if stage == 1 else "bwd", ring("reduce-scatter", grad_bytes * P, K), "shard"))
    if stage in (1, 2):
        out.append(("all-gather", "after", ring("all-gather", w * P, K), "shard"))
    if R > 1:
        out.append(("all-reduce", "bwd", ring("all-reduce", grad_bytes * P / K, R), "replica"))
    return out


def spans_nodes(c, K, group):
    """Whether a group crosses nodes, ranks numbered node by node: a shard group is K consecutive ranks, a
    replica group every K-th rank."""
    R = c.world // K
    if group == "world":
        return c.world > c.gpus_per_node
    span = K if group == "shard" else K * (R - 1) + 1
    return span > c.gpus_per_node if group == "shard" else R > 1 and span > c.gpus_per_node


def shard_groups(c, engine, pinned=0):
    """Shard group sizes to try: the whole world, and for ZeRO-3 and FSDP2 (hybrid sharding) every size that
    divides the world and either divides a node or is whole nodes."""
    if not ENGINES[engine][3]:
        return [c.world]
    if pinned:
        return [pinned]
    sizes = {k for k in range(2, c.world + 1) if c.world % k == 0
             and (c.gpus_per_node % k == 0 or k % c.gpus_per_node == 0)}
    return sorted(sizes | {c.world})


def memory_args(model, engine, K, world):
    """The estimator's arguments: FSDP2's hybrid sharding holds what K ranks hold; DeepSpeed's hpZ keeps
    the partition over every rank (its second copy is added in plan_row)."""
    stage, fsdp, offload, _ = ENGINES[engine]
    return SimpleNamespace(**vars(model), world_size=K if fsdp else world, stage=stage, fsdp=fsdp,
                           offload="cpu" if offload else "none", offload_ratio=1.0)


def optimizer_shard(engine, P, K, world):
    """Parameters whose AdamW step one GPU runs: all of them under DDP, none with CPU offload (the host runs it),
    FSDP2's shard over its group of K, DeepSpeed's partition over every rank."""
    stage, fsdp, offload, _ = ENGINES[engine]
    if offload:
        return 0.0
    return P if stage == 0 else P / (K if fsdp else world)


def plan_row(model, c, engine, K):
    """One engine and shard group size on cluster c: its memory and step time terms (seconds)."""
    mem = estimate(memory_args(model, engine, K, c.world))
    P, n_layer = mem["params"], model.n_layer
    w = 4 if model.precision == "fp32" else 2
    R = c.world // K
    hpz_copy = w * P / K if ENGINES[engine][0] == 3 and not ENGINES[engine][1] and R > 1 else 0.0
    tokens = model.batch * model.seq_len
    times = compute_times(model, c, optimizer_shard(engine, P, K, c.world))
    window = {"fwd": times["fwd"], "bwd": times["bwd"]}
    compute = times["fwd"] + times["bwd"] + times["optimizer"]
    comm = {"fwd": 0.0, "bwd": 0.0, "after": 0.0}
    inter_bytes = 0.0
    for kind, phase, nbytes, group in collectives(engine, P, w, K, R):
        crosses = spans_nodes(c, K, group)
        inter_bytes += nbytes if crosses else 0.0
        comm[phase] += nbytes / ((c.inter_gbps if crosses else c.intra_gbps) * 1e9)
    groups = n_layer + 1
    # overlapped traffic shows where it outlasts its pass, plus one group's share that nothing can hide (the
    # first gather before the forward, the last reduce after the backward)
    exposed = comm["after"] + sum(max(0.0, comm[p] - window[p]) + comm[p] / groups for p in ("fwd", "bwd"))
    offload = 0.0
    if ENGINES[engine][2]:  # gradients (fp32) out and weights back over PCIe, Adam on the host, not overlapped
        offload = (4 + w) * P / K / (c.pcie_gbps * 1e9) + 30 * P / K / (c.host_gbps * 1e9)
    base = engine.split(" ")[0]
    host = HOST_OVERHEAD_MS[base] / 1000 * groups / HOST_OVERHEAD_GROUPS
    step = compute + exposed + offload + host
    return {"engine": engine, "shard_group": K, "replicas": R,
            "memory_gib": (mem["per_rank_device_bytes"] + hpz_copy) / GIB,
            "host_gib": mem["per_rank_host_bytes"] / GIB, "params": P, "compute_s": compute,
            "matmul_s": times["matmul_s"], "attention_s": times["attention_s"], "memory_s": times["memory_s"],
            "optimizer_s": times["optimizer"],
            "comm_s": sum(comm.values()), "exposed_comm_s": exposed, "offload_s": offload, "host_s": host,
            "step_s": step, "inter_node_bytes": inter_bytes, "tokens_per_s_per_gpu": tokens / step}


def plan(model, c, token_budget=0.0, shard_group_size=0, engines=None):
    """Every engine and shard group size that fits c's memory, fastest first, with the time to the budget."""
    if shard_group_size and (shard_group_size < 1 or c.world % shard_group_size):
        raise UsageError(f"--shard_group_size {shard_group_size} must divide the {c.world} GPUs")
    rows = []
    for engine in engines or ENGINES:
        for K in shard_groups(c, engine, shard_group_size):
            row = plan_row(model, c, engine, K)
            if row["memory_gib"] <= c.memory_gib:
                row["hours_to_budget"] = token_budget / (row["tokens_per_s_per_gpu"] * c.world) / 3600
                rows.append(row)
    return sorted(rows, key=lambda r: r["step_s"])


def smallest_memory(model, c):
    """The engine and GiB per GPU of the least memory-hungry choice (for the message when nothing fits)."""
    best = min(((plan_row(model, c, e, c.world)["memory_gib"], e) for e in ENGINES))
    return best[1], best[0]


def human_hours(hours):
    if hours >= 48:
        return f"{hours / 24:.1f} d"
    return f"{hours:.1f} h" if hours >= 1 else f"{hours * 60:.0f} min"


def model_summary(model):
    return (f"{model.arch} {model.n_layer} x {model.n_head * model.head_width}, seq {model.seq_len}, "
            f"batch {model.batch} per GPU, {model.precision}"
            + (", activation checkpointing" if model.gradient_checkpointing else ""))


def check_model(model):
    """Sizes below 1 are refused in one line, named as the trainer's flags."""
    names = {"batch": "per_device_train_batch_size", "vocab": "vocab_size"}
    for flag in ("n_layer", "n_head", "head_width", "vocab", "seq_len", "batch"):
        if getattr(model, flag) < 1:
            raise UsageError(f"--{names.get(flag, flag)} must be at least 1, not {getattr(model, flag)}")
