"""Sweep: every image connector of configs/scenes.py (frozen stage-0 ViT, pretrained LM, scenes world; not its
VIDEO_CONNECTORS) and the blind baseline from the same LM, 3 seeds: the projector zoo table.

  python experiments/sweep.py configs/sweeps/zoo.py --workdir runs/sweeps/zoo                       # 51 runs
  python experiments/sweep.py configs/sweeps/zoo.py --workdir runs/sweeps/zoo --collect --out experiments/results
  python experiments/sweep.py configs/sweeps/zoo.py:smoke --workdir /tmp/zoo-sweep                  # 1 run

Variants: '' (every entry and the blind baseline, seeds 0-2), 'smoke' (mlp at the smoke budget, seed 0: the tool
end to end in the test suite).
"""
import ml_collections

from configs import scenes
from mmproj import config_lib


def get_config(arg: str = ''):
  smoke = config_lib.parse_variant(arg, 'configs/sweeps/zoo.py')
  names = ['mlp'] if smoke else [n for n in scenes.ZOO if n not in scenes.VIDEO_CONNECTORS]
  variant = ',smoke' if smoke else ''
  c = ml_collections.ConfigDict()
  c.name = 'zoo_smoke' if smoke else 'zoo'
  c.seeds = [0] if smoke else [0, 1, 2]
  c.cells = [dict(name=n, config=f'configs/scenes.py:{n}{variant}', overrides={'baseline': 'none'}) for n in names]
  if not smoke:
    c.cells.append(dict(name='blind', config=f'configs/scenes.py:{names[0]}',
                        overrides={'baseline': 'none', 'model.use_image': False}))
  return c
