"""Orbax checkpoints of the train state together with the data iterator, and the restore behind `mmproj.load`.

Layout of a workdir (a local directory, or a gs:// URL for multi-host runs whose hosts share no file system):
  WORKDIR/config.json          the full experiment config (what `load` rebuilds the model from)
  WORKDIR/tokenizer.json       the tokenizer the run trained with
  WORKDIR/checkpoints/<step>/  {state: params + optimizer state + step, data: grain iterator, meta: json}
Orbax writes each step to a temporary directory and renames it when complete, so a run killed mid-save leaves
the previous steps intact and the partial one invisible. In a multi-process run every process calls `save`
(each writes its own shards and data-iterator state; the manager coordinates them), and process 0 alone writes
the run files.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

CONFIG_FILE = 'config.json'
TOKENIZER_FILE = 'tokenizer.json'


def _is_url(path: str) -> bool:
  return '://' in str(path)


def workdir_path(workdir: str) -> str:
  """An absolute local path (~ expanded), or the URL itself (gs://...) minus a trailing slash."""
  workdir = os.fspath(workdir)
  return workdir.rstrip('/') if _is_url(workdir) else os.path.abspath(os.path.expanduser(workdir))


def checkpoint_dir(workdir: str) -> str:
  root = workdir_path(workdir)
  return f'{root}/checkpoints' if _is_url(root) else os.path.join(root, 'checkpoints')


def make_manager(workdir: str, ckpt_cfg) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=int(ckpt_cfg.keep),
      enable_async_checkpointing=bool(ckpt_cfg.get('async_save', True)),
      create=True)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iterator, meta: dict) -> None:
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=grain.checkpoint.CheckpointSave(data_iterator),
      meta=ocp.args.JsonSave(meta)))


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any, data_iterator) -> tuple[Any, dict]:
  """Restores `step` onto the shardings of `abstract_state`; the iterator is advanced in place.

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
    return restored['state'], dict(restored['meta'])
  states = {f.name: json.loads(f.read_text()) for f in data_dir.glob('process_*-of-*.json')}
  if not states or any(st != next(iter(states.values())) for st in states.values()):
    raise ValueError(f'checkpoint step {step} in {manager.directory} holds the data state of processes '
                     f'{sorted(states)}, not of process {jax.process_index()} of {jax.process_count()}, and those '
                     'states differ (data.worker_count > 0?): resume with the process count that wrote it')
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
  data_iterator.set_state(next(iter(states.values())))
  return restored['state'], dict(restored['meta'])


def save_run_files(workdir: str, cfg: ml_collections.ConfigDict, tokenizer) -> None:
  if jax.process_index() != 0:
    return
  root = epath.Path(workdir_path(workdir))
  root.mkdir(parents=True, exist_ok=True)
  (root / CONFIG_FILE).write_text(cfg.to_json_best_effort(indent=2))
  (root / TOKENIZER_FILE).write_text(tokenizer.to_str(pretty=True))


def restore_for_inference(path: str, step: int | None = None, *, mesh: Mapping[str, int] | None = None,
                          devices: Sequence[jax.Device] | None = None):
  """An Orbax workdir (latest step, or `step`) or one of its step directories -> (model, params, tokenizer, cfg,
  step), params placed on `devices` (default: all of this process's devices) laid out as `mesh` ({data, fsdp,
  tensor} sizes, one may be -1; default data-parallel over all of them, {'data': -1}). The checkpoint may have
  been written by any number of processes on any mesh. mmproj.load wraps this."""
  from tokenizers import Tokenizer

  from mmproj.train import trainer  # the trainer knows how to build the abstract state for a config

  path = workdir_path(path)
  parts = path.rsplit('/', 2)
  if len(parts) == 3 and parts[1] == 'checkpoints' and parts[2].isdigit():
    step = int(parts[2]) if step is None else step
    path = parts[0]
  root = epath.Path(path)
  config_path = root / CONFIG_FILE
  if not config_path.is_file():
    raise FileNotFoundError(f'{config_path} not found: {path} is not an mmproj workdir')
  try:
    cfg = ml_collections.ConfigDict(json.loads(config_path.read_text()))
  except ValueError as e:
    raise ValueError(f'{config_path}: malformed JSON ({e})') from None
  tokenizer_path = root / TOKENIZER_FILE
  if not tokenizer_path.is_file():
    raise FileNotFoundError(f'{tokenizer_path} not found: the workdir {path} is incomplete')
  tokenizer = Tokenizer.from_str(tokenizer_path.read_text())

  mesh = {'data': -1} if mesh is None else dict(mesh)
  cfg.mesh = ml_collections.ConfigDict({'data': 1, 'fsdp': 1, 'tensor': 1, **mesh})
  setup = trainer.setup(cfg, list(jax.local_devices() if devices is None else devices))
  manager = ocp.CheckpointManager(checkpoint_dir(path), options=ocp.CheckpointManagerOptions(read_only=True))
  step = manager.latest_step() if step is None else step
  if step is None or step not in manager.all_steps():
    raise FileNotFoundError(f'no checkpoint{"" if step is None else f" for step {step}"} in {checkpoint_dir(path)}'
                            f' (steps present: {list(manager.all_steps())})')
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(setup.abstract_state)))
  return setup.model, restored['state'].params, tokenizer, cfg, step
