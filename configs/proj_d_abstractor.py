"""D-Abstractor (Honeybee): deformable attention from 9 pooled queries on a 3x3 reference grid; M = 9.

Trained from scratch in the shapes world on the zoo's shared budget (mmproj/config_lib.py): a 96-wide ViT with
8 px patches (a 6x6 grid, N = 36 tokens) and a 128-wide Llama-shaped LM.

  ./launch.sh configs/proj_d_abstractor.py   # full budget + blind baseline
  ./launch.sh configs/proj_d_abstractor.py:smoke --workdir /tmp/d_abstractor   # ~2 minutes
  python experiments/projector_zoo.py --only d_abstractor   # in the zoo table
"""
from mmproj import config_lib

VARIANTS = config_lib.VARIANTS


def get_config(arg: str = ''):
  return config_lib.shapes_experiment(
      arg, name='proj_d_abstractor', patch_size=8,
      projector=dict(name='d_abstractor', num_queries=9, depth=2, num_heads=4, num_points=4, pos_emb_grid=(6, 6)))
