"""MLP projector (LLaVA-1.5 mlp2x_gelu): a depth-2 GELU MLP per patch, M = N = 36 visual tokens.

Trained from scratch in the shapes world on the zoo's shared budget (mmproj/config_lib.py): a 96-wide ViT with
8 px patches (a 6x6 grid, N = 36 tokens) and a 128-wide Llama-shaped LM.

  ./launch.sh configs/proj_mlp.py   # full budget + blind baseline
  ./launch.sh configs/proj_mlp.py:smoke --workdir /tmp/mlp   # ~2 minutes
  python experiments/projector_zoo.py --only mlp   # in the zoo table
"""
from mmproj import config_lib

VARIANTS = config_lib.VARIANTS


def get_config(arg: str = ''):
  return config_lib.shapes_experiment(
      arg, name='proj_mlp', patch_size=8,
      projector=dict(name='mlp', depth=2))
