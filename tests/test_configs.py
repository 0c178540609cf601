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


def test_stage0_command_line_reads_the_recipe_and_its_overrides(monkeypatch, capsys):
  """`python -m mmproj.stage0 / stage0_generator RECIPE FIELD=VALUE`: the recipe with the override applied, the malloc
  note on a CPU host without GLIBC_TUNABLES (none with it), and a bad field or file named before anything runs."""
  from mmproj import config_lib
  monkeypatch.chdir(REPO)
  read = lambda *argv: config_lib.recipe_from_command_line('mmproj.stage0', 'Stage 0.', 'configs/stage0/scenes.py',
                                                           list(argv))
  monkeypatch.delenv('GLIBC_TUNABLES', raising=False)
  recipe = read('configs/stage0/scenes.py:smoke', 'vision.steps=7')
  assert recipe.vision.steps == 7
  assert ('GLIBC_TUNABLES is unset' in capsys.readouterr().out) == (jax.default_backend() == 'cpu')
  monkeypatch.setenv('GLIBC_TUNABLES', '')
  assert read('configs/stage0/generator.py:smoke').to_dict() == load_config('configs/stage0/generator.py:smoke').to_dict()
  assert 'GLIBC_TUNABLES' not in capsys.readouterr().out
  with pytest.raises(ValueError, match='vision.nope'):
    read('configs/stage0/scenes.py', 'vision.nope=1')
  with pytest.raises(FileNotFoundError, match='configs/stage0/missing.py'):
    read('configs/stage0/missing.py')
