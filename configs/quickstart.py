"""Quickstart: LLaVA-1.5-style MLP projector between a small ViT and a small Llama-shaped LM, trained from
scratch in the procedural shapes world, with a blind (no-image) baseline trained on the same budget.

  ./launch.sh                                        # = configs/quickstart.py, writes runs/quickstart/
  ./launch.sh configs/quickstart.py:smoke --workdir /tmp/smoke   # the same pipeline in about 2 minutes
  ./launch.sh configs/quickstart.py --config.model.projector.name=linear

Variants (get_config arg): '' (default, ~10 minutes on a 2-core laptop CPU), 'smoke' (tiny data and steps, for
tests and quick checks). The encoder uses 16 px patches, one per grid cell (M = 9 visual tokens); the projector
zoo (configs/zoo.py) uses 8 px patches so that compressing projectors have a grid to compress.
"""
from mmproj import config_lib

VARIANTS = config_lib.VARIANTS


def get_config(arg: str = ''):
  return config_lib.shapes_experiment(arg, name='quickstart', patch_size=16, projector=dict(name='mlp', depth=2))
