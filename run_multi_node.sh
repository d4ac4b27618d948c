#!/usr/bin/env bash
# Launch mupgpt across the nodes of a hostfile over passwordless SSH.
#
#   ./run_multi_node.sh HOSTFILE NGPU_PER_NODE NUM_NODES SINGLE_RUN [extra trainer flags]
#
#   SINGLE_RUN=True   one run over NUM_NODES x NGPU_PER_NODE ranks (deepspeed runner + pdsh)
#   SINGLE_RUN=False  a width x LR sweep, runs packed NGPU_PER_NODE at a time onto each node
#
# HOSTFILE is DeepSpeed's format (`host slots=N`, # comments), or `slurm` inside a SLURM allocation.
# Environment:
#   LAUNCHER=deepspeed|torchrun   torchrun: no pdsh needed; one torchrun per node over ssh (c10d rendezvous)
#   BACKEND=fsdp|ddp              the trainer backend under torchrun (default fsdp)
#   MASTER_PORT                   default: derived from the hostfile and arguments (deterministic)
#   SSH_ARGS                      extra ssh options (e.g. "-i key -o StrictHostKeyChecking=no"), also given to pdsh
#   SSH_PARALLEL, SSH_TIMEOUT     nodes checked at once (default 64) and seconds each may take (default 15)
#   SWEEP_WIDTHS, SWEEP_LRS, SWEEP_PARAMETRIZATIONS, SWEEP_SEEDS, SWEEP_DEPTHS, SWEEP_STEPS,
#   SWEEP_BATCH_SIZES, SWEEP_DIR, or
#   SWEEP_FILE                    a file of KEY=VALUE lines with those keys
#   DRY_RUN=1                     print the commands instead of running them
# Variables forwarded to every rank: PYTHONPATH, WANDB_*, NCCL_*, GLOO_*, TP_SOCKET_IFNAME, DS_ACCELERATOR,
# OMP_NUM_THREADS (and, under the deepspeed runner, those it forwards itself). Their values are never
# printed. Secrets (*_API_KEY, *TOKEN*, *SECRET*, *PASSWORD*) never go on a command line either: they reach
# each node over ssh's stdin (under the deepspeed runner into a 0600 file there, which removes itself when
# the node's launch has read it, before training starts).
set -euo pipefail

die() { echo "error: $*" >&2; exit 2; }
usage="usage: $0 HOSTFILE NGPU_PER_NODE NUM_NODES SINGLE_RUN [extra trainer flags] (see --help)"
if [[ ${1:-} == -h || ${1:-} == --help ]]; then
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
  exit 0
fi
[ $# -ge 4 ] || die "$usage"
hostfile=$1 ngpu=$2 nnodes=$3 single=$4
shift 4
[[ $ngpu =~ ^[1-9][0-9]*$ ]] || die "NGPU_PER_NODE must be a positive integer, not '$ngpu'"
[[ $nnodes =~ ^[1-9][0-9]*$ ]] || die "NUM_NODES must be a positive integer, not '$nnodes'"
case ${single,,} in
  true) single=true ;;
  false) single=false ;;
  *) die "SINGLE_RUN must be True or False, not '$single'" ;;
esac
launcher=${LAUNCHER:-deepspeed}
[[ $launcher == deepspeed || $launcher == torchrun ]] || die "LAUNCHER must be deepspeed or torchrun, not '$launcher'"
[[ ${BACKEND:-fsdp} == fsdp || ${BACKEND:-fsdp} == ddp ]] || die "BACKEND must be fsdp or ddp, not '$BACKEND'"
[ -z "${MASTER_PORT:-}" ] || { [[ $MASTER_PORT =~ ^[1-9][0-9]{0,4}$ ]] && [ "$MASTER_PORT" -le 65535 ]; } ||
  die "MASTER_PORT must be a port number (1-65535), not '$MASTER_PORT'"
repo=$(cd "$(dirname "$0")" && pwd)
python=$(python3 -c 'import sys; print(sys.executable)')  # the real interpreter, not a shim
read -r -a ssh_args <<< "${SSH_ARGS:-}"
if $single && [[ $launcher == deepspeed ]]; then  # its runner writes `cd CHECKOUT; PYTHON -u ...` unquoted for pdsh
  for path in "$repo" "$python"; do
    [[ $path =~ ^[A-Za-z0-9_@+=:,./-]*$ ]] || die "the path '$path' has a character (a space, %, a quote ...) that the deepspeed runner passes unquoted to the nodes: use a plain path, or LAUNCHER=torchrun"
  done
fi

# --- hosts: from the hostfile (validated) or from SLURM ---------------------------------------
hosts=()
if [[ $hostfile == slurm ]]; then
  [ -n "${SLURM_JOB_NODELIST:-}" ] || die "HOSTFILE 'slurm' needs SLURM_JOB_NODELIST: run inside salloc/sbatch"
  command -v scontrol >/dev/null || die "HOSTFILE 'slurm' needs scontrol on PATH (run on a SLURM node)"
  mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
else
  [ -f "$hostfile" ] || die "hostfile '$hostfile' not found: write one 'host slots=N' line per node (see hostfile.example)"
  declare -A seen=()
  lineno=0
  while IFS= read -r line || [ -n "$line" ]; do
    lineno=$((lineno + 1))
    line=${line%%#*}
    line=${line//$'\r'/}  # a hostfile written on Windows
    set -f; words=($line); set +f  # split on blanks without globbing (a here-string per line is slow)
    [ ${#words[@]} -eq 0 ] && continue
    host=${words[0]}
    [ ${#words[@]} -eq 2 ] && [[ ${words[1]} =~ ^slots=([0-9]+)$ ]] ||
      die "$hostfile line $lineno: expected 'host slots=N', got '${line}'"
    slots=${BASH_REMATCH[1]}
    # a bounded repeat ({0,251}) compiles slowly on every line: the length is checked apart
    [[ ${#host} -le 253 && ( $host =~ ^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$ || $host =~ ^[0-9A-Fa-f:]+$ ) ]] ||
      die "$hostfile line $lineno: '$host' is not a plain host name or address"
    [ -z "${seen[$host]:-}" ] || die "$hostfile line $lineno: host '$host' is listed twice"
    seen[$host]=1
    # only the first NUM_NODES hosts run, so only they need the slots
    [ ${#hosts[@]} -ge "$nnodes" ] || [ "$slots" -ge "$ngpu" ] ||
      die "$hostfile line $lineno: $host has slots=$slots, fewer than NGPU_PER_NODE=$ngpu"
    hosts+=("$host")
  done < "$hostfile"
fi
[ ${#hosts[@]} -ge "$nnodes" ] || die "the hostfile names ${#hosts[@]} host(s), fewer than NUM_NODES=$nnodes"
hosts=("${hosts[@]:0:$nnodes}")
master=${hosts[0]}
port=${MASTER_PORT:-$((29500 + $(printf '%s ' "${hosts[@]}" "$ngpu" "$nnodes" "$single" | cksum | cut -d' ' -f1) % 2000))}

run() {  # print (DRY_RUN) or run a command
  if [ "${DRY_RUN:-0}" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}

# --- passwordless SSH to every node, before anything starts ----------------------------------
# Nodes are checked SSH_PARALLEL at a time and each check is bounded by SSH_TIMEOUT, so a hostfile of
# hundreds of nodes is checked in seconds and a node that hangs is named instead of holding the launch.
parallel=${SSH_PARALLEL:-64}
ssh_timeout=${SSH_TIMEOUT:-15}
[[ $parallel =~ ^[1-9][0-9]*$ ]] || die "SSH_PARALLEL must be a positive integer, not '$parallel'"
[[ $ssh_timeout =~ ^[1-9][0-9]*$ ]] || die "SSH_TIMEOUT must be a positive integer (seconds), not '$ssh_timeout'"
unreachable() {  # prints each host in "$@" that `ssh HOST true` fails on, in order, a slow one marked
  local targets=("$@") pids=() running=0 i code
  for ((i = 0; i < ${#targets[@]}; i++)); do
    if ((running >= parallel)); then wait -n || true; running=$((running - 1)); fi  # a slot frees up
    timeout -k 2 "$ssh_timeout" ssh -o BatchMode=yes -o ConnectTimeout=5 "${ssh_args[@]}" "${targets[i]}" true \
      </dev/null >/dev/null 2>&1 &
    pids[i]=$!
    running=$((running + 1))
  done
  for ((i = 0; i < ${#targets[@]}; i++)); do  # bash keeps each finished job's status for its pid
    wait "${pids[i]}" && code=0 || code=$?
    case $code in
      0) ;;
      124|137) echo "${targets[i]} (no answer in ${ssh_timeout} s)" ;;
      *) echo "${targets[i]}" ;;
    esac
  done
}
if [ "${DRY_RUN:-0}" != 1 ]; then
  mapfile -t failed < <(unreachable "${hosts[@]}")
  [ ${#failed[@]} -eq 0 ] || die "passwordless ssh failed to: ${failed[*]} (check keys, sshd and 'ssh -o BatchMode=yes HOST true')"
fi

# --- the environment every rank needs: private files, never echoed ---------------------------
workdir=$(mktemp -d "${TMPDIR:-/tmp}/mupgpt-launch.XXXXXX")
node_dir=/tmp/mupgpt-secrets.${workdir##*.}  # the same path on every node
copied=()
cleanup() {
  for h in "${copied[@]}"; do
    ssh -o BatchMode=yes -o ConnectTimeout=5 "${ssh_args[@]}" "$h" "rm -rf $node_dir" </dev/null >/dev/null 2>&1 || true
  done
  rm -rf "$workdir"
}
trap cleanup EXIT
umask 077
envfile=$workdir/env        # NAME=value lines: read on each node from ssh's stdin (torchrun, sweep)
ds_env=$workdir/ds_env      # the deepspeed runner's DS_ENV_FILE: no secrets, values quoted for its "..." and pdsh
secrets=$workdir/secrets.sh # export NAME='value' lines, copied to each node for the deepspeed runner
: > "$envfile"; : > "$ds_env"; : > "$secrets"
sq() { printf -v "$1" "'%s'" "${2//\'/\'\\\'\'}"; }  # POSIX single quotes
dq() {  # text that the deepspeed runner's "..." gives back unchanged on the remote shell
  local s=${2//\\/\\\\}; s=${s//\$/\\\$}; s=${s//\`/\\\`}; printf -v "$1" '%s' "$s"
}
ds_plain='^[A-Za-z0-9_@%+=:,./-]*$'  # what the deepspeed runner passes without quoting
ds_own=()  # variables the deepspeed runner forwards by itself (PYTHON*, NCCL_* on CUDA, ...)
if $single && [[ $launcher == deepspeed ]]; then
  mapfile -t ds_own < <(python3 - 2>/dev/null <<'PY'
import os
from deepspeed.launcher.runner import EXPORT_ENVS
from deepspeed.accelerator import get_accelerator
prefixes = tuple(EXPORT_ENVS + get_accelerator().export_envs())
print("\n".join(k for k in os.environ if k.startswith(prefixes)))
PY
  )
fi
declare -A ds_forwards=()
for name in "${ds_own[@]}"; do ds_forwards[$name]=1; done
forwarded=() hidden=()
while read -r name; do
  [[ $name =~ ^(PYTHONPATH|WANDB_.*|NCCL_.*|GLOO_.*|TP_SOCKET_IFNAME|DS_ACCELERATOR|OMP_NUM_THREADS)$ ||
     -n ${ds_forwards[$name]:-} ]] || continue
  value=${!name}
  if [[ $value == *$'\n'* ]]; then hidden+=("$name"); continue; fi
  printf '%s=%s\n' "$name" "$value" >> "$envfile"
  forwarded+=("$name")
  if [[ ${name^^} =~ _API_KEY|TOKEN|SECRET|PASSWORD ]]; then
    hidden+=("$name")
    sq quoted "$value"
    printf 'export %s=%s\n' "$name" "$quoted" >> "$secrets"
  elif [[ $value =~ $ds_plain ]]; then
    printf '%s=%s\n' "$name" "${value//%/%%}" >> "$ds_env"
  else
    dq quoted "$value"
    quoted=${quoted//\"/\\\"}
    printf '%s=%s\n' "$name" "${quoted//%/%%}" >> "$ds_env"
  fi
done < <(compgen -e)
[ ${#forwarded[@]} -eq 0 ] || echo "forwarding to every rank: ${forwarded[*]}" >&2

# --- single run ------------------------------------------------------------------------------
# Each node runs the trainer in the checkout, so a relative path typed here is made absolute against this
# folder: it means on every node what it means where the user typed it. A --dataset value is a path only
# where it names something here (otherwise it is a hub name or stdlib).
if $single; then
  args=() prev=
  for a in "$@"; do
    flag=$prev value=$a
    if [[ $a == --*=* ]]; then flag=${a%%=*} value=${a#*=}; fi
    case $flag in
      --output_dir|--data_dir|--config|--ds_config|--nvme_path|--resume|--dataset)
        if [[ -n $value && $value != /* && $value != auto ]] && { [[ $flag != --dataset ]] || [ -e "$value" ]; }; then
          value=$PWD/${value#./}
          [[ $a == --*=* ]] && a=$flag=$value || a=$value
        fi ;;
    esac
    args+=("$a")
    [[ $a == --* && $a != *=* ]] && prev=$a || prev=
  done
  set -- "${args[@]}"
fi
if $single && [[ $launcher == deepspeed ]]; then
  command -v pdsh >/dev/null || [ "${DRY_RUN:-0}" = 1 ] || die "pdsh is not installed: apt-get install pdsh, or LAUNCHER=torchrun"
  dshosts=$workdir/hostfile
  for h in "${hosts[@]}"; do echo "$h slots=$ngpu"; done > "$dshosts"
  [ "${DRY_RUN:-0}" = 1 ] && dshosts=HOSTFILE.generated
  # The runner joins the trainer flags into one remote shell line, wrapping those with a space in "..."
  # (escaping only "), so each flag goes in already quoted for that line. --force_multi: that line and pdsh
  # for one node too (without it the runner starts one node's ranks here, with the flags as argv, quotes and
  # all). pdsh replaces %h, %u, %n and %% in that line (the runner's own --node_rank=%n, and our env.%h
  # below), so each % of a flag goes in as %%.
  ds_args=()
  for a in "$@"; do
    if [[ $a == *" "* ]]; then dq quoted "$a"
    elif [[ -n $a && $a =~ $ds_plain ]]; then quoted=$a
    else sq quoted "$a"; fi
    ds_args+=("${quoted//%/%%}")
  done
  # secrets: into a 0600 file on each node over ssh's stdin, sourced there before the launch; its last line
  # removes it, so it is gone before training starts. One file per node (pdsh makes %h the node's name):
  # where nodes share /tmp, the first to start would otherwise remove the others' file before they read it.
  venv=()
  if [ -s "$secrets" ]; then
    venv=(--venv_script "$node_dir/env.%h")
    if [ "${DRY_RUN:-0}" != 1 ]; then
      for h in "${hosts[@]}"; do
        copied+=("$h")
        { cat "$secrets"; echo "rm -f $node_dir/env.$h; rmdir $node_dir 2>/dev/null || :"; } |
          ssh -o BatchMode=yes "${ssh_args[@]}" "$h" "umask 077 && { mkdir $node_dir 2>/dev/null || { [ -d $node_dir ] &&
          [ ! -L $node_dir ] && [ -O $node_dir ]; }; } && cat > $node_dir/env.$h" ||
          die "could not copy the secret variables to $h over ssh"
      done
    fi
  fi
  log=$workdir/launch.log
  set +e
  (cd "$repo" && for name in "${hidden[@]}"; do unset "$name"; done &&
    DS_ENV_FILE=$ds_env PDSH_SSH_ARGS_APPEND="${SSH_ARGS:-}" \
    run deepspeed --hostfile "$dshosts" --launcher pdsh --force_multi --no_ssh_check --num_nodes "$nnodes" --num_gpus "$ngpu" \
      --master_addr "$master" --master_port "$port" "${venv[@]}" run_trainer.py "${ds_args[@]}") 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  set -e
elif $single; then  # torchrun on every node over ssh, c10d rendezvous on the first
  pids=()
  log=$workdir/launch.log
  : > "$log"
  for i in "${!hosts[@]}"; do
    # the forwarded variables come in on stdin, so no value is on any command line. --local_addr: the node that
    # rendezvous makes rank 0 tells every worker to reach it at this name; without it, at its FQDN, which is
    # `localhost` wherever /etc/hosts maps the host name to a loopback address (then the other nodes hang)
    remote="while IFS= read -r l; do export \"\$l\"; done; cd $(printf %q "$repo") && $(printf '%q ' "$python" \
      -m torch.distributed.run --nnodes "$nnodes" --nproc_per_node "$ngpu" --node_rank "$i" --rdzv_backend c10d \
      --rdzv_endpoint "$master:$port" --local_addr "${hosts[$i]}" --rdzv_id "mupgpt-$port" \
      --rdzv_conf "is_host=$([ "$i" = 0 ] && echo 1 || echo 0)" \
      run_trainer.py --backend "${BACKEND:-fsdp}" "$@")"
    if [ "${DRY_RUN:-0}" = 1 ]; then
      printf '%q ' ssh "${ssh_args[@]}" "${hosts[$i]}"; echo "[remote] $remote"
    else
      ssh -o BatchMode=yes "${ssh_args[@]}" "${hosts[$i]}" "$remote" < "$envfile" 2>&1 |
        sed "s/^/${hosts[$i]}: /" | tee -a "$log" &
      pids+=($!)
    fi
  done
  rc=0
  for p in "${pids[@]}"; do wait "$p" || rc=$?; done
else  # sweep mode
  if [ -n "${SWEEP_FILE:-}" ]; then
    [ -f "$SWEEP_FILE" ] || die "SWEEP_FILE '$SWEEP_FILE' not found"
    # KEY=VALUE lines, the last one with or without a newline. A value is kept exactly as written, spaces and #
    # included, but for the spaces around it and a comment (a # after a space); "..." or '...' keeps it all.
    declare -A given=()
    lineno=0
    while IFS= read -r line || [ -n "$line" ]; do
      lineno=$((lineno + 1))
      line=${line%$'\r'}  # a file written on Windows
      line=${line#"${line%%[![:space:]]*}"}
      [[ -z $line || $line == \#* ]] && continue
      [[ $line == *=* ]] || die "$SWEEP_FILE line $lineno: expected KEY=VALUE, got '$line'"
      key=${line%%=*} value=${line#*=}
      key=${key%"${key##*[![:space:]]}"}
      [[ $key =~ ^SWEEP_(WIDTHS|LRS|PARAMETRIZATIONS|SEEDS|DEPTHS|STEPS|BATCH_SIZES|DIR)$ ]] ||
        die "$SWEEP_FILE line $lineno: unknown key '$key' (SWEEP_WIDTHS, SWEEP_LRS, SWEEP_PARAMETRIZATIONS, SWEEP_SEEDS, SWEEP_DEPTHS, SWEEP_STEPS, SWEEP_BATCH_SIZES, SWEEP_DIR)"
      [ -z "${given[$key]:-}" ] || die "$SWEEP_FILE line $lineno: $key is given twice (first on line ${given[$key]}): keep one"
      given[$key]=$lineno
      value=${value#"${value%%[![:space:]]*}"}
      if [[ $value =~ ^\"([^\"]*)\"[[:space:]]*(#.*)?$ || $value =~ ^\'([^\']*)\'[[:space:]]*(#.*)?$ ]]; then
        value=${BASH_REMATCH[1]}
      elif [[ $value == [\"\']* ]]; then
        die "$SWEEP_FILE line $lineno: the value of $key opens a quote it does not close (or has text after it)"
      else
        [[ $value == \#* ]] && value=
        value=${value%%[[:space:]]#*}
        value=${value%"${value##*[![:space:]]}"}
      fi
      [ -n "$value" ] || die "$SWEEP_FILE line $lineno: $key has no value: give one, or drop the line for the default"
      printf -v "$key" '%s' "$value"
    done < "$SWEEP_FILE"
  fi
  sweephosts=$workdir/hostfile
  for h in "${hosts[@]}"; do echo "$h slots=$ngpu"; done > "$sweephosts"
  [ "${DRY_RUN:-0}" = 1 ] && sweephosts=HOSTFILE.generated
  set +e
  # The sweep runs in the folder it is launched from (as do its runs, on every node): relative paths after the
  # arguments and SWEEP_DIR mean what they mean there, and the sweep folder is made there, not in the checkout.
  # A variable set but empty is passed on as empty (sweep.py refuses it), not replaced by the default.
  (MUPGPT_SSH_ENV=$envfile run python3 "$repo/scripts/sweep.py" --out "${SWEEP_DIR-sweeps/multinode}" \
    --widths "${SWEEP_WIDTHS-8,16,32,64}" --lrs "${SWEEP_LRS-0.001,0.002,0.004,0.008,0.016}" \
    --parametrizations "${SWEEP_PARAMETRIZATIONS-mup,sp}" --seeds "${SWEEP_SEEDS-0}" --depths "${SWEEP_DEPTHS:-}" \
    --steps "${SWEEP_STEPS:-}" --batch_sizes "${SWEEP_BATCH_SIZES:-}" \
    --hostfile "$sweephosts" --slots_per_host "$ngpu" -- "$@")
  rc=$?
  set -e
  exit $rc
fi

# --- a failed run names its nodes ------------------------------------------------------------
if [ "${rc:-0}" -ne 0 ] && [ "${DRY_RUN:-0}" != 1 ]; then
  mapfile -t down < <(unreachable "${hosts[@]}")
  failing=$(grep -oE "pdsh@[^:]*: [^:]+: ssh exited with exit code [0-9]+" "$log" 2>/dev/null |
    awk '{print $2}' | tr -d ':' | sort -u | tr '\n' ' ')
  msg="the run failed (exit $rc)"
  [ ${#down[@]} -eq 0 ] || msg+="; unreachable node(s): ${down[*]}"
  [ -z "$failing" ] || msg+="; ranks failed on: $failing"
  echo "error: $msg. Fix or drop the node, then rerun with --resume auto to continue from the last checkpoint" >&2
  exit 1
fi
exit "${rc:-0}"
