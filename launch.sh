#!/usr/bin/env bash
# mmproj launcher. Sets up .venv on first use, then:
#   ./launch.sh                                   train + evaluate configs/quickstart.py into runs/quickstart/
#   ./launch.sh test [PYTEST ARGS]                run the test suite
#   ./launch.sh CONFIG[:ARG] [--workdir DIR] [--config.key=value ...]   run any experiment
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

if [ "${1:-}" = "test" ]; then
  shift
  setup "[test]"
  export HF_HUB_OFFLINE=1 TF_CPP_MIN_LOG_LEVEL=3
  exec "$VENV/bin/python" -m pytest tests "$@"
fi

setup ""
CONFIG=${1:-configs/quickstart.py}
[ $# -gt 0 ] && shift
case "$CONFIG" in
  -*) echo "launch.sh: the first argument must be a config file (got $CONFIG); see README.md" >&2; exit 2;;
esac
if [ ! -f "${CONFIG%%:*}" ]; then
  echo "launch.sh: config file ${CONFIG%%:*} not found" >&2; exit 2
fi
ARGS=("$@")
if ! printf '%s\n' "${ARGS[@]+"${ARGS[@]}"}" | grep -q -- '^--workdir'; then
  name=$(basename "${CONFIG%%:*}" .py)
  arg=${CONFIG#*:}; [ "$arg" != "$CONFIG" ] && name="$name-$arg"
  [ "$name" = "quickstart-" ] && name=quickstart
  ARGS+=(--workdir "runs/$name")
fi
export TF_CPP_MIN_LOG_LEVEL=3
exec "$VENV/bin/python" -m mmproj.main --config "$CONFIG" "${ARGS[@]}"
