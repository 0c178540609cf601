"""Cross-attention projector: 9 learned queries attend to the patches (GQA, 1 layer + FF), M = 9.

Trained from scratch in the shapes world on the zoo's shared budget (mmproj/config_lib.py): a 96-wide ViT with
8 px patches (a 6x6 grid, N = 36 tokens) and a 128-wide Llama-shaped LM.

  ./launch.sh configs/proj_cross_attention.py   # full budget + blind baseline
  ./launch.sh configs/proj_cross_attention.py:smoke --workdir /tmp/cross_attention   # ~2 minutes
  python experiments/projector_zoo.py --only cross_attention   # in the zoo table
"""
from mmproj import config_lib

VARIANTS = config_lib.VARIANTS


def get_config(arg: str = ''):
  return config_lib.shapes_experiment(
      arg, name='proj_cross_attention', patch_size=8,
      projector=dict(name='cross_attention', num_queries=9, depth=1, num_heads=4, num_kv_heads=2))
