"""Qwen-VL resampler: one cross-attention layer, 9 queries with 2-D sin-cos positions, M = 9.

Trained from scratch in the shapes world on the zoo's shared budget (mmproj/config_lib.py): a 96-wide ViT with
8 px patches (a 6x6 grid, N = 36 tokens) and a 128-wide Llama-shaped LM.

  ./launch.sh configs/proj_qwen_vl_resampler.py   # full budget + blind baseline
  ./launch.sh configs/proj_qwen_vl_resampler.py:smoke --workdir /tmp/qwen_vl_resampler   # ~2 minutes
  python experiments/projector_zoo.py --only qwen_vl_resampler   # in the zoo table
"""
from mmproj import config_lib

VARIANTS = config_lib.VARIANTS


def get_config(arg: str = ''):
  return config_lib.shapes_experiment(
      arg, name='proj_qwen_vl_resampler', patch_size=8,
      projector=dict(name='qwen_vl_resampler', num_queries=9, num_heads=4))
