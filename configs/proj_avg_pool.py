"""Average pooling + MLP (DeCo): adaptive 2-D average pooling to 3x3, then a 2-layer GELU MLP, M = 9 tokens.

Trained from scratch in the shapes world on the zoo's shared budget (mmproj/config_lib.py): a 96-wide ViT with
8 px patches (a 6x6 grid, N = 36 tokens) and a 128-wide Llama-shaped LM.
Gemma3's pooling projector: --config.model.projector.norm=rmsnorm --config.model.projector.depth=1
--config.model.projector.use_bias=False.

  ./launch.sh configs/proj_avg_pool.py   # full budget + blind baseline
  ./launch.sh configs/proj_avg_pool.py:smoke --workdir /tmp/avg_pool   # ~2 minutes
  python experiments/projector_zoo.py --only avg_pool   # in the zoo table
"""
from mmproj import config_lib

VARIANTS = config_lib.VARIANTS


def get_config(arg: str = ''):
  return config_lib.shapes_experiment(
      arg, name='proj_avg_pool', patch_size=8,
      projector=dict(name='avg_pool', output_grid=3))
