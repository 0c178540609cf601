"""Every projector zoo entry (configs/zoo.py:NAME) trains in the shapes world: its loss falls within a few steps."""
from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest

from experiment_utils import REPO, load_config
from mmproj import projectors
from mmproj.train import trainer


def _zoo_names() -> list[str]:
  """The zoo's entry names, read from its table (the configs themselves go through load_config)."""
  spec = importlib.util.spec_from_file_location('zoo', os.path.join(REPO, 'configs', 'zoo.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return list(module.ZOO)


ZOO_NAMES = _zoo_names()


def test_every_registered_projector_has_a_zoo_entry():
  names = {load_config('configs/zoo.py', name).model.projector.name for name in ZOO_NAMES}
  assert names == set(projectors.REGISTRY), f'projectors without a zoo entry: {set(projectors.REGISTRY) - names}'


@pytest.mark.parametrize('name', ZOO_NAMES)
def test_zoo_entry_trains(name, shapes_data_dir, tmp_path):
  """The smoke variant with one-block encoder and LM, 12 steps at a high learning rate: loss must fall."""
  cfg = load_config('configs/zoo.py', f'{name},smoke')
  cfg.data.data_dir = shapes_data_dir
  cfg.model.encoder.depth = 1
  cfg.model.lm.depth = 1
  cfg.train.update(steps=12, batch_size=16, warmup_steps=2, learning_rate=3e-3)
  cfg.checkpoint.update(every=100, async_save=False)
  cfg.log_every = 1
  trainer.train(cfg, str(tmp_path))
  with open(tmp_path / 'metrics.jsonl') as f:
    losses = [r['loss'] for r in map(json.loads, f) if 'loss' in r]
  assert len(losses) == 12 and np.all(np.isfinite(losses)), losses
  first, last = np.mean(losses[:3]), np.mean(losses[-3:])
  assert last < 0.8 * first, f'configs/zoo.py:{name}: loss did not fall: {losses}'
