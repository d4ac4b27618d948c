#!/usr/bin/env bash
# The GPU figures of bench/RESULTS.md, on one GPU. Run from the project root with the byte tokens of
# the stdlib corpus prepared in data/ (python scripts/prepare_data.py --tokenizer bytes) and, for the
# side-by-side row, a nanoGPT checkout at ref/nanoGPT (never committed):
#
#   bash bench/gpu.sh throughput   # GPT-2 124M shape: single, FSDP2, ZeRO-3 (DeepCompile) with compile; nanoGPT; fp16 checks
# (bench/gpu_profile.sh: every engine in one call, with per-step losses)
#   bash bench/gpu.sh largest 32x4096 24x4096   # ZeRO-3 + CPU offload, the first size (layers x width) that trains 10 steps
#   DS_CONFIG=ds_configs/zero3_offload_cpu_partial.json bash bench/gpu.sh largest 32x4096   # part of Adam on the GPU
#   bash bench/gpu.sh checks       # exactness on the GPU: partial vs full offload, checkpoint_in_cpu, FSDP2 fp16
#
# Results: bench/results/*.json and logs under ${OUT:-bench/results/gpu_logs}.
set -uo pipefail
# the scripts import the project as installed (pip install -e .) or on PYTHONPATH; -P leaves the folder out
python3 -P -c "import mupgpt" 2>/dev/null || { echo "error: mupgpt is not importable: run pip install -e . (or export PYTHONPATH=\$PWD) in the project root" >&2; exit 2; }
OUT=${OUT:-bench/results/gpu_logs}
mkdir -p "$OUT" bench/results
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 - <<'EOF' | tee "$OUT/environment.txt"
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
try:
    import deepspeed; print("deepspeed", deepspeed.__version__)
except ImportError as e:
    print("no deepspeed:", e)
print(torch.cuda.get_device_name(0), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee -a "$OUT/environment.txt"
free -g | tee -a "$OUT/environment.txt"

dev=$(python3 -c "import torch; print(torch.cuda.get_device_name(0).split()[1].lower() if torch.cuda.is_available() else 'cpu')")
# print a run's logged losses after a label, and keep them in $OUT/$3
losses() {
    python3 -c "import json,sys; r=[json.loads(l) for l in open(sys.argv[1])]; print(sys.argv[2], ' '.join(f'{x[\"loss\"]:.6f}' for x in r if 'loss' in x))" \
        "$1/metrics.jsonl" "$2" | tee -a "$OUT/$3"
}
gpt2_124m=(--n_layer 12 --n_head 12 --head_width 64 --seq_len 1024 --vocab_size 50304 --precision bf16)

case "${1:-}" in
throughput)
    ref=$( [ -d ref/nanoGPT ] && echo --reference ref/nanoGPT )
    timeout 270 python3 bench/bench.py --name ${dev}_gpt2_124m_compile --backends single,fsdp "${gpt2_124m[@]}" \
        --batch 16 --compile --steps 50 --warmup 20 --repeats 1 $ref 2>&1 | tee "$OUT/compile.log" | tail -6
    # fp16 with dynamic loss scaling: the single backend (GradScaler) and DeepSpeed ZeRO-2/3, against bf16
    small=(--n_layer 4 --n_head 4 --head_width 64 --seq_len 256 --max_steps 60 --log_interval 10 --eval_interval 0
           --tokenizer bytes --save false --output_dir /tmp/fp16runs --lr 3e-3)
    for run in "single bf16" "single fp16" "deepspeed fp16 2" "deepspeed fp16 3" "deepspeed bf16 3"; do
        set -- $run
        timeout 60 python3 run_trainer.py "${small[@]}" --backend "$1" --precision "$2" \
            ${3:+--zero_stage $3} --run_name "$1_$2${3:-}" > "$OUT/fp16_$1_$2${3:-}.log" 2>&1 \
            || echo "$run failed: $(tail -3 "$OUT/fp16_$1_$2${3:-}.log")"
        losses "/tmp/fp16runs/$1_$2${3:-}" "$run" fp16_summary.txt
    done
    timeout 130 python3 bench/bench.py --name ${dev}_gpt2_124m_zero3_compile --backends deepspeed_zero3 \
        "${gpt2_124m[@]}" --batch 16 --compile --steps 50 --warmup 20 --repeats 1 2>&1 | tee "$OUT/zero3_compile.log" | tail -4
    timeout 100 python3 bench/bench.py --name ${dev}_gpt2_124m_eager --backends single,deepspeed_zero3 \
        "${gpt2_124m[@]}" --batch 16 --steps 30 --warmup 10 --repeats 1 2>&1 | tee "$OUT/eager.log" | tail -5
    ;;
largest)
    shift
    for size in "$@"; do
        layers=${size%x*}; width=${size#*x}
        echo "== ZeRO-3 + CPU offload: $layers layers x $width wide"
        (while sleep 5; do free -m | awk '/Mem/ {print $3}'; done) > "$OUT/largest_${size}_host_used_mib.txt" &
        sampler=$!
        (while sleep 3; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits; done) \
            > "$OUT/largest_${size}_device_used_mib.txt" &
        device_sampler=$!
        offload=(--offload cpu); [ -n "${DS_CONFIG:-}" ] && offload=(--ds_config "$DS_CONFIG")
        timeout ${LARGEST_TIMEOUT:-480} python3 run_trainer.py --backend deepspeed --zero_stage 3 "${offload[@]}" \
            --n_layer "$layers" --n_head $((width / 128)) --head_width 128 --base_head_width 128 --seq_len 1024 \
            --vocab_size 50304 --per_device_train_batch_size 1 --gradient_checkpointing --max_steps 10 \
            --log_interval 1 --eval_interval 0 --eval_iters 1 --tokenizer bytes --save false \
            --output_dir /tmp/largest --run_name "L${layers}_W${width}" > "$OUT/largest_${size}.log" 2>&1
        rc=$?
        kill $sampler $device_sampler
        echo "host memory used, max over 5 s samples: $(sort -n "$OUT/largest_${size}_host_used_mib.txt" | tail -1) MiB"
        echo "device memory used (nvidia-smi), max over 3 s samples: $(sort -n "$OUT/largest_${size}_device_used_mib.txt" | tail -1) MiB"
        grep -E "params|step +[0-9]+/|done|Error|error|Killed" "$OUT/largest_${size}.log" | tail -20
        cp "/tmp/largest/L${layers}_W${width}/summary.json" "$OUT/largest_${size}_summary.json" 2>/dev/null
        [ $rc -eq 0 ] && break
        echo "rc=$rc"
    done
    ;;
checks)
    # ZeRO-3 + CPU offload in fp32: all of Adam offloaded, part of it kept on the GPU (many small
    # sub-groups so both sides hold some), and with activation checkpoints in host memory
    tiny=(--backend deepspeed --zero_stage 3 --precision fp32 --n_layer 2 --n_head 2 --head_width 32 --seq_len 64
          --per_device_train_batch_size 4 --max_steps 10 --num_warmup_steps 5 --lr 1e-2 --log_interval 1
          --eval_interval 0 --eval_iters 1 --tokenizer bytes --save false --output_dir /tmp/checks)
    python3 -c "import json; c=json.load(open('ds_configs/zero3_offload_cpu_partial.json')); z=c['zero_optimization']; z['sub_group_size']=2000; z['offload_optimizer']['ratio']=0.5; json.dump(c, open('/tmp/partial_small.json', 'w'))"
    for run in "full --offload cpu" "partial --ds_config /tmp/partial_small.json" "ckpt_in_cpu --offload cpu --gradient_checkpointing"; do
        set -- $run
        name=$1; shift
        python3 run_trainer.py "${tiny[@]}" "$@" --run_name "$name" > "$OUT/checks_$name.log" 2>&1 \
            || echo "$name failed: $(tail -3 "$OUT/checks_$name.log")"
        losses "/tmp/checks/$name" "$name" checks.txt
    done
    # FSDP2 in fp16 (ShardedGradScaler) and bf16 on one GPU, the fp16 runs' model and steps
    small=(--n_layer 4 --n_head 4 --head_width 64 --seq_len 256 --max_steps 60 --log_interval 10 --eval_interval 0
           --tokenizer bytes --save false --output_dir /tmp/checks --lr 3e-3)
    for p in fp16 bf16; do
        torchrun --nproc_per_node 1 run_trainer.py "${small[@]}" --backend fsdp --precision $p --run_name fsdp_$p \
            > "$OUT/checks_fsdp_$p.log" 2>&1 || echo "fsdp $p failed: $(tail -3 "$OUT/checks_fsdp_$p.log")"
        losses "/tmp/checks/fsdp_$p" "fsdp $p" checks.txt
    done
    ;;
*)
    echo "usage: bash bench/gpu.sh throughput | largest LAYERSxWIDTH... | checks" >&2; exit 2 ;;
esac
cp bench/results/${dev}_*.json "$OUT/" 2>/dev/null
true
