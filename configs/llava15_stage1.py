"""LLaVA-1.5 stage 1 (feature alignment): train the 2-layer MLP projector between a frozen CLIP ViT-L/14-336 and a
frozen Vicuna-7B v1.5 on LCS-558K image-caption pairs (Liu et al. 2023, "Improved Baselines with Visual
Instruction Tuning"): 1 epoch = 2180 steps at batch 256, lr 1e-3, cosine with 3% warmup, no weight decay.

  ./launch.sh configs/llava15_stage1.py:vision=/models/clip-vit-large-patch14-336,lm=/models/vicuna-7b-v1.5,tokenizer=/models/llava-1.5-7b-hf/tokenizer.json,json=/data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json,images=/data/LLaVA-Pretrain/images

Arguments (key=value, comma-separated; defaults under ~/models and ~/data): vision, lm (HF directories with
config.json + safetensors), tokenizer (a tokenizer.json holding <image>), json + images (LLaVA-format data),
data_dir (where the TFDS build goes), text_len, dtype (compute), frozen_dtype (storage of the frozen towers: here
CLIP and the LM), steps, batch, lr, save_every, log_every.
The model's sizes come from the HF directories' config.json; without them the config describes LLaVA-1.5-7B.
Then stage 2: configs/llava15_stage2.py.
"""
from mmproj import config_lib


def get_config(arg: str = ''):
  return config_lib.llava15_experiment(arg, stage=1, name='llava15_stage1')
