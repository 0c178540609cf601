"""Q-Former (BLIP-2): 9 learned queries, 2 BERT-style layers with cross-attention to the patches in each,
then a linear map to the LM width; M = 9.

Trained from scratch in the shapes world on the zoo's shared budget (mmproj/config_lib.py): a 96-wide ViT with
8 px patches (a 6x6 grid, N = 36 tokens) and a 128-wide Llama-shaped LM. Here the Q-Former trains end to end
with the LM (no stage-1 ITC/ITM/ITG pretraining; see mmproj/projectors/qformer_losses.py for those objectives).

  ./launch.sh configs/proj_qformer.py   # full budget + blind baseline
  ./launch.sh configs/proj_qformer.py:smoke --workdir /tmp/qformer   # ~2 minutes
  python experiments/projector_zoo.py --only qformer   # in the zoo table
"""
from mmproj import config_lib

VARIANTS = config_lib.VARIANTS


def get_config(arg: str = ''):
  return config_lib.shapes_experiment(
      arg, name='proj_qformer', patch_size=8,
      projector=dict(name='qformer', num_query_tokens=9, hidden_dim=96, num_layers=2, num_heads=4, mlp_dim=384,
                     cross_attention_frequency=1))
