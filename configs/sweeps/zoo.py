"""Sweep: every connector of configs/scenes.py (frozen stage-0 ViT, pretrained LM, scenes world) and the blind
baseline from the same LM, 3 seeds: the projector zoo table.

  python experiments/sweep.py configs/sweeps/zoo.py --workdir runs/sweeps/zoo                       # 51 runs
  python experiments/sweep.py configs/sweeps/zoo.py --workdir runs/sweeps/zoo --collect --out experiments/results
  python experiments/sweep.py configs/sweeps/zoo.py:smoke --workdir /tmp/zoo-sweep                  # 1 run

Variants: '' (every entry and the blind baseline, seeds 0-2), 'smoke' (mlp at the smoke budget, seed 0: the tool
end to end in the test suite).
"""
from configs import scenes
from mmproj import config_lib


def get_config(arg: str = ''):
  return config_lib.zoo_sweep(arg, name='zoo', config='configs/scenes.py', names=scenes.ZOO, smoke_entry='mlp')
