"""Every projector config (configs/proj_*.py) trains in the shapes world: its loss falls within a few steps."""
from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest

from experiment_utils import REPO, load_config
from mmproj import projectors
from mmproj.train import trainer

PROJECTOR_CONFIGS = sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, 'configs', 'proj_*.py')))


def test_every_registered_projector_has_a_config():
  names = {load_config(path).model.projector.name for path in PROJECTOR_CONFIGS}
  assert names == set(projectors.REGISTRY), f'projectors without a config: {set(projectors.REGISTRY) - names}'


@pytest.mark.parametrize('path', PROJECTOR_CONFIGS)
def test_projector_config_trains(path, shapes_data_dir, tmp_path):
  """The smoke variant with one-block encoder and LM, 12 steps at a high learning rate: loss must fall."""
  cfg = load_config(path, 'smoke')
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
  assert last < 0.8 * first, f'{path}: loss did not fall: {losses}'
