"""Perceiver resampler (Flamingo): 9 learned latents attend to [visual tokens; latents], 2 blocks, M = 9.

Trained from scratch in the shapes world on the zoo's shared budget (mmproj/config_lib.py): a 96-wide ViT with
8 px patches (a 6x6 grid, N = 36 tokens) and a 128-wide Llama-shaped LM.

  ./launch.sh configs/proj_perceiver.py   # full budget + blind baseline
  ./launch.sh configs/proj_perceiver.py:smoke --workdir /tmp/perceiver   # ~2 minutes
  python experiments/projector_zoo.py --only perceiver   # in the zoo table
"""
from mmproj import config_lib

VARIANTS = config_lib.VARIANTS


def get_config(arg: str = ''):
  return config_lib.shapes_experiment(
      arg, name='proj_perceiver', patch_size=8,
      projector=dict(name='perceiver', num_latents=9, depth=2, num_heads=4, head_dim=24))
