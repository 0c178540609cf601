"""Flamingo gated cross-attention: the LM cross-attends to the 36 patch tokens through tanh-gated
XATTN-DENSE blocks (gates start at 0) before every LM block; one <image> marker token in the text.

Trained from scratch in the shapes world on the zoo's shared budget (mmproj/config_lib.py): a 96-wide ViT with
8 px patches (a 6x6 grid, N = 36 tokens) and a 128-wide Llama-shaped LM. Flamingo's own recipe freezes the
encoder and LM and trains only the blocks: --config.train.frozen="['encoder/.*', 'lm/(?!xattn_layers_).*']"
(with a pretrained encoder and LM; here everything trains from scratch).

  ./launch.sh configs/proj_gated_xattn.py   # full budget + blind baseline
  ./launch.sh configs/proj_gated_xattn.py:smoke --workdir /tmp/gated_xattn   # ~2 minutes
  python experiments/projector_zoo.py --only gated_xattn   # in the zoo table
"""
from mmproj import config_lib

VARIANTS = config_lib.VARIANTS


def get_config(arg: str = ''):
  return config_lib.shapes_experiment(
      arg, name='proj_gated_xattn', patch_size=8,
      projector=dict(name='gated_xattn', every=1, heads=4, ff_mult=2))
