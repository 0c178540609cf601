#!/usr/bin/env bash
# mmproj launcher. Sets up .venv on first use, then:
#   ./launch.sh [--workdir DIR] [--config.key=value ...]   train + evaluate configs/quickstart.py (runs/quickstart/)
#   ./launch.sh test [PYTEST ARGS]                run the test suite
#   ./launch.sh CONFIG[:ARG] [--workdir DIR] [--config.key=value ...]   run any experiment
#
# Multi-process runs: every process runs the same `python -m mmproj.main` command and finds the others through
# the MMPROJ_* environment (mmproj/train/distributed.py). The workdir must be one directory all processes share
# (checkpoints are written by every process). Mode options go before CONFIG; everything after CONFIG goes to
# mmproj.main. --dry-run prints the command(s) that would run, one per line, and exits without setting anything up.
#
#   ./launch.sh tpu --name NAME --zone ZONE [--project P] [--repo-dir DIR] [--dry-run] CONFIG[:ARG] [ARGS ...]
#       Cloud TPU VM pod slice: one `gcloud compute tpus tpu-vm ssh NAME --worker=all --command ...` that, on every
#       worker, cds into DIR (default ~/mmproj), creates DIR/.venv if missing, `pip install -e .[tpu]` into it and
#       runs mmproj.main (JAX detects the pod: MMPROJ_DISTRIBUTED=auto). Putting the repository on every worker
#       (git clone, or `gcloud compute tpus tpu-vm scp --recurse . NAME:~/mmproj --worker=all`) is up to you.
#   ./launch.sh multinode --coordinator HOST:PORT --num-processes N --process-id I [--local-device-ids 0,1]
#               [--dry-run] CONFIG[:ARG] [ARGS ...]
#       One process of a multi-node GPU job: run it once per node (or per GPU), e.g. from `srun`. HOST:PORT is
#       process 0's address. Under srun, --num-processes / --process-id default to SLURM_NTASKS / SLURM_PROCID.
#   ./launch.sh local-multiprocess --num-processes N [--devices-per-process K] [--port P] [--dry-run]
#               CONFIG[:ARG] [ARGS ...]
#       N CPU processes on this machine (127.0.0.1, a free port unless --port), K simulated devices each
#       (XLA_FLAGS=--xla_force_host_platform_device_count=K; default 1): try a multi-host run on a laptop.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
ROOT=$(pwd)
VENV=${MMPROJ_VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3}

setup() {  # $1: pip extras ('' or '[test]')
  if [ ! -x "$VENV/bin/python" ]; then
    echo "launch.sh: creating $VENV" >&2
    "$PYTHON" -m venv "$VENV"
  fi
  # Re-install only when pyproject.toml changed; an install with [test] also covers the plain one.
  local hash; hash=$(cksum < pyproject.toml | cut -d' ' -f1)
  local stamp="$VENV/.mmproj-installed$1-$hash"
  if [ ! -f "$stamp" ] && [ ! -f "$VENV/.mmproj-installed[test]-$hash" ]; then
    echo "launch.sh: installing mmproj$1 into $VENV" >&2
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -e ".$1"
    touch "$stamp"
  fi
}

die() { echo "launch.sh${MODE:+ $MODE}: $*" >&2; exit 2; }

# On a CPU host glibc keeps freed memory for reuse instead of unmapping it, so that XLA's per-call temporaries stop
# costing page faults on every step (the setting and why, with figures: benchmarks/host_malloc.py, which prints it).
# Not on GPU/TPU hosts, nor when GLIBC_TUNABLES is already set (set it empty for glibc's defaults).
cpu_malloc() {  # $1 = cpu: the run is on the CPU whatever devices the host has (local-multiprocess)
  [ -z "${GLIBC_TUNABLES+set}" ] || return 0
  if [ "${1:-}" != cpu ] && { compgen -G '/dev/nvidia[0-9]*' || compgen -G '/dev/accel[0-9]*' \
                               || compgen -G '/dev/vfio/[0-9]*'; } >/dev/null; then
    return 0
  fi
  GLIBC_TUNABLES=$("$PYTHON" "$ROOT/benchmarks/host_malloc.py")
  export GLIBC_TUNABLES
}

check_config() {  # $1: CONFIG[:ARG]
  case "$1" in
    -*|'') die "the first argument must be a config file (got ${1:-nothing}); see README.md";;
  esac
  if [ ! -f "${1%%:*}" ]; then
    die "config file ${1%%:*} not found"
  fi
}

with_workdir() {  # $1: CONFIG, then its args -> ARGS: the args, plus --workdir runs/<config>[-<arg>] if none given
  local config=$1; shift
  ARGS=("$@")
  if ! printf '%s\n' "${ARGS[@]+"${ARGS[@]}"}" | grep -q -- '^--workdir'; then
    local name arg
    name=$(basename "${config%%:*}" .py)
    arg=${config#*:}; [ "$arg" != "$config" ] && name="$name-$arg"
    [ "$name" = "quickstart-" ] && name=quickstart
    ARGS+=(--workdir "runs/$name")
  fi
}

quote() {  # shell words -> one line a POSIX shell reads back as the same words
  local out='' w
  for w in "$@"; do
    if [[ "$w" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
      out+="$w "
    else
      out+="'${w//\'/\'\\\'\'}' "
    fi
  done
  printf '%s' "${out% }"
}

need_int() {  # $1: flag, $2: value, $3: minimum
  if ! [[ "$2" =~ ^[0-9]+$ ]] || [ "$2" -lt "$3" ]; then
    die "$1 must be an integer >= $3 (got '${2}')"
  fi
}

if [ "${1:-}" = "test" ]; then
  shift
  setup "[test]"
  export HF_HUB_OFFLINE=1 TF_CPP_MIN_LOG_LEVEL=3
  exec "$VENV/bin/python" -m pytest tests "$@"
fi

case "${1:-}" in
  tpu|multinode|local-multiprocess)
    MODE=$1; shift
    DRY_RUN=0; NAME=''; ZONE=''; PROJECT=''; REPO_DIR='~/mmproj'; COORDINATOR=''; LOCAL_DEVICE_IDS=''; PORT=''
    NUM_PROCESSES=''; PROCESS_ID=''; DEVICES_PER_PROCESS=1
    case "$MODE" in
      tpu) ALLOWED=' --name --zone --project --repo-dir ';;
      multinode) ALLOWED=' --coordinator --num-processes --process-id --local-device-ids ';;
      local-multiprocess) ALLOWED=' --num-processes --devices-per-process --port ';;
    esac
    while [ $# -gt 0 ]; do
      case "$1" in
        --dry-run) DRY_RUN=1; shift; continue;;
        --*=*) flag=${1%%=*}; value=${1#*=}; shift;;
        --*)
          flag=$1
          [ $# -ge 2 ] || die "$flag needs a value"
          value=$2; shift 2;;
        *) break;;
      esac
      [[ "$ALLOWED" == *" $flag "* ]] || die "unknown option $flag (options:$ALLOWED--dry-run)"
      case "$flag" in
        --name) NAME=$value;;
        --zone) ZONE=$value;;
        --project) PROJECT=$value;;
        --repo-dir) REPO_DIR=$value;;
        --coordinator) COORDINATOR=$value;;
        --num-processes) NUM_PROCESSES=$value;;
        --process-id) PROCESS_ID=$value;;
        --local-device-ids) LOCAL_DEVICE_IDS=$value;;
        --devices-per-process) DEVICES_PER_PROCESS=$value;;
        --port) PORT=$value;;
      esac
    done
    [ $# -gt 0 ] || die "missing CONFIG[:ARG] after the options"
    CONFIG=$1; shift
    check_config "$CONFIG"
    REST=()
    for a in "$@"; do  # --dry-run is launch.sh's, wherever it is (mmproj.main has no such flag)
      if [ "$a" = --dry-run ]; then DRY_RUN=1; else REST+=("$a"); fi
    done
    with_workdir "$CONFIG" "${REST[@]+"${REST[@]}"}"
    RUN=(-m mmproj.main --config "$CONFIG" "${ARGS[@]}")

    case "$MODE" in
      tpu)
        [ -n "$NAME" ] || die "--name (the TPU VM's name) is required"
        [ -n "$ZONE" ] || die "--zone (the TPU VM's zone) is required"
        workdir=''; prev=''
        for a in "${ARGS[@]}"; do
          case "$a" in --workdir=*) workdir=${a#--workdir=};; esac
          [ "$prev" != --workdir ] || workdir=$a
          prev=$a
        done
        case "$workdir" in
          gs://*|/*) ;;
          *) echo "launch.sh tpu: note: --workdir $workdir is inside $REPO_DIR on each worker; a multi-host run" \
                  "needs one directory every worker shares (a shared mount)" >&2;;
        esac
        if [[ "$REPO_DIR" == "~/"* ]]; then
          cd_dir="~/$(quote "${REPO_DIR#\~/}")"
        else
          cd_dir=$(quote "$REPO_DIR")
        fi
        remote="cd $cd_dir && { [ -x .venv/bin/python ] || python3 -m venv .venv; }"
        remote+=' && .venv/bin/python -m pip install --quiet -e ".[tpu]"'
        remote+=" && MMPROJ_DISTRIBUTED=auto TF_CPP_MIN_LOG_LEVEL=3 $(quote .venv/bin/python "${RUN[@]}")"
        gcloud=(gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE")
        [ -z "$PROJECT" ] || gcloud+=(--project "$PROJECT")
        gcloud+=(--worker=all --command "$remote")
        if [ "$DRY_RUN" = 1 ]; then quote "${gcloud[@]}"; echo; exit 0; fi
        exec "${gcloud[@]}"
        ;;

      multinode)
        [ -n "$COORDINATOR" ] || die "--coordinator HOST:PORT (process 0's address) is required"
        [[ "$COORDINATOR" =~ ^.+:[0-9]+$ ]] || die "--coordinator must be HOST:PORT (got '$COORDINATOR')"
        NUM_PROCESSES=${NUM_PROCESSES:-${SLURM_NTASKS:-}}
        PROCESS_ID=${PROCESS_ID:-${SLURM_PROCID:-}}
        [ -n "$NUM_PROCESSES" ] || die "--num-processes is required (or run under srun, which sets SLURM_NTASKS)"
        need_int --num-processes "$NUM_PROCESSES" 1
        [ -n "$PROCESS_ID" ] || die "--process-id is required (or run under srun, which sets SLURM_PROCID)"
        need_int --process-id "$PROCESS_ID" 0
        [ "$PROCESS_ID" -lt "$NUM_PROCESSES" ] || die "--process-id $PROCESS_ID must be < --num-processes $NUM_PROCESSES"
        ENVS=(MMPROJ_COORDINATOR="$COORDINATOR" MMPROJ_NUM_PROCESSES="$NUM_PROCESSES" MMPROJ_PROCESS_ID="$PROCESS_ID")
        if [ -n "$LOCAL_DEVICE_IDS" ]; then
          [[ "$LOCAL_DEVICE_IDS" =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--local-device-ids must be like 0,1 (got '$LOCAL_DEVICE_IDS')"
          ENVS+=(MMPROJ_LOCAL_DEVICE_IDS="$LOCAL_DEVICE_IDS")
        fi
        ENVS+=(TF_CPP_MIN_LOG_LEVEL=3)
        if [ "$DRY_RUN" = 1 ]; then quote "${ENVS[@]}" "$VENV/bin/python" "${RUN[@]}"; echo; exit 0; fi
        setup ""
        cpu_malloc
        exec env "${ENVS[@]}" "$VENV/bin/python" "${RUN[@]}"
        ;;

      local-multiprocess)
        [ -n "$NUM_PROCESSES" ] || die "--num-processes is required"
        need_int --num-processes "$NUM_PROCESSES" 1
        need_int --devices-per-process "$DEVICES_PER_PROCESS" 1
        if [ -z "$PORT" ]; then
          PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
        fi
        need_int --port "$PORT" 1
        # The caller's XLA_FLAGS (a dump directory, say) are kept; the device count is added to them.
        XLA="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$DEVICES_PER_PROCESS"
        CMDS=()
        for ((i = 0; i < NUM_PROCESSES; i++)); do
          CMDS+=("$(quote JAX_PLATFORMS=cpu XLA_FLAGS="$XLA" \
                    MMPROJ_COORDINATOR=127.0.0.1:"$PORT" MMPROJ_NUM_PROCESSES="$NUM_PROCESSES" MMPROJ_PROCESS_ID="$i" \
                    TF_CPP_MIN_LOG_LEVEL=3 "$VENV/bin/python" "${RUN[@]}")")
        done
        if [ "$DRY_RUN" = 1 ]; then printf '%s\n' "${CMDS[@]}"; exit 0; fi
        if [ "${BASH_VERSINFO[0]}" -lt 4 ] || { [ "${BASH_VERSINFO[0]}" = 4 ] && [ "${BASH_VERSINFO[1]}" -lt 3 ]; }; then
          die "needs bash >= 4.3 (wait -n); this is bash $BASH_VERSION"
        fi
        setup ""
        cpu_malloc cpu   # JAX_PLATFORMS=cpu
        PIDS=()
        for ((i = 0; i < NUM_PROCESSES; i++)); do
          env JAX_PLATFORMS=cpu XLA_FLAGS="$XLA" \
            MMPROJ_COORDINATOR=127.0.0.1:"$PORT" MMPROJ_NUM_PROCESSES="$NUM_PROCESSES" MMPROJ_PROCESS_ID="$i" \
            TF_CPP_MIN_LOG_LEVEL=3 "$VENV/bin/python" "${RUN[@]}" &
          PIDS+=($!)
        done
        trap 'kill "${PIDS[@]}" 2>/dev/null || true' INT TERM
        status=0
        for ((i = 0; i < NUM_PROCESSES; i++)); do
          rc=0; wait -n || rc=$?
          if [ "$rc" != 0 ] && [ "$status" = 0 ]; then  # one failed: the others would wait for it forever
            status=$rc
            echo "launch.sh local-multiprocess: a process exited with status $rc; stopping the others" >&2
            kill "${PIDS[@]}" 2>/dev/null || true
          fi
        done
        exit "$status"
        ;;
    esac
    ;;
esac

setup ""
CONFIG=configs/quickstart.py                 # options alone (./launch.sh --workdir DIR ...) run the quickstart
if [ $# -gt 0 ] && [[ "$1" != -* ]]; then
  CONFIG=$1
  shift
fi
check_config "$CONFIG"
with_workdir "$CONFIG" "$@"
export TF_CPP_MIN_LOG_LEVEL=3
cpu_malloc
exec "$VENV/bin/python" -m mmproj.main --config "$CONFIG" "${ARGS[@]}"
