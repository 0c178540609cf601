"""A generator on disk: its config as JSON and its params as an Orbax checkpoint (no pickle).

  <directory>/generator.json   the Generator's fields (mmproj/generators/dit.py CONFIG_FIELDS)
  <directory>/params/          Orbax StandardCheckpointer of the params tree

save() writes the params first and the JSON last (atomically), so a directory with a generator.json is complete.
load() rebuilds the Generator from the JSON and restores the params onto the tree its config implies; a missing or
malformed file is an error that names it.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from mmproj.generators.dit import Generator, build, check_config, init_params

CONFIG_FILE = 'generator.json'
PARAMS_DIR = 'params'


def save(directory: str, generator_cfg: Any, params: Any) -> None:
  """Writes generator_cfg (dict / ConfigDict of Generator fields) and params under `directory` (created; it must
  not hold a generator already)."""
  cfg = check_config(generator_cfg)
  directory = os.path.abspath(os.path.expanduser(directory))
  params_dir = os.path.join(directory, PARAMS_DIR)
  if os.path.exists(os.path.join(directory, CONFIG_FILE)) or os.path.exists(params_dir):
    raise ValueError(f'{directory} holds a generator already; save into a new directory')
  os.makedirs(directory, exist_ok=True)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(params_dir, jax.tree.map(np.asarray, params))
    checkpointer.wait_until_finished()
  path = os.path.join(directory, CONFIG_FILE)
  with open(path + '.tmp', 'w') as f:
    json.dump(cfg, f, indent=2, sort_keys=True)
  os.replace(path + '.tmp', path)


def load_config(directory: str) -> dict[str, Any]:
  """The generator config saved in `directory`; FileNotFoundError / ValueError naming generator.json."""
  path = os.path.join(os.path.abspath(os.path.expanduser(directory)), CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'no generator at {directory}: {path} is missing (mmproj.generators.save writes it)')
  try:
    with open(path) as f:
      cfg = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f'{path} is not valid JSON: {e}') from None
  if not isinstance(cfg, dict):
    raise ValueError(f'{path} must hold a JSON object of the generator\'s fields, got {type(cfg).__name__}')
  try:
    return check_config(cfg)
  except ValueError as e:
    raise ValueError(f'{path}: {e}') from None


def load(directory: str) -> tuple[Generator, Any, dict[str, Any]]:
  """A saved generator -> (Generator, params, config). Errors name the missing or malformed file."""
  cfg = load_config(directory)
  generator = build(cfg)
  params_dir = os.path.join(os.path.abspath(os.path.expanduser(directory)), PARAMS_DIR)
  if not os.path.isdir(params_dir):
    raise FileNotFoundError(f'generator at {directory}: its params checkpoint {params_dir} is missing')
  abstract = jax.eval_shape(lambda: init_params(generator, jax.random.key(0)))
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      params = checkpointer.restore(params_dir, abstract)
  except Exception as e:   # orbax raises many kinds (missing metadata, tree or shape mismatch, bad bytes)
    raise ValueError(f'generator at {directory}: cannot restore {params_dir} as the params of its '
                     f'{CONFIG_FILE} ({type(e).__name__}: {e})') from e
  # Orbax restores what was saved even where the target's shapes differ: compare leaf by leaf.
  for (path, want), got in zip(jax.tree_util.tree_flatten_with_path(abstract)[0], jax.tree.leaves(params)):
    if tuple(got.shape) != tuple(want.shape):
      raise ValueError(f'generator at {directory}: cannot restore {params_dir} as the params of its {CONFIG_FILE}: '
                       f'{jax.tree_util.keystr(path)} is saved as {tuple(got.shape)}, the config needs '
                       f'{tuple(want.shape)}')
  return generator, params, cfg
