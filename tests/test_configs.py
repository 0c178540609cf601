"""Every experiment config parses, validates and builds its model abstractly (no weights materialised)."""
from __future__ import annotations

import glob
import os

import jax
import pytest

from experiment_utils import REPO, load_config
from mmproj.train import trainer

CONFIG_FILES = sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, 'configs', '*.py')))


def _variants(path):
  import importlib.util
  spec = importlib.util.spec_from_file_location('cfg', os.path.join(REPO, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  assert module.__doc__ and './launch.sh' in module.__doc__, f'{path}: the docstring must show the launch command'
  return getattr(module, 'VARIANTS', ('',))


CASES = [(path, arg) for path in CONFIG_FILES for arg in _variants(path)]


@pytest.mark.parametrize('path,arg', CASES, ids=[f'{p}:{a}' for p, a in CASES])
def test_config_builds(path, arg):
  cfg = load_config(path, arg)
  s = trainer.setup(cfg, jax.devices()[:1])
  n_params = sum(x.size for x in jax.tree.leaves(s.abstract_state.params))
  assert n_params > 0
  expected = ({'lm'} | ({'encoder', 'projector'} if cfg.model.use_image else set())
              | ({'output', 'generator'} if cfg.model.get('output') else set()))
  assert set(s.abstract_state.params) == expected


def test_every_config_file_is_covered():
  assert 'configs/quickstart.py' in CONFIG_FILES
