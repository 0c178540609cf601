"""Sweep: the video connectors of configs/video_motion.py (a from-scratch ViT over frames and LM, motion world) and
the blind baseline on the same budget (400 steps), 3 seeds: the video connector table.

  python experiments/sweep.py configs/sweeps/video.py --workdir runs/sweeps/video --jobs 2
  python experiments/sweep.py configs/sweeps/video.py --workdir runs/sweeps/video --collect --out experiments/results
  python experiments/sweep.py configs/sweeps/video.py:smoke --workdir /tmp/video-sweep                 # 1 run

Variants: '' (every entry and the blind baseline, seeds 0-2), 'smoke' (the default connector at the smoke budget,
seed 0), as config_lib.zoo_sweep makes them.
"""
from configs import video_motion
from mmproj import config_lib

# Half the quickstart's 800 steps, so that the table (3 seeds of every connector and the blind baseline) takes about
# two hours of a 2-core machine with --jobs 2.
BUDGET = {'train.steps': 400, 'train.warmup_steps': 50}


def get_config(arg: str = ''):
  return config_lib.zoo_sweep(arg, name='video', config='configs/video_motion.py', names=video_motion.ZOO,
                              smoke_entry=video_motion.DEFAULT, budget=BUDGET)
