"""glibc malloc settings for runs on a CPU host: freed memory is kept for reuse instead of being unmapped.

XLA CPU allocates the temporaries of a compiled program (activations, gradients, workspace) on every call and frees
them when the call ends. glibc serves each block above its mmap threshold (32 MiB at most) with freshly mapped pages
and unmaps them on free, so every call of a train step first-touches gigabytes of new pages: ~760,000 minor page
faults (4 KiB each) per forward + backward of the Idefics2 perceiver at its real sizes. With

  glibc.malloc.arena_max=1        one arena, the sbrk heap (the per-thread arenas are mapped heaps glibc releases),
  glibc.malloc.mmap_max=0         large blocks come from that heap too, not from mmap,
  glibc.malloc.trim_threshold=64G freed memory at the top of the heap stays with the process,

the next call reuses the previous call's pages. `python -m benchmarks.diagnose faults` measures the three
settings (default / huge pages / this one) side by side; `python -m benchmarks.diagnose train-step` runs the bench's
LLaVA stage-1 step under whatever GLIBC_TUNABLES it is given (empty for glibc's defaults). The cost: a process keeps
its peak resident memory, which a training process reaches in its first step anyway.

glibc reads GLIBC_TUNABLES once, at process start, so whoever starts the process sets it: launch.sh (on hosts without
a GPU or TPU; it runs this file, which prints REUSE), the benchmark's re-exec (benchmarks/__main__.py, for both
frameworks' processes) and experiments/sweep.py (for each run's process, on the same hosts as launch.sh). A GLIBC_TUNABLES already in the environment,
empty included, is left alone. Other C libraries (musl, macOS) ignore the variable.
"""

from __future__ import annotations

import glob
import os
from typing import MutableMapping

ENV = 'GLIBC_TUNABLES'
REUSE = 'glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736'


def accelerator_host() -> bool:
  """True on a host with a GPU or TPU device node (launch.sh's test): the setting is for CPU hosts only."""
  return any(glob.glob(p) for p in ('/dev/nvidia[0-9]*', '/dev/accel[0-9]*', '/dev/vfio/[0-9]*'))


def with_reuse(env: MutableMapping[str, str]) -> MutableMapping[str, str]:
  """Sets GLIBC_TUNABLES=REUSE in `env` (e.g. a child's environment) unless it holds GLIBC_TUNABLES already."""
  env.setdefault(ENV, REUSE)
  return env


def describe(env: MutableMapping[str, str] | None = None) -> str:
  """One line for logs and reports: which malloc setting this process (or `env`) runs with."""
  env = os.environ if env is None else env
  value = env.get(ENV)
  if value is None:
    return f'{ENV} unset (glibc defaults: large blocks mapped and unmapped per allocation)'
  if value == REUSE:
    return f'{ENV}={value} (benchmarks.host_malloc.REUSE: freed memory reused, not unmapped)'
  return f'{ENV}={value!r}' if value else f'{ENV} empty (glibc defaults)'


if __name__ == '__main__':
  print(REUSE)
