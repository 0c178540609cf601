"""LLaVA-1.5-13B stage 2 at pod scale: CLIP ViT-L/14-336 + Vicuna-13B v1.5, projector + LM trained on LLaVA-665K,
params and optimizer state fully sharded over every chip (FSDP), one scanned block body per tower (fast compiles at
40 layers) and rematerialised blocks that keep only matmul outputs. Sized for a TPU v5p-64 slice (32 chips); the
per-chip state is printed by

  python -m mmproj.train.memory configs/llava15_13b_pod.py --devices 32

Launch on every worker of the slice (the repo checked out at ~/mmproj on each; see launch.sh's tpu mode):

  ./launch.sh tpu --name my-v5p-64 --zone us-east5-a configs/llava15_13b_pod.py:projector=/mnt/shared/runs/llava15_13b_stage1,vision=/mnt/models/clip-vit-large-patch14-336,lm=/mnt/models/vicuna-13b-v1.5,tokenizer=/mnt/models/llava-1.5-13b-hf/tokenizer.json,json=/mnt/data/llava_v1_5_mix665k.json,images=/mnt/data/LLaVA-Instruct --workdir /mnt/shared/runs/llava15_13b_stage2

The workdir must be one directory every worker sees (NFS / Filestore, or a bucket mounted with gcsfuse): every
process writes its checkpoint shards there. Arguments as configs/llava15_stage2.py (plus fsdp, tensor, scan,
remat).
"""
from mmproj import config_lib


def get_config(arg: str = ''):
  return config_lib.llava15_experiment(arg, stage=2, name='llava15_13b_pod', size='13b', fsdp=-1, scan=True,
                                       remat='dots')
