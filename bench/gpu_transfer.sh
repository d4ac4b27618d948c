#!/usr/bin/env bash
# muP transfer at GPU widths with the project's own scripts/sweep.py and
# scripts/plot_mu_scaling.py, several runs at a time on the one GPU, in one call of at most 6 minutes.
#
#   bash bench/gpu_transfer.sh            # on the device: carry data/ (bash bench/gpu_data.sh prepares it here)
#   TINY=1 bash bench/gpu_transfer.sh     # CPU: the mechanics with tiny widths, steps and grids
#
# Grid: model widths 256, 512, 1024, 2048 (8 heads of 32, 64, 128, 256; base head width 32, so muP's base
# width is 256), 4 layers, sequence 256, micro batch 16 (4,096 tokens a step), 300 steps (30 warm-up,
# cosine), muP and SP, seeds 0 and 1, on the stdlib corpus's byte tokens (prepared here: the device's
# Python is 3.12, ours 3.11; 4.3M training tokens, so a run sees under a third of them). Learning rates a
# factor 2 apart: muP 2^-12 .. 2^-5, SP 2^-13 .. 2^-6 (8 each). Where they should sit: on the CPU
# transfer figure (base width 32, 2 layers, 1,024 tokens a step) both optima were 2^-6 at the base width
# and SP's fell one step per doubling, to 2^-9 at width 256; here the base is 256 (4 layers, 4x the
# tokens a step), so muP's optimum is expected near 2^-9..2^-8 at every width, SP's there at width 256
# and about 3 steps lower at 2048: each grid keeps 2-3 rates beyond the expected optima (SP's at 2048
# may reach the low edge: the plot reports that shift as "at least"). An optimum on an edge is marked
# by the plot; move the grid with MUP_LRS / SP_LRS (log2 range, e.g. MUP_LRS=-13:-6) and rerun.
# 2 x 4 x 2 x 8 = 128 runs. Budget (an H100, bf16, eager): device work ~15 ms a step at width 2048, ~5 at
# 1024 (both likely less: ~11 and ~4 ms by FLOPs and Adam's bytes), launch-bound below (~4 ms a step; a
# run starts in ~10 s), so ~230 s of device work at most; runs go 4 at a time per group and up to 3
# groups at a time (12 processes on the 16 cores), fewer where the estimated memory would pass 85% of
# the free device memory (two width-2048 groups fit an H100). Width 4096 (EXTRA_HEAD_WIDTHS=512, seed 0 only) runs only
# if the driver's estimate says it still fits (~60 ms a step: ~250 s for its 16 runs; in a 6-minute
# call it will not); the driver stops launching at LAUNCH_STOP, stops what still runs at HARD_STOP, and
# everything is plotted and packed before BUDGET.
#
# Output under $OUT: transfer_gpu.png (mean train loss over the last quarter), transfer_gpu_val.png
# (validation loss), results.jsonl, transfer_summary.json (per width the optimal log2 lr on the grid and
# from the quadratic fit, the shift over the width range, losses at the LR best on average, whether wider
# is better there), summary.txt (environment, command, the plot's lines, driver.json), logs.tgz.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_transfer}; S=/tmp/transfer
rm -rf $S; mkdir -p "$OUT" $S/transfer $S/transfer_val /tmp/stdlib_src  # data/ holds /tmp/stdlib_src's tokens
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
HERE=$(cd "$(dirname "$0")" && pwd); cd "$HERE/.."
# the scripts import the project as installed (pip install -e .) or on PYTHONPATH; -P leaves the folder out
python3 -P -c "import mupgpt" 2>/dev/null || { echo "error: mupgpt is not importable: run pip install -e . (or export PYTHONPATH=\$PWD) in the project root" >&2; exit 2; }
TINY=${TINY:-0}
BUDGET=${BUDGET:-$(( TINY ? 900 : 330 ))}       # seconds until everything is packed (call: timeout_s 360)
LAUNCH_STOP=${LAUNCH_STOP:-$((BUDGET - 60))}    # no group expected to end after this is started
HARD_STOP=${HARD_STOP:-$((BUDGET - 30))}        # sweeps still running are stopped here
T0=$SECONDS
if (( TINY )); then  # 2 heads of 8 and 16, 1 layer, 30 steps, 3 rates each, on the CPU
    HEAD_WIDTHS=${HEAD_WIDTHS:-16,8}; MUP_LRS=${MUP_LRS:--8:-6}; SP_LRS=${SP_LRS:--9:-7}; JOBS_PER=${JOBS_PER:-1}
    MAX_PROCS=${MAX_PROCS:-2}
    model=(--n_head 2 --n_layer 1 --base_head_width 8 --seq_len 32 --per_device_train_batch_size 4 --max_steps 30
           --num_warmup_steps 3 --device cpu --precision fp32)
    drv_model=(--n_head 2 --n_layer 1 --seq_len 32 --micro_batch 4 --steps 30 --step_ms 8:5,16:5 --startup_s 5)
else
    HEAD_WIDTHS=${HEAD_WIDTHS:-256,128,64,32}; MUP_LRS=${MUP_LRS:--12:-5}; SP_LRS=${SP_LRS:--13:-6}
    JOBS_PER=${JOBS_PER:-4}; MAX_PROCS=${MAX_PROCS:-12}
    model=(--n_head 8 --n_layer 4 --base_head_width 32 --seq_len 256 --per_device_train_batch_size 16 --max_steps 300
           --num_warmup_steps 30)
    drv_model=(--n_head 8 --n_layer 4 --seq_len 256 --micro_batch 16 --steps 300)
fi
common=("${model[@]}" --lr_scheduler_type cosine --eval_interval 0 --eval_iters 4 --tokenizer bytes
        --dataset /tmp/stdlib_src --data_dir "$PWD/data" --save false)
{
    timeout 60 python3 -c "import platform, torch; print('python', platform.python_version(), '| torch', torch.__version__, '| cuda', torch.version.cuda)
print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU (cpu)')" 2>&1
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,memory.free --format=csv
    echo "commit $(git rev-parse --short HEAD 2>/dev/null) | TINY=$TINY BUDGET=$BUDGET | $(date -u +%FT%TZ) | $(nproc) cores"
    echo "grid: head widths $HEAD_WIDTHS (x ${model[1]} heads), extra ${EXTRA_HEAD_WIDTHS-512} if time allows; muP log2 lr $MUP_LRS, SP $SP_LRS; seeds ${SEEDS:-0,1}"
    echo "trainer flags: ${common[*]}"
} > $S/summary.txt 2>&1
cat $S/summary.txt
free_gb=0
if (( ! TINY )) && command -v nvidia-smi >/dev/null; then
    free_gb=$(nvidia-smi --query-gpu=memory.free --format=csv,noheader,nounits | head -1 | awk '{printf "%d", $1 * 0.85 / 1024}')
fi
# the runs: sweep.py groups packed onto the GPU until the deadlines (seconds from the driver's start)
left=$((BUDGET - (SECONDS - T0)))
timeout -k 10 $((HARD_STOP + 25 - (SECONDS - T0))) python3 bench/gpu_transfer_driver.py --root $S \
    --head_widths "$HEAD_WIDTHS" --extra_head_widths "${EXTRA_HEAD_WIDTHS-512}" --mup_lrs="$MUP_LRS" --sp_lrs="$SP_LRS" \
    --seeds "${SEEDS:-0,1}" --jobs $JOBS_PER --max_procs $MAX_PROCS --mem_gb $free_gb "${drv_model[@]}" \
    --launch_stop_s $((LAUNCH_STOP - (SECONDS - T0))) --hard_stop_s $((HARD_STOP - (SECONDS - T0))) \
    -- "${common[@]}" 2>&1 | tee $S/driver.log
# one results.jsonl from the groups' own, then the project's plot (its summary: the optimum per width on the
# grid and from the quadratic fit, the shift over the width range, 'at_least' where it leaves the grid)
cat $S/parts/*/results.jsonl > $S/transfer/results.jsonl 2>/dev/null
cp $S/transfer/results.jsonl $S/transfer_val/
echo "$(wc -l < $S/transfer/results.jsonl) runs in results.jsonl" | tee -a $S/summary.txt
{
    echo "== mean train loss over the last quarter"
    timeout 60 python3 scripts/plot_mu_scaling.py $S/transfer --n_head ${model[1]} --out $S/transfer/transfer_gpu.png
    echo "== validation loss"
    timeout 60 python3 scripts/plot_mu_scaling.py $S/transfer_val --metric val_loss --n_head ${model[1]} \
        --out $S/transfer_val/transfer_gpu_val.png
    cat $S/driver.json
} 2>&1 | tee -a $S/summary.txt
cp $S/transfer/results.jsonl $S/summary.txt "$OUT/"
cp $S/transfer/transfer_summary.json "$OUT/" 2>/dev/null
cp $S/transfer_val/transfer_summary.json "$OUT/transfer_summary_val.json" 2>/dev/null
cp $S/transfer/transfer_gpu.png $S/transfer_val/transfer_gpu_val.png "$OUT/" 2>/dev/null
# every run's log, metrics, config and summary (no checkpoints: --save false)
tar czf "$OUT/logs.tgz" -C $S driver.log driver.json parts 2>/dev/null
ls -la "$OUT"
echo "done in $((SECONDS - T0))s"
