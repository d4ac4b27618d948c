#!/usr/bin/env bash
# Each engine on one GPU at GPT-2 124M's shape (issue #15), in one call: every run logs every step's loss
# and tokens/s (median over steps 21-40 in summary.txt, losses at steps 1-40 to compare backends on the
# same seed and batches); `cprofile` jobs add a host-side Python profile, single_compile_prof
# torch.profiler's tables for steps 13-16 (--print_profile_results). Everything lands in $OUT/profile.tgz.
#
# The GPU machine has no `datasets` to read text files, so prepare byte tokens here and carry data/:
#   split a text into >= 11 files under /tmp/shakes_src (e.g. ../shared/data/tinyshakespeare.txt in 100 parts)
#   python3 scripts/prepare_data.py --dataset /tmp/shakes_src --tokenizer bytes --data_dir data
# There the run finds them by the same path (an empty /tmp/shakes_src is made below).
#   JOBS="single_compile zero3_deepcompile" BUDGET=480 bash bench/gpu_profile.sh
#   SHAPE=1.3b JOBS="single_compile zero3_deepcompile fsdp_compile" bash bench/gpu_profile.sh   # 24 x 2048, micro batch 8
set -uo pipefail
OUT=${OUT:-/tmp/gpu_profile}; L=/tmp/prof; rm -rf $L /tmp/runs; mkdir -p "$OUT" $L /tmp/shakes_src  # data/ holds its byte tokens
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TORCH_CUDA_ARCH_LIST=9.0
g=(--n_layer 12 --n_head 12 --head_width 64 --base_head_width 64 --seq_len 1024 --vocab_size 50304 --precision bf16
   --per_device_train_batch_size 16 --tokenizer bytes --dataset /tmp/shakes_src --data_dir data --log_interval 1
   --eval_interval 0 --eval_iters 2 --save false --output_dir /tmp/runs --seed 1234 --max_steps ${STEPS:-40})
one() {  # name timeout [cprofile] -- trainer flags
    local name=$1 t=$2 prof=$3; shift 4
    local start=$(date +%s) left=$((deadline - SECONDS))
    [ $t -gt $left ] && t=$left
    if [ "$prof" = cprofile ]; then
        RANK=0 LOCAL_RANK=0 WORLD_SIZE=1 LOCAL_WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=29511 \
        timeout -k 5 $t python3 -c "import cProfile, sys, run_trainer; p = cProfile.Profile(); p.enable()
try: run_trainer.main(sys.argv[1:])
finally: p.disable(); p.dump_stats('$L/$name.prof')" "${g[@]}" --run_name $name "$@" > $L/$name.log 2>&1
    else
        RANK=0 LOCAL_RANK=0 WORLD_SIZE=1 LOCAL_WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=29511 \
        MUPGPT_PROFILE_TRACE=$L/$name.trace.json timeout -k 5 $t python3 run_trainer.py "${g[@]}" --run_name $name "$@" > $L/$name.log 2>&1
    fi
    local rc=$?
    python3 - "$name" "$rc" "$(( $(date +%s) - start ))" <<'PY' | tee -a $L/summary.txt
import json, statistics, sys
name, rc, wall = sys.argv[1:]
try:
    rows = [json.loads(l) for l in open(f"/tmp/runs/{name}/metrics.jsonl")]
except OSError:
    rows = []
rows = [r for r in rows if "tokens_per_s" in r]
late = [r for r in rows if r["step"] > 20] or rows[len(rows) // 2:]
tps = statistics.median(r["tokens_per_s"] for r in late) if late else 0
mfu = statistics.median(r["mfu"] or 0 for r in late) if late else 0
loss = " ".join(f"{r['loss']:.4f}" for r in rows if r["step"] in (1, 10, 20, 30, 40))
print(f"{name:28s} rc={rc:>3} wall={wall:>4}s tok/s={tps:>9,.0f} mfu={100 * mfu:4.1f}% losses@1,10,20,30,40: {loss}")
PY
}
python3 -c "import torch, deepspeed; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'deepspeed', deepspeed.__version__, torch.cuda.get_device_name(0))" > $L/env.txt 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv >> $L/env.txt
cat $L/env.txt
EXTRA=${EXTRA:-}
if [ "${SHAPE:-124m}" = 1.3b ]; then  # GPT-3 XL's shape (issue #15's 1.3B comparisons): 24 x 2048, 16 heads of 128
    g+=(--n_layer 24 --n_head 16 --head_width 128 --base_head_width 128 --per_device_train_batch_size 8)
fi
deadline=$((SECONDS + ${BUDGET:-500}))  # leave time to pack the results before the call's limit
for job in ${JOBS:-single_compile zero1_eager zero3_eager zero3_deepcompile zero2_eager llama_compile fsdp_compile single_eager}; do
    [ $SECONDS -ge $deadline ] && { echo "skipped $job: out of time" | tee -a $L/summary.txt; continue; }
    case $job in
    single_compile)    one $job 150 plain -- --backend single --compile ;;
    single_compile_prof) one $job 150 trace -- --backend single --compile --print_profile_results ;;
    single_eager)      one $job 60 plain -- --backend single ;;
    zero1_eager)       one $job 80 plain -- --backend deepspeed --zero_stage 1 ;;
    zero2_eager)       one $job 80 plain -- --backend deepspeed --zero_stage 2 ;;
    zero3_eager)       one $job 90 plain -- --backend deepspeed --zero_stage 3 ;;
    zero3_eager_cprof) one $job 90 cprofile -- --backend deepspeed --zero_stage 3 ;;
    # DeepCompile with evaluations between steps, a checkpoint and a resume (compare dc_resume's steps 21-30 with dc_full's)
    dc_full)           one $job 300 plain -- --backend deepspeed --zero_stage 3 --compile --max_steps 30 --eval_interval 10 --save true --save_interval 20 ;;
    dc_resume)         one $job 300 plain -- --backend deepspeed --zero_stage 3 --compile --max_steps 30 --eval_interval 10 --save true --resume /tmp/runs/dc_full/checkpoints/step_00000020 ;;
    fsdp_compile_prof) one $job 120 plain -- --backend fsdp --compile --print_profile_results ;;
    fsdp_compile_cprof) one $job 90 cprofile -- --backend fsdp --compile ;;
    zero3_deepcompile) one $job 200 plain -- --backend deepspeed --zero_stage 3 --compile ;;
    fsdp_compile)      one $job 150 plain -- --backend fsdp --compile ;;
    llama_compile)     one $job 150 plain -- --backend single --arch llama --compile ;;
    esac
done
gzip -f $L/*.trace.json 2>/dev/null
for r in /tmp/runs/*/; do cp "$r/metrics.jsonl" "$L/$(basename "$r").metrics.jsonl" 2>/dev/null; done
tar czf "$OUT/profile.tgz" -C $L . && ls -la "$OUT"
cat $L/summary.txt
