"""Orbax checkpoints of the train state together with the data iterator, and the read-only restore behind
`mmproj.load`.

Layout of a workdir (in a multi-host run, a directory every host sees: NFS, Filestore, a gs:// URL; see paths.py):
  WORKDIR/config.json          the full experiment config (what `load` rebuilds the model from)
  WORKDIR/tokenizer.json       the tokenizer the run trained with
  WORKDIR/checkpoints/<step>/  {state: params + optimizer state + step, data: grain iterator, meta: json}
Orbax writes each step to a temporary directory and renames it when complete, so a run killed mid-save leaves
the previous steps intact and the partial one invisible (and removed at the next start). In a multi-process run
every process calls `save` (each writes its own shards and data-iterator state; the manager coordinates them),
and process 0 alone writes the run files.

Integrity: `meta` holds a checksum of every train-state leaf, computed on the devices when the step is saved and
checked after every restore, so a checkpoint whose files were truncated or altered afterwards is detected even
where the bytes still decode. `restore_latest` then falls back to the newest step that reads back whole, moving
the bad one to WORKDIR/checkpoints_corrupt/ (kept, not deleted) and saying so.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from mmproj import config_lib
from mmproj.train import paths

CONFIG_FILE = 'config.json'
TOKENIZER_FILE = 'tokenizer.json'
CORRUPT_DIR = 'checkpoints_corrupt'


class CorruptCheckpointError(ValueError):
  """A checkpoint step that does not read back whole: files missing, truncated or altered since it was saved."""


class IncompatibleCheckpointError(ValueError):
  """A checkpoint written for a different train state (another model or optimizer config): not corruption, so
  nothing falls back or moves; the error names the leaf."""


def workdir_path(workdir: str) -> str:
  """An absolute local path (~ expanded), or the URL itself (gs://...) minus a trailing slash."""
  return paths.resolve(workdir)


def checkpoint_dir(workdir: str) -> str:
  return paths.join(workdir, 'checkpoints')


def make_manager(workdir: str, ckpt_cfg) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=int(ckpt_cfg.keep),
      enable_async_checkpointing=bool(ckpt_cfg.async_save),
      cleanup_tmp_directories=True,    # a save killed half-way left a temporary directory: never a finished step
      create=True)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def _leaf_name(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)


def _bits_u32(x: jax.Array) -> jax.Array:
  """The raw bits of x as uint32 (bool and 8/16-bit types widened), whatever the dtype."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  width = x.dtype.itemsize * 8
  if width == 64:                     # x64 leaves: fold the two halves
    pair = jax.lax.bitcast_convert_type(x, jnp.uint32)          # [..., 2]
    return pair[..., 0] ^ (pair[..., 1] * jnp.uint32(0x9E3779B1))
  as_uint = {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32}[width]
  return jax.lax.bitcast_convert_type(x, as_uint).astype(jnp.uint32)


@jax.jit
def _checksums(tree: Any) -> list[jax.Array]:
  """One uint32 per leaf: sum over elements of bits * w, w odd and different per position (mod 2^32). Integer
  sums do not depend on the reduction order, so the value is the same on any mesh and process count; an odd w
  makes any single flipped bit change it."""
  def one(x):
    bits = _bits_u32(x)
    w = jnp.ones(bits.shape, jnp.uint32)
    for d, mult in zip(range(bits.ndim), (0x85EBCA6B, 0xC2B2AE35, 0x27D4EB2F, 0x165667B1, 0xD3A2646C, 0xFD7046C5)):
      w = w + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, d) * jnp.uint32(mult)
    return jnp.sum(bits * (w * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)
  return [one(x) for x in jax.tree.leaves(tree)]


def state_checksums(state: Any) -> dict[str, int]:
  """{leaf path: uint32 checksum} of a (sharded) train state, computed on its devices."""
  names = [_leaf_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
  values = jax.device_get(_checksums(state))
  return {name: int(v) for name, v in zip(names, values)}


def verify_checksums(state: Any, meta: Mapping[str, Any], where: str) -> None:
  """CorruptCheckpointError naming the first leaf whose checksum differs from the one saved in meta (a checkpoint
  saved without checksums is accepted as it is)."""
  saved = meta.get('checksums')
  if not saved:
    return
  got = state_checksums(state)
  for name, value in got.items():
    if name in saved and int(saved[name]) != value:
      raise CorruptCheckpointError(f'{where}: leaf {name} does not match the checksum saved with it (the files '
                                   'were truncated or altered after the save)')


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iterator, meta: dict) -> None:
  meta = {**meta, 'checksums': state_checksums(state)}
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=grain.checkpoint.CheckpointSave(data_iterator),
      meta=ocp.args.JsonSave(meta)))


def check_compatible(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> None:
  """IncompatibleCheckpointError naming the first leaf whose saved shape or dtype differs from `abstract_state`
  (or that one side lacks); CorruptCheckpointError when the step's metadata does not read."""
  where = f'checkpoint step {step} in {manager.directory}'
  try:
    saved = ocp.StandardCheckpointHandler().metadata(epath.Path(manager.directory) / str(step) / 'state')
    saved_leaves = {_leaf_name(p): m for p, m in jax.tree_util.tree_flatten_with_path(
        saved, is_leaf=lambda x: hasattr(x, 'shape') and hasattr(x, 'dtype'))[0]}
  except Exception as e:  # pylint: disable=broad-except  (orbax/tensorstore raise many types for bad files)
    raise CorruptCheckpointError(f'{where}: its metadata does not read ({type(e).__name__}: {e})') from None
  if not saved_leaves:
    raise CorruptCheckpointError(f'{where}: its metadata lists no arrays')
  want = {_leaf_name(p): a for p, a in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
  for name in [*want, *(n for n in saved_leaves if n not in want)]:     # params come before optimizer state
    if name not in saved_leaves or name not in want:
      side = 'the checkpoint lacks' if name not in saved_leaves else 'this config has no'
      raise IncompatibleCheckpointError(f'{where} was written for another train state: {side} leaf {name}; '
                                        'resume with the config that wrote it, or use a new workdir')
    a, m = want[name], saved_leaves[name]
    if tuple(m.shape) != tuple(a.shape) or np.dtype(m.dtype) != np.dtype(a.dtype):
      raise IncompatibleCheckpointError(f'{where} was written for another train state: leaf {name} is '
                                        f'{np.dtype(m.dtype).name}{list(m.shape)} there, '
                                        f'{np.dtype(a.dtype).name}{list(a.shape)} in this config')


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any, data_iterator) -> tuple[Any, dict]:
  """Restores `step` onto the shardings of `abstract_state`; the iterator is advanced in place. The state is
  checked against the checksums saved with it (CorruptCheckpointError naming the leaf).

  A checkpoint written by a different number of processes restores too when its data-iterator state is the same
  in every process's file (the loader's {'next_index': global step} with no worker processes: the data order does
  not depend on the process count); otherwise ValueError naming the two process counts."""
  data_dir = epath.Path(manager.directory) / str(step) / 'data'
  mine = data_dir / f'process_{jax.process_index()}-of-{jax.process_count()}.json'
  if not data_dir.exists() or mine.exists():
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(data_iterator),
        meta=ocp.args.JsonRestore()))
    meta = dict(restored['meta'])
    verify_checksums(restored['state'], meta, f'checkpoint step {step} in {manager.directory}')
    return restored['state'], meta
  states = {f.name: json.loads(f.read_text()) for f in data_dir.glob('process_*-of-*.json')}
  if not states or any(st != next(iter(states.values())) for st in states.values()):
    raise ValueError(f'checkpoint step {step} in {manager.directory} holds the data state of processes '
                     f'{sorted(states)}, not of process {jax.process_index()} of {jax.process_count()}, and those '
                     'states differ (data.worker_count > 0?): resume with the process count that wrote it')
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
  meta = dict(restored['meta'])
  verify_checksums(restored['state'], meta, f'checkpoint step {step} in {manager.directory}')
  data_iterator.set_state(next(iter(states.values())))
  return restored['state'], meta


def _quarantine(workdir: str, step: int) -> str:
  """Moves checkpoints/<step> to checkpoints_corrupt/<step>[-k] (process 0; all processes wait) -> new path."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  src = epath.Path(checkpoint_dir(workdir)) / str(step)
  root = epath.Path(workdir_path(workdir)) / CORRUPT_DIR
  dst, k = root / str(step), 1
  while dst.exists():
    dst, k = root / f'{step}-{k}', k + 1
  if jax.process_index() == 0:
    root.mkdir(parents=True, exist_ok=True)
    src.rename(dst)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f'mmproj_quarantine_{step}')
  return str(dst)


def _all_processes_agree(ok: bool) -> bool:
  """True when `ok` holds in every process (one process alone: `ok`). A read failure can be local to one
  process (its shards, its data-iterator file); all of them must then fall back together."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def restore_latest(workdir: str, ckpt_cfg, abstract_state: Any, data_iterator, *, log=print
                   ) -> tuple[ocp.CheckpointManager, Any, dict, int | None]:
  """-> (manager, state, meta, step) from the newest checkpoint in workdir that reads back whole, or
  (manager, None, {}, None) when there is none. A step that fails to read (CorruptCheckpointError, or any error
  orbax raises while reading it) is moved to WORKDIR/checkpoints_corrupt/ and the next older one is tried, each
  with a message; when steps exist but none reads, RuntimeError naming the directory (never a silent fresh
  start). A checkpoint of another train state raises IncompatibleCheckpointError at once."""
  manager = make_manager(workdir, ckpt_cfg)
  steps = sorted(manager.all_steps(), reverse=True)
  failures = []
  for i, step in enumerate(steps):
    error = None
    try:
      check_compatible(manager, step, abstract_state)
      state, meta = restore(manager, step, abstract_state, data_iterator)
    except IncompatibleCheckpointError:
      manager.close()
      raise
    except Exception as e:  # pylint: disable=broad-except  (any read failure of this step: try an older one)
      error = e
    if _all_processes_agree(error is None):
      return manager, state, meta, step
    reason = ('another process could not read it' if error is None else
              str(error).splitlines()[0][:500] if str(error) else type(error).__name__)
    failures.append(f'step {step}: {reason}')
    manager.close()
    moved = _quarantine(workdir, step)
    older = f'falling back to step {steps[i + 1]}' if i + 1 < len(steps) else 'no older step is left'
    log(f'WARNING: checkpoint step {step} in {checkpoint_dir(workdir)} does not read back ({reason}); moved it '
        f'to {moved}; {older}')
    manager = make_manager(workdir, ckpt_cfg)
  if failures:
    manager.close()
    raise RuntimeError(f'no checkpoint in {checkpoint_dir(workdir)} reads back (the bad ones are now in '
                       f'{epath.Path(workdir_path(workdir)) / CORRUPT_DIR}): ' + '; '.join(failures) +
                       '. Not starting from scratch over a run that had checkpoints: use a new workdir for that.')
  return manager, None, {}, None


def save_run_files(workdir: str, cfg: ml_collections.ConfigDict, tokenizer) -> None:
  if jax.process_index() != 0:
    return
  paths.write_text(paths.join(workdir, CONFIG_FILE), cfg.to_json_best_effort(indent=2))
  paths.write_text(paths.join(workdir, TOKENIZER_FILE), tokenizer.to_str(pretty=True))


def read_run_files(path: str) -> tuple[ml_collections.ConfigDict, Any]:
  """A workdir's config.json and tokenizer.json -> (cfg, tokenizers.Tokenizer); FileNotFoundError / ValueError
  naming the file when one is missing or malformed."""
  from tokenizers import Tokenizer

  root = epath.Path(path)
  config_path = root / CONFIG_FILE
  if not config_path.is_file():
    raise FileNotFoundError(f'{config_path} not found: {path} is not an mmproj workdir')
  try:
    cfg = ml_collections.ConfigDict(json.loads(config_path.read_text()))
  except ValueError as e:
    raise ValueError(f'{config_path}: malformed JSON ({e})') from None
  # A run saved before a model field existed gets that field's default.
  cfg.model = config_lib.model_config(**cfg.model.to_dict())
  tokenizer_path = root / TOKENIZER_FILE
  if not tokenizer_path.is_file():
    raise FileNotFoundError(f'{tokenizer_path} not found: the workdir {path} is incomplete')
  return cfg, Tokenizer.from_str(tokenizer_path.read_text())


def split_step_path(path: str, step: int | None = None) -> tuple[str, int | None]:
  """WORKDIR or WORKDIR/checkpoints/<step> -> (workdir, step): a step directory names its step (unless `step`
  is given)."""
  path = workdir_path(path)
  parts = path.rsplit('/', 2)
  if len(parts) == 3 and parts[1] == 'checkpoints' and parts[2].isdigit():
    return parts[0], int(parts[2]) if step is None else step
  return path, step


def restore_state(workdir: str, abstract_state: Any, step: int | None = None) -> tuple[Any, int]:
  """The train state of `step` (default the latest) in a workdir, read-only, onto the shardings of
  `abstract_state` and checked against its checksums -> (state, step). The checkpoint may have been written by
  any number of processes on any mesh."""
  manager = ocp.CheckpointManager(checkpoint_dir(workdir), options=ocp.CheckpointManagerOptions(read_only=True))
  step = manager.latest_step() if step is None else step
  if step is None or step not in manager.all_steps():
    raise FileNotFoundError(f'no checkpoint{"" if step is None else f" for step {step}"} in {checkpoint_dir(workdir)}'
                            f' (steps present: {list(manager.all_steps())})')
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                          meta=ocp.args.JsonRestore()))
  verify_checksums(restored['state'], dict(restored['meta']), f'checkpoint step {step} in {checkpoint_dir(workdir)}')
  return restored['state'], step
