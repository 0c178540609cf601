"""Multi-process (multi-host) start-up: `initialize()` before any other JAX use, and which batch rows a process feeds.

How `initialize()` decides, from the environment:

  MMPROJ_DISTRIBUTED=off        one process; never calls jax.distributed.initialize
  MMPROJ_DISTRIBUTED=auto       jax.distributed.initialize() with nothing given: JAX detects the cluster itself
                                (Cloud TPU pods, SLURM job steps, Open MPI)
  MMPROJ_COORDINATOR=host:port  explicit (GPU clusters, several processes on one machine): process 0 listens on
  MMPROJ_NUM_PROCESSES=N        host:port, every process connects to it. N falls back to SLURM_NTASKS and the id
  MMPROJ_PROCESS_ID=I           to SLURM_PROCID (so under srun only MMPROJ_COORDINATOR is needed); the coordinator
                                falls back to JAX_COORDINATOR_ADDRESS, JAX's own variable. N = 1: one process.
  MMPROJ_LOCAL_DEVICE_IDS=0,1   optional: the local devices this process uses (default all; JAX also reads
                                JAX_LOCAL_DEVICE_IDS)
  none of these                 a Cloud TPU VM (TPU chips attached): as 'auto'; anything else: one process

Setting MMPROJ_NUM_PROCESSES or MMPROJ_PROCESS_ID without the rest, or a malformed value, is a ValueError naming
the variable. `./launch.sh multinode` / `local-multiprocess` / `tpu` set these for you.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Mapping

import jax

_MODES = ('auto', 'off')


def _int(env: Mapping[str, str], name: str, *, minimum: int) -> int:
  value = env[name].strip()
  try:
    number = int(value)
  except ValueError:
    raise ValueError(f'{name}={env[name]!r} is not an integer') from None
  if number < minimum:
    raise ValueError(f'{name}={number} must be >= {minimum}')
  return number


def _first(env: Mapping[str, str], *names: str) -> str | None:
  """The first of `names` set (non-empty) in env."""
  return next((n for n in names if env.get(n, '').strip()), None)


def parse_coordinator(value: str, name: str = 'MMPROJ_COORDINATOR') -> str:
  """'host:port' (an IPv6 host in brackets) -> the same string, checked; ValueError naming `name`."""
  host, sep, port = value.strip().rpartition(':')
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ValueError(f'{name}={value!r} must be host:port (e.g. 10.0.0.1:1234), the address of process 0')
  return value.strip()


def parse_device_ids(value: str, name: str = 'MMPROJ_LOCAL_DEVICE_IDS') -> list[int]:
  """'0,1,2' -> [0, 1, 2]; ValueError naming `name`."""
  try:
    ids = [int(v) for v in value.split(',') if v.strip()]
  except ValueError:
    raise ValueError(f'{name}={value!r} must be comma-separated device ids, e.g. 0,1') from None
  if not ids or any(i < 0 for i in ids) or len(set(ids)) != len(ids):
    raise ValueError(f'{name}={value!r} must be distinct non-negative device ids, e.g. 0,1')
  return ids


def plan(env: Mapping[str, str] | None = None) -> dict | None:
  """What `initialize` would do: None (one process), {} (JAX auto-detection) or the keyword arguments of
  jax.distributed.initialize. Reads nothing but `env` (default os.environ); raises ValueError naming the
  variable at fault."""
  env = os.environ if env is None else env
  mode = env.get('MMPROJ_DISTRIBUTED', '').strip().lower()
  if mode and mode not in _MODES:
    raise ValueError(f'MMPROJ_DISTRIBUTED={env["MMPROJ_DISTRIBUTED"]!r} must be one of {_MODES} (or unset)')
  if mode == 'off':
    return None
  kwargs = {}
  if _first(env, 'MMPROJ_LOCAL_DEVICE_IDS'):
    kwargs['local_device_ids'] = parse_device_ids(env['MMPROJ_LOCAL_DEVICE_IDS'])
  if mode == 'auto':
    return kwargs
  if _first(env, 'MMPROJ_COORDINATOR', 'MMPROJ_NUM_PROCESSES', 'MMPROJ_PROCESS_ID'):
    coordinator = _first(env, 'MMPROJ_COORDINATOR', 'JAX_COORDINATOR_ADDRESS')
    count = _first(env, 'MMPROJ_NUM_PROCESSES', 'SLURM_NTASKS')
    index = _first(env, 'MMPROJ_PROCESS_ID', 'SLURM_PROCID')
    if count is None:
      raise ValueError('MMPROJ_NUM_PROCESSES is not set (the number of processes; or run under srun, which sets '
                       'SLURM_NTASKS)')
    num_processes = _int(env, count, minimum=1)
    if index is None:
      raise ValueError('MMPROJ_PROCESS_ID is not set (this process\'s id in [0, MMPROJ_NUM_PROCESSES); or run '
                       'under srun, which sets SLURM_PROCID)')
    process_id = _int(env, index, minimum=0)
    if process_id >= num_processes:
      raise ValueError(f'{index}={process_id} must be < {count}={num_processes}')
    if num_processes == 1 and not kwargs:
      return None
    if coordinator is None:
      raise ValueError('MMPROJ_COORDINATOR is not set: give host:port of process 0 (e.g. 10.0.0.1:1234), '
                       'reachable from every process')
    kwargs.update(coordinator_address=parse_coordinator(env[coordinator], coordinator),
                  num_processes=num_processes, process_id=process_id)
    return kwargs
  if _tpu_chips() > 0:
    return kwargs
  if kwargs:
    raise ValueError('MMPROJ_LOCAL_DEVICE_IDS is set but no multi-process run is configured: set '
                     'MMPROJ_COORDINATOR, MMPROJ_NUM_PROCESSES and MMPROJ_PROCESS_ID (or MMPROJ_DISTRIBUTED=auto)')
  return None


def _tpu_chips() -> int:
  """TPU chips attached to this machine (0 when unknown). Uses JAX's own probe, which reads /dev and PCI ids
  without starting a backend; it is not public API, so any failure reads as 'no TPU'."""
  try:
    from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top
    return int(hardware_utils.num_available_tpu_chips_and_device_id()[0])
  except Exception:  # pylint: disable=broad-except
    return 0


def initialize(env: Mapping[str, str] | None = None) -> bool:
  """Starts jax.distributed as the environment asks (see the module docstring); True when it did. Call it once,
  first thing, before any JAX computation or device query. A no-op when jax.distributed is already running."""
  env = os.environ if env is None else env
  if jax.distributed.is_initialized():
    return True
  kwargs = plan(env)
  if kwargs is None:
    tasks = env.get('SLURM_NTASKS', '').strip()
    if tasks.isdigit() and int(tasks) > 1 and env.get('MMPROJ_DISTRIBUTED', '').strip().lower() != 'off':
      print(f'mmproj: SLURM_NTASKS={tasks} but no MMPROJ_COORDINATOR: running as one independent process '
            '(set MMPROJ_COORDINATOR=host:port, or MMPROJ_DISTRIBUTED=auto, for one multi-process run; '
            'MMPROJ_DISTRIBUTED=off silences this)', file=sys.stderr, flush=True)
    return False
  try:
    jax.distributed.initialize(**kwargs)
  except (ValueError, RuntimeError) as e:
    how = ('JAX could not detect the cluster by itself' if 'coordinator_address' not in kwargs else
           f'could not join {kwargs["num_processes"]} processes at {kwargs["coordinator_address"]}')
    raise RuntimeError(f'jax.distributed.initialize: {how}: {e}. Set MMPROJ_COORDINATOR, MMPROJ_NUM_PROCESSES '
                       'and MMPROJ_PROCESS_ID, or MMPROJ_DISTRIBUTED=off for one process.') from e
  return True


def is_main_process() -> bool:
  """True on process 0, the one that prints, logs and writes run files."""
  return jax.process_index() == 0


def batch_block(sharding: jax.sharding.Sharding, global_batch_size: int) -> tuple[int, int]:
  """(block, num_blocks): this process feeds rows [block * B / num_blocks, (block + 1) * B / num_blocks) of every
  global batch of B rows under `sharding` (the batch sharding). Read off the sharding rather than assumed from
  jax.process_index(): the mesh decides which rows a process's devices hold (processes whose devices hold the
  same rows, when the batch is replicated across them, get the same block). ValueError when the rows a process
  holds are not one contiguous, evenly sized block."""
  spans = {(s[0].start or 0, global_batch_size if s[0].stop is None else s[0].stop)
           for s in sharding.addressable_devices_indices_map((global_batch_size,)).values()}
  rows = sorted(spans)
  start, stop = rows[0][0], rows[0][1]
  for lo, hi in rows[1:]:
    if lo > stop:
      raise ValueError(f'process {jax.process_index()} holds batch rows {rows}, not one contiguous block: lay the '
                       'mesh out so that each process holds a contiguous range of the batch (mesh, sharding_rules)')
    stop = max(stop, hi)
  size = stop - start
  if global_batch_size % size or start % size:
    raise ValueError(f'process {jax.process_index()} holds batch rows [{start}, {stop}) of {global_batch_size}: '
                     'not one of equal blocks (mesh, sharding_rules)')
  return start // size, global_batch_size // size

