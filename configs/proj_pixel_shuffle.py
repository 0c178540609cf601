"""Pixel shuffle (InternVL head): 2x2 space-to-depth, LayerNorm + 2-layer MLP, M = 9 visual tokens.

Trained from scratch in the shapes world on the zoo's shared budget (mmproj/config_lib.py): a 96-wide ViT with
8 px patches (a 6x6 grid, N = 36 tokens) and a 128-wide Llama-shaped LM.
Idefics3 / SmolVLM's connector is the same shuffle with one bias-free linear: --config.model.projector.norm=none
--config.model.projector.depth=1 --config.model.projector.use_bias=False.

  ./launch.sh configs/proj_pixel_shuffle.py   # full budget + blind baseline
  ./launch.sh configs/proj_pixel_shuffle.py:smoke --workdir /tmp/pixel_shuffle   # ~2 minutes
  python experiments/projector_zoo.py --only pixel_shuffle   # in the zoo table
"""
from mmproj import config_lib

VARIANTS = config_lib.VARIANTS


def get_config(arg: str = ''):
  return config_lib.shapes_experiment(
      arg, name='proj_pixel_shuffle', patch_size=8,
      projector=dict(name='pixel_shuffle', scale_factor=2, norm='layernorm', depth=2, use_bias=True))
