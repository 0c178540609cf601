"""TokenPacker: each 2x2-pooled query attends only to its own 2x2 region of patches; M = 9.

Trained from scratch in the shapes world on the zoo's shared budget (mmproj/config_lib.py): a 96-wide ViT with
8 px patches (a 6x6 grid, N = 36 tokens) and a 128-wide Llama-shaped LM.

  ./launch.sh configs/proj_tokenpacker.py   # full budget + blind baseline
  ./launch.sh configs/proj_tokenpacker.py:smoke --workdir /tmp/tokenpacker   # ~2 minutes
  python experiments/projector_zoo.py --only tokenpacker   # in the zoo table
"""
from mmproj import config_lib

VARIANTS = config_lib.VARIANTS


def get_config(arg: str = ''):
  return config_lib.shapes_experiment(
      arg, name='proj_tokenpacker', patch_size=8,
      projector=dict(name='tokenpacker', scale=2, num_heads=4))
