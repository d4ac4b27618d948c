#!/usr/bin/env bash
# The engines on one GPU at GPT-2 124M's shape (12 x 768, seq 1024, vocab 50304,
# bf16, micro batch 16) and 1.3B's (24 x 2048, 16 heads of 128, micro batch 8), in one call. Every run
# logs every step's loss and tokens/s; bench/gpu_summary.py turns the metrics into a table: median
# tokens/s over steps 21-40, ratio to single compiled at the same shape, MFU, losses over steps 1-30
# against single eager's (max difference), GPU-busy time of the profiled runs, and DeepCompile's
# whole-run checks. Jobs run one at a time (never two on the GPU at once: the timings are the point),
# in priority order, each under `timeout -k`; a job that cannot finish before the deadline is skipped
# and listed, and everything is packed into $OUT before the call's limit.
#
#   bash bench/gpu_profile.sh          # PART=1, 7 min: single --compile, ZeRO-3 eager, FSDP2 --compile at 1.3B (the
#                                      #   last two profiled), the same and single eager at 124M; zero3_noleaf
#   PART=2 bash bench/gpu_profile.sh   # 9 min: DeepCompile at 124M and its whole run (eval, accumulation, checkpoint, resume, export)
#   PART=3 bash bench/gpu_profile.sh   # 7 min: DeepCompile and single eager at 1.3B, ZeRO-1 at both, zero3_gran
# (all of it does not fit one call: DeepCompile alone compiles for ~3 minutes per run at 124M on an H100).
# A part's ratios and loss differences need single compiled / single eager at the same shape: where a part
# has none (1.3B single eager is in part 3, to keep part 1 inside 7 minutes) they are blank on the device;
# `python3 bench/gpu_summary.py part1_dir part2_dir ...` joins the calls afterwards (same device only).
#   JOBS="single_compile@124m zero3_deepcompile@1.3b" BUDGET=480 bash bench/gpu_profile.sh
#   TINY=1 bash bench/gpu_profile.sh          # CPU: the mechanics with a tiny model, every job as `--backend single`
#
# A job is NAME@SHAPE (SHAPE: 124m, 1.3b, dc; without @ the SHAPE variable, default 124m). Names:
#   single_compile single_eager single_compile_prof fsdp_compile fsdp_compile_prof zero1_eager zero2_eager
#   zero3_eager zero3_eager_prof zero3_deepcompile zero3_noleaf zero3_gran llama_compile
#   dc_full dc_resume zero3_eager_cprof fsdp_compile_cprof
# `_prof` jobs add --print_profile_results (steps 13-16 profiled; steps 21-40 still give the tokens/s),
# `_cprof` ones a host-side cProfile. zero3_noleaf is the shipped ZeRO-3 config without its leaf modules;
# zero3_gran is that with stage3_module_granularity_threshold=$GRAN (default 1000000). dc_full / dc_resume
# (shape dc: 124M's width, $DC_LAYERS=4 layers, micro batch 8) are DeepCompile's whole run: evaluations
# every 10 steps, gradient accumulation 2, a checkpoint at step 20, 30 steps and the final export; dc_resume
# resumes from dc_full's step-20 checkpoint, and its steps 21-30 must match dc_full's within bf16 noise.
#
# On the device: carry data/ and .whl/ (bash ../shared/tools/device-wheels.sh), prepare the tokens here first:
#   bash bench/gpu_data.sh          # tinyshakespeare in 100 parts -> /tmp/shakes_src -> data/ (byte tokens)
# There the run finds them by the same path (an empty /tmp/shakes_src is made below).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_profile}; L=/tmp/prof; R=/tmp/runs
rm -rf $L $R; mkdir -p "$OUT" $L $R /tmp/shakes_src
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
HERE=$(cd "$(dirname "$0")" && pwd); cd "$HERE/.."  # run_trainer.py, ds_configs/ and data/ are read from the root
TINY=${TINY:-0}
PART=${PART:-1}
STEPS=${STEPS:-40}
# seconds for the jobs; the summary and packing take < 15 s after it. Run the call with timeout_s
# BUDGET + 60 (the wheels' install and the environment lines come first): 440 (PART 1, 3), 550 (PART 2).
case $PART in 2) BUDGET=${BUDGET:-490} ;; *) BUDGET=${BUDGET:-380} ;; esac
deadline=$((SECONDS + BUDGET))
(( TINY )) && echo "TINY=1: a tiny model on the CPU, every job as --backend single (mechanics only, no timings)"

g=(--n_layer 12 --n_head 12 --head_width 64 --base_head_width 64 --seq_len 1024 --vocab_size 50304 --precision bf16
   --per_device_train_batch_size 16 --tokenizer bytes --dataset /tmp/shakes_src --data_dir data --log_interval 1
   --eval_interval 0 --eval_iters 2 --save false --output_dir $R --seed 1234 --max_steps $STEPS)
shape_flags() {
    case $1 in
    124m) ;;  # g's own
    1.3b) echo --n_layer 24 --n_head 16 --head_width 128 --base_head_width 128 --per_device_train_batch_size 8 ;;
    dc)   echo --n_layer ${DC_LAYERS:-4} --per_device_train_batch_size 8 ;;
    *)    echo "unknown shape $1" >&2; return 1 ;;
    esac
    (( TINY )) && echo --n_layer 2 --n_head 2 --head_width 16 --base_head_width 16 --seq_len 64 --vocab_size 320 \
        --per_device_train_batch_size 8 --precision fp32 --device cpu
    return 0
}
# A job's wall time on an H100 (bench/results/h100_engines_20261125/summary.txt at 124M; 1.3B and dc
# guessed from them): a job is started only when at least this much time is left; and its timeout cap.
est() {  # job shape -> "need cap"
    local j=${1%_prof}; j=${j%_cprof}
    case $j@$2 in
    single_compile@124m) echo 60 150 ;;   single_compile@1.3b) echo 100 200 ;;
    single_eager@124m)   echo 25 60 ;;    single_eager@1.3b)   echo 35 90 ;;
    fsdp_compile@124m)   echo 40 120 ;;   fsdp_compile@1.3b)   echo 60 150 ;;
    zero3_eager@124m|zero3_noleaf@124m|zero3_gran@124m) echo 35 90 ;;
    zero3_eager@1.3b|zero3_noleaf@1.3b|zero3_gran@1.3b) echo 60 150 ;;
    zero1_eager@124m|zero2_eager@124m) echo 28 80 ;;  zero1_eager@1.3b|zero2_eager@1.3b) echo 45 100 ;;
    zero3_deepcompile@124m) echo 190 300 ;; zero3_deepcompile@1.3b) echo 250 400 ;;
    llama_compile@*) echo 70 150 ;;
    dc_full@*|dc_resume@*) echo 110 280 ;;
    *) echo 60 150 ;;
    esac
}
noleaf_config() {  # the shipped ZeRO-3 config without its leaf modules (each submodule fetched on its own)
    python3 -c "import json; c = json.load(open('$HERE/../ds_configs/zero3.json')); z = c['zero_optimization']
z.pop('leaf_module'); json.dump(c, open('/tmp/zero3_noleaf.json', 'w'), indent=1)"
}
gran_config() {  # no leaf modules: DeepSpeed's module granularity threshold picks them instead
    python3 -c "import json, sys; c = json.load(open('$HERE/../ds_configs/zero3.json')); z = c['zero_optimization']
z.pop('leaf_module'); z['stage3_module_granularity_threshold'] = int(sys.argv[1])
json.dump(c, open('/tmp/zero3_gran.json', 'w'), indent=1)" "${GRAN:-1000000}"
}

one() {  # job shape env [cprofile|trace|plain] -- trainer flags
    local job=$1 shape=$2 envs=$3 prof=$4; shift 5
    local name=${job}_${shape//./p} start=$SECONDS left=$((deadline - SECONDS)) need cap
    read need cap < <(est $job $shape)
    (( TINY )) && need=1
    if (( left < need )); then
        printf '%s\t%s\t%s\tskipped\t0\t%s\tout of time: %ss left, needs ~%ss\n' "$name" "$job" "$shape" "$envs" $left $need >> $L/jobs.tsv
        echo "skipped $name: out of time (${left}s left, needs ~${need}s)"; return
    fi
    local t=$(( cap < left ? cap : left ))
    local -a flags=("${g[@]}" $(shape_flags $shape) --run_name $name "$@")
    if (( TINY )); then  # every engine as the single backend, eager: the script's mechanics, not the engines
        local -a keep=(); local skip=0
        for f in "${flags[@]}"; do
            if (( skip )); then skip=0; continue; fi
            case $f in --backend|--zero_stage|--ds_config) skip=1 ;; --compile) ;; *) keep+=("$f") ;; esac
        done
        flags=("${keep[@]}" --backend single)
    fi
    local -a envv=(RANK=0 LOCAL_RANK=0 WORLD_SIZE=1 LOCAL_WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=29511 $envs)
    echo "== $name (timeout ${t}s, ${left}s left): $envs ${*}"
    if [ "$prof" = cprofile ]; then
        env "${envv[@]}" timeout -k 5 $t python3 -c "import cProfile, sys, run_trainer; p = cProfile.Profile(); p.enable()
try: run_trainer.main(sys.argv[1:])
finally: p.disable(); p.dump_stats('$L/$name.prof')" "${flags[@]}" > $L/$name.log 2>&1
    else
        local tr=(); [ "$prof" = trace ] && [ "${TRACE:-0}" = 1 ] && tr=(MUPGPT_PROFILE_TRACE=$L/$name.trace.json)
        env "${envv[@]}" "${tr[@]}" timeout -k 5 $t python3 run_trainer.py "${flags[@]}" > $L/$name.log 2>&1
    fi
    local rc=$?
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$job" "$shape" $rc $((SECONDS - start)) "$envs" "$*" >> $L/jobs.tsv
    cp $R/$name/metrics.jsonl $L/$name.metrics.jsonl 2>/dev/null
    cp $R/$name/config.json $L/$name.config.json 2>/dev/null
    cp $R/$name/summary.json $L/$name.summary.json 2>/dev/null
    (cd $R && find $name -maxdepth 3 | sort) > $L/$name.files.txt 2>/dev/null
    [ $rc -ne 0 ] && tail -5 $L/$name.log
    python3 "$HERE/gpu_summary.py" "$L" --line "$name"
}

{
    timeout 60 python3 -c "import platform, torch; print('python', platform.python_version(), '| torch', torch.__version__, '| cuda', torch.version.cuda)
print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU (cpu)')
try:
    import deepspeed; print('deepspeed', deepspeed.__version__)
except Exception as e:
    print('no deepspeed:', type(e).__name__, e)" 2>&1 | grep -v WARNING
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    echo "commit $(git -C "$HERE/.." rev-parse --short HEAD 2>/dev/null) | PART=$PART TINY=$TINY STEPS=$STEPS BUDGET=$BUDGET | $(date -u +%FT%TZ)"
} > $L/env.txt 2>&1
cat $L/env.txt
printf 'name\tjob\tshape\trc\twall_s\tenv\tflags\n' > $L/jobs.tsv

case $PART in
1) default="single_compile@1.3b zero3_eager_prof@1.3b fsdp_compile_prof@1.3b
            single_compile@124m single_eager@124m zero3_eager@124m fsdp_compile@124m zero3_noleaf@1.3b zero3_noleaf@124m" ;;
2) default="zero3_deepcompile@124m dc_full@dc dc_resume@dc" ;;
3) default="zero3_deepcompile@1.3b single_eager@1.3b zero1_eager@1.3b zero1_eager@124m 
            zero3_gran@1.3b zero3_gran@124m" ;;
*) echo "PART must be 1, 2 or 3" >&2; exit 2 ;;
esac
plan=0; for spec in ${JOBS:-$default}; do
    shape=${SHAPE:-124m}; [[ $spec == *@* ]] && shape=${spec#*@}
    read need cap < <(est ${spec%@*} $shape); plan=$((plan + need))
done
echo "plan: ${JOBS:-$default}" | tr -s ' \n' ' '; echo
echo "  ~${plan}s estimated on an H100 (before skips) against a budget of ${BUDGET}s; jobs that do not fit are skipped and listed"
for spec in ${JOBS:-$default}; do
    job=${spec%@*}; shape=${SHAPE:-124m}; [[ $spec == *@* ]] && shape=${spec#*@}
    name=${job}_${shape//./p}
    if [ $SECONDS -ge $deadline ]; then
        printf '%s\t%s\t%s\tskipped\t0\t\tout of time\n' "$name" "$job" "$shape" >> $L/jobs.tsv; echo "skipped $name: out of time"; continue
    fi
    case $job in
    single_compile)    one $job $shape "" plain -- --backend single --compile ;;
    single_compile_prof) one $job $shape "" trace -- --backend single --compile --print_profile_results ;;
    single_eager)      one $job $shape "" plain -- --backend single ;;
    zero1_eager)       one $job $shape "" plain -- --backend deepspeed --zero_stage 1 ;;
    zero2_eager)       one $job $shape "" plain -- --backend deepspeed --zero_stage 2 ;;
    zero3_eager)       one $job $shape "" plain -- --backend deepspeed --zero_stage 3 ;;
    zero3_eager_prof)  one $job $shape "" trace -- --backend deepspeed --zero_stage 3 --print_profile_results ;;
    zero3_eager_cprof) one $job $shape "" cprofile -- --backend deepspeed --zero_stage 3 ;;
    zero3_noleaf)      noleaf_config && one $job $shape "" plain -- --backend deepspeed --zero_stage 3 --ds_config /tmp/zero3_noleaf.json ;;
    zero3_gran)        gran_config && one $job $shape "" plain -- --backend deepspeed --zero_stage 3 --ds_config /tmp/zero3_gran.json ;;
    zero3_deepcompile) one $job $shape "" plain -- --backend deepspeed --zero_stage 3 --compile ;;
    # DeepCompile's whole run: evaluations between steps, accumulation 2, a checkpoint at 20, the export at 30
    dc_full)           one $job $shape "" plain -- --backend deepspeed --zero_stage 3 --compile --max_steps 30 \
                           --train_batch_size 16 --eval_interval 10 --save true --save_interval 20 ;;
    dc_resume)         one $job $shape "" plain -- --backend deepspeed --zero_stage 3 --compile --max_steps 30 \
                           --train_batch_size 16 --eval_interval 10 --save true --resume $R/dc_full_${shape//./p}/checkpoints/step_00000020 ;;
    fsdp_compile)      one $job $shape "" plain -- --backend fsdp --compile ;;
    fsdp_compile_prof) one $job $shape "" trace -- --backend fsdp --compile --print_profile_results ;;
    fsdp_compile_cprof) one $job $shape "" cprofile -- --backend fsdp --compile ;;
    llama_compile)     one $job $shape "" plain -- --backend single --arch llama --compile ;;
    *) echo "unknown job $job" | tee -a $L/jobs.tsv ;;
    esac
done
# pack: the summary as files of their own (readable in the reply), the rest in one archive (the device
# tool brings back at most 8 files of 16 MiB); traces (TRACE=1) in their own archive, dropped if too big
python3 "$HERE/gpu_summary.py" "$L" --out "$L/summary.md" --json "$L/summary.json" > /dev/null
cp $L/summary.md $L/summary.json $L/jobs.tsv $L/env.txt "$OUT/"
gzip -f $L/*.trace.json 2>/dev/null
tar czf "$OUT/profile.tgz" -C $L --exclude='*.trace.json.gz' .
if ls $L/*.trace.json.gz >/dev/null 2>&1; then
    tar cf "$OUT/traces.tar" -C $L $(cd $L && ls *.trace.json.gz)
    [ $(stat -c %s "$OUT/traces.tar") -gt 15000000 ] && { echo "traces.tar over 15 MB: dropped"; rm -f "$OUT/traces.tar"; }
fi
ls -la "$OUT"
cat $L/summary.md
