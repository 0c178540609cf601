"""Perceiver resampler, Idefics2 variant (SwiGLU modality projection, RMSNorm, GQA), M = 9.

Trained from scratch in the shapes world on the zoo's shared budget (mmproj/config_lib.py): a 96-wide ViT with
8 px patches (a 6x6 grid, N = 36 tokens) and a 128-wide Llama-shaped LM.

  ./launch.sh configs/proj_perceiver_idefics2.py   # full budget + blind baseline
  ./launch.sh configs/proj_perceiver_idefics2.py:smoke --workdir /tmp/perceiver_idefics2   # ~2 minutes
  python experiments/projector_zoo.py --only perceiver_idefics2   # in the zoo table
"""
from mmproj import config_lib

VARIANTS = config_lib.VARIANTS


def get_config(arg: str = ''):
  return config_lib.shapes_experiment(
      arg, name='proj_perceiver_idefics2', patch_size=8,
      projector=dict(name='perceiver', variant='idefics2', num_latents=9, depth=2, num_heads=4, num_kv_heads=2,
                     head_dim=32))
