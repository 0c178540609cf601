"""Patch merger (Qwen2-VL): LayerNorm per patch, 2x2 merge, 2-layer GELU MLP, M = 9 visual tokens.

Trained from scratch in the shapes world on the zoo's shared budget (mmproj/config_lib.py): a 96-wide ViT with
8 px patches (a 6x6 grid, N = 36 tokens) and a 128-wide Llama-shaped LM.
Qwen2.5-VL's merger: --config.model.projector.norm=rmsnorm.

  ./launch.sh configs/proj_patch_merger.py   # full budget + blind baseline
  ./launch.sh configs/proj_patch_merger.py:smoke --workdir /tmp/patch_merger   # ~2 minutes
  python experiments/projector_zoo.py --only patch_merger   # in the zoo table
"""
from mmproj import config_lib

VARIANTS = config_lib.VARIANTS


def get_config(arg: str = ''):
  return config_lib.shapes_experiment(
      arg, name='proj_patch_merger', patch_size=8,
      projector=dict(name='patch_merger', spatial_merge_size=2))
