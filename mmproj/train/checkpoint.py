"""Orbax checkpoints of the train state together with the data iterator, and the restore behind `mmproj.load`.

Layout of a workdir:
  WORKDIR/config.json          the full experiment config (what `load` rebuilds the model from)
  WORKDIR/tokenizer.json       the tokenizer the run trained with
  WORKDIR/checkpoints/<step>/  {state: params + optimizer state + step, data: grain iterator, meta: json}
Orbax writes each step to a temporary directory and renames it when complete, so a run killed mid-save leaves
the previous steps intact and the partial one invisible.
"""
from __future__ import annotations

import json
import os
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

CONFIG_FILE = 'config.json'
TOKENIZER_FILE = 'tokenizer.json'


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(os.path.expanduser(workdir)), 'checkpoints')


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
  """Restores `step` onto the shardings of `abstract_state`; the iterator is advanced in place."""
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      data=grain.checkpoint.CheckpointRestore(data_iterator),
      meta=ocp.args.JsonRestore()))
  return restored['state'], dict(restored['meta'])


def save_run_files(workdir: str, cfg: ml_collections.ConfigDict, tokenizer) -> None:
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, CONFIG_FILE), 'w') as f:
    f.write(cfg.to_json_best_effort(indent=2))
  tokenizer.save(os.path.join(workdir, TOKENIZER_FILE))


def restore_for_inference(path: str, step: int | None = None):
  """An Orbax workdir (latest step, or `step`) or one of its step directories -> (model, params, tokenizer, cfg,
  step), params placed on the caller's devices (data-parallel mesh over all of them). mmproj.load wraps this."""
  from tokenizers import Tokenizer

  from mmproj.train import trainer  # the trainer knows how to build the abstract state for a config

  path = os.path.abspath(os.path.expanduser(path))
  if os.path.basename(os.path.dirname(path)) == 'checkpoints' and os.path.basename(path).isdigit():
    step = int(os.path.basename(path)) if step is None else step
    path = os.path.dirname(os.path.dirname(path))
  config_path = os.path.join(path, CONFIG_FILE)
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f'{config_path} not found: {path} is not an mmproj workdir')
  with open(config_path) as f:
    try:
      cfg = ml_collections.ConfigDict(json.load(f))
    except ValueError as e:
      raise ValueError(f'{config_path}: malformed JSON ({e})') from None
  tokenizer_path = os.path.join(path, TOKENIZER_FILE)
  if not os.path.isfile(tokenizer_path):
    raise FileNotFoundError(f'{tokenizer_path} not found: the workdir {path} is incomplete')
  tokenizer = Tokenizer.from_file(tokenizer_path)

  cfg.mesh = ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'tensor': 1})
  setup = trainer.setup(cfg, jax.devices())
  manager = ocp.CheckpointManager(checkpoint_dir(path), options=ocp.CheckpointManagerOptions(read_only=True))
  step = manager.latest_step() if step is None else step
  if step is None or step not in manager.all_steps():
    raise FileNotFoundError(f'no checkpoint{"" if step is None else f" for step {step}"} in {checkpoint_dir(path)}'
                            f' (steps present: {list(manager.all_steps())})')
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(setup.abstract_state)))
  return setup.model, restored['state'].params, tokenizer, cfg, step
