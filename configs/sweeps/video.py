"""Sweep: the video connectors of configs/video_motion.py (a from-scratch ViT over frames and LM, motion world) and the blind baseline on the same budget, 3 seeds: the video connector table.

  python experiments/sweep.py configs/sweeps/video.py --workdir runs/sweeps/video --jobs 2
  python experiments/sweep.py configs/sweeps/video.py --workdir runs/sweeps/video --collect --out experiments/results
  python experiments/sweep.py configs/sweeps/video.py:smoke --workdir /tmp/video-sweep                 # 1 run

Variants: '' (every entry and the blind baseline, seeds 0-2), 'smoke' (the default connector at the smoke budget,
seed 0: the tool end to end in the test suite).
"""
import ml_collections

from configs import video_motion
from mmproj import config_lib


def get_config(arg: str = ''):
  smoke = config_lib.parse_variant(arg, 'configs/sweeps/video.py')
  names = [video_motion.DEFAULT] if smoke else list(video_motion.ZOO)
  variant = ',smoke' if smoke else ''
  c = ml_collections.ConfigDict()
  c.name = 'video_smoke' if smoke else 'video'
  c.seeds = [0] if smoke else [0, 1, 2]
  c.cells = [dict(name=n, config=f'configs/video_motion.py:{n}{variant}', overrides={'baseline': 'none'}) for n in names]
  if not smoke:
    c.cells.append(dict(name='blind', config=f'configs/video_motion.py:{names[0]}',
                        overrides={'baseline': 'none', 'model.use_image': False}))
  return c
