#!/usr/bin/env bash
# The prepared accelerator check: on a machine with one NVIDIA GPU (or a TPU VM) and only this repository, one
# command that finds or installs what it needs, runs benchmarks/accelerator.py under an 8-minute limit and writes
# its report (default BENCHMARKS-gpu.md).
#
#   benchmarks/accelerator.sh [--out FILE] [--only NAME]      # on the accelerator machine
#   benchmarks/accelerator.sh --dry-run                       # what would be installed and run; runs nothing
#   benchmarks/accelerator.sh --download-wheels               # on a machine with pip's registry: fill .whl/
#
# Python: $PYTHON (default python3), the machine's own, with its jax for the accelerator. The packages mmproj needs
# that it lacks are installed from the wheels in .whl/ (an ignored folder; --download-wheels fills it with
# CPython 3.12 manylinux wheels) into /tmp/mmproj-site, with --no-index: nothing is fetched on the machine.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
SITE=/tmp/mmproj-site
LIMIT_S=480
# Import names -> the distributions that provide them (what the benchmark imports through mmproj.train).
MODULES=(jax flax optax orbax.checkpoint chex einops etils tensorstore tokenizers safetensors ml_collections grain
         tree)
WHEELS=(ml_collections grain dm-tree array_record)

dry_run=0; download=0; args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1;;
    --download-wheels) download=1;;
    *) args+=("$1");;
  esac
  shift
done

if [ "$download" = 1 ]; then
  platforms=()
  for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
    platforms+=(--platform "$tag")
  done
  cmd=("$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
       "${platforms[@]}" -d .whl "${WHEELS[@]}")
  echo "+ ${cmd[*]}"
  [ "$dry_run" = 1 ] || "${cmd[@]}"
  exit 0
fi

missing() {
  "$PYTHON" - "$@" <<'PY'
import importlib.util, sys
def absent(name):
  try:
    return importlib.util.find_spec(name) is None
  except ModuleNotFoundError:
    return True
print(' '.join(m for m in sys.argv[1:] if absent(m)))
PY
}

echo "== python: $(command -v "$PYTHON") ($("$PYTHON" --version 2>&1))"
absent=$(missing "${MODULES[@]}")
if [ -n "$absent" ]; then
  echo "== missing here: $absent"
  if ! compgen -G '.whl/*.whl' >/dev/null; then
    echo "accelerator.sh: no wheels in .whl/ for them: run 'benchmarks/accelerator.sh --download-wheels' where pip" \
         "reaches its registry, and bring .whl/ along" >&2
    [ "$dry_run" = 1 ] || exit 2
  fi
  install=("$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl)
  echo "+ ${install[*]}"
  if [ "$dry_run" = 0 ]; then
    "${install[@]}"
  fi
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi

run=("$PYTHON" -m benchmarks.accelerator "${args[@]+"${args[@]}"}")
if [ "$dry_run" = 1 ]; then
  echo "+ timeout $LIMIT_S ${run[*]}"
  if [ -z "$(missing "${MODULES[@]}")" ]; then
    "${run[@]}" --dry-run
  fi
  exit 0
fi
echo "+ timeout $LIMIT_S ${run[*]}"
PYTHONUNBUFFERED=1 timeout "$LIMIT_S" "${run[@]}"
