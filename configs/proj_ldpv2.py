"""LDPv2 (MobileVLM V2): token MLP, 2x2 average pooling, positional depthwise conv; M = 9.

Trained from scratch in the shapes world on the zoo's shared budget (mmproj/config_lib.py): a 96-wide ViT with
8 px patches (a 6x6 grid, N = 36 tokens) and a 128-wide Llama-shaped LM.

  ./launch.sh configs/proj_ldpv2.py   # full budget + blind baseline
  ./launch.sh configs/proj_ldpv2.py:smoke --workdir /tmp/ldpv2   # ~2 minutes
  python experiments/projector_zoo.py --only ldpv2   # in the zoo table
"""
from mmproj import config_lib

VARIANTS = config_lib.VARIANTS


def get_config(arg: str = ''):
  return config_lib.shapes_experiment(
      arg, name='proj_ldpv2', patch_size=8,
      projector=dict(name='ldpv2'))
