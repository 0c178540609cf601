"""Every projector has an entry in the zoos of its modality (images: configs/zoo.py from scratch and configs/scenes.py
on the stage-0 towers; audio: configs/audio_tones.py; video: configs/video_motion.py),
and every configs/scenes.py entry trains between the (smoke) pretrained towers: its loss falls within a few steps."""
from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest

from experiment_utils import REPO, load_config
from mmproj import projectors
from mmproj.train import trainer


def _zoo_names(config: str) -> list[str]:
  """A zoo's entry names, read from its table (the configs themselves go through load_config)."""
  spec = importlib.util.spec_from_file_location('zoo', os.path.join(REPO, config))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return list(module.ZOO)


ZOO_NAMES = _zoo_names('configs/scenes.py')


# Each zoo lists the families published for its modality (projectors.MODALITY).
ZOOS = {'configs/zoo.py': 'image', 'configs/scenes.py': 'image', 'configs/audio_tones.py': 'audio',
        'configs/video_motion.py': 'video'}


@pytest.mark.parametrize('config', sorted(ZOOS))
def test_every_registered_projector_has_a_zoo_entry(config):
  names = {load_config(config, name).model.projector.name for name in _zoo_names(config)}
  expected = {n for n, modality in projectors.MODALITY.items() if modality == ZOOS[config]}
  assert expected <= names, f'projectors without a {config} entry: {expected - names}'


@pytest.mark.parametrize('name', ZOO_NAMES)
def test_zoo_entry_trains(name, stage0_smoke, tmp_path):
  """The smoke variant (one-block towers from stage 0, the ViT frozen), 12 steps at a high learning rate: the
  loss must fall."""
  from mmproj import stage0
  recipe, _ = stage0_smoke
  cfg = load_config('configs/scenes.py', f'{name},smoke')
  cfg.data.data_dir, cfg.stage0.cache_dir = recipe.data.data_dir, recipe.cache_dir
  cfg = stage0.resolve_init(cfg, log=lambda msg: None)
  cfg.train.update(steps=12, batch_size=16, warmup_steps=2, learning_rate=3e-3)
  cfg.checkpoint.update(every=100, async_save=False)
  cfg.log_every = 1
  trainer.train(cfg, str(tmp_path))
  with open(tmp_path / 'metrics.jsonl') as f:
    losses = [r['loss'] for r in map(json.loads, f) if 'loss' in r]
  assert len(losses) == 12 and np.all(np.isfinite(losses)), losses
  first, last = np.mean(losses[:3]), np.mean(losses[-3:])
  assert last < 0.8 * first, f'configs/scenes.py:{name}: loss did not fall: {losses}'
