"""LLaVA-1.5 stage 2 (visual instruction tuning): start from stage 1's projector and train it together with the
LM (CLIP frozen) on the LLaVA-665K mixture in Vicuna's chat template, loss on the assistant turns only
(Liu et al. 2023): 1 epoch = 5198 steps at batch 128, lr 2e-5, cosine with 3% warmup, no weight decay.

  ./launch.sh configs/llava15_stage2.py:projector=runs/llava15_stage1,vision=/models/clip-vit-large-patch14-336,lm=/models/vicuna-7b-v1.5,tokenizer=/models/llava-1.5-7b-hf/tokenizer.json,json=/data/LLaVA-Instruct/llava_v1_5_mix665k.json,images=/data/LLaVA-Instruct

Arguments: as configs/llava15_stage1.py, plus projector (the stage-1 workdir whose projector params start this
run); frozen_dtype stores CLIP only, the trained LM stays float32. The image folder holds the mixture's coco/,
gqa/, ocr_vqa/, textvqa/ and vg/ subfolders.
"""
from mmproj import config_lib


def get_config(arg: str = ''):
  return config_lib.llava15_experiment(arg, stage=2, name='llava15_stage2')
