"""Building blocks for experiment configs (configs/*.py): the shapes-world experiment every config starts from.

A config file stays a few lines: it names its projector and its variants, and `shapes_experiment` fills in the
data, encoder, LM, optimiser, mesh, checkpoint and eval settings, so every projector trains on the same budget.

  def get_config(arg=''):
    return config_lib.shapes_experiment(arg, name='proj_perceiver', patch_size=8,
                                        projector=dict(name='perceiver', num_latents=9, depth=2))
"""
from __future__ import annotations

import ml_collections as mlc

VARIANTS = ('', 'smoke')  # '' = the full CPU budget; 'smoke' = tiny data and steps, for tests and quick checks


def parse_variant(arg: str, where: str) -> bool:
  """'' or 'smoke' -> smoke flag; ValueError naming the config file otherwise."""
  if arg not in VARIANTS:
    raise ValueError(f'{where}: unknown variant {arg!r} (use one of {VARIANTS})')
  return arg == 'smoke'


def shapes_experiment(arg: str, *, name: str, projector: dict, patch_size: int = 16, steps: int = 800,
                      baseline: str = 'blind') -> mlc.ConfigDict:
  """A small ViT + projector + Llama-shaped LM trained from scratch in the shapes world.

  arg: '' (full budget, `steps` steps at batch 64) or 'smoke' (60 steps at batch 32 on 512 images).
  patch_size: 16 gives the encoder a 3x3 grid (one patch per cell), 8 a 6x6 grid (N = 36), which the
  compressing projectors need.
  """
  smoke = parse_variant(arg, f'configs/{name}.py')
  c = mlc.ConfigDict()
  c.name = name
  c.seed = 0
  c.baseline = baseline

  # Images on a 3x3 grid of 16 px cells. Every training row packs up to 8 isolated turns about one image,
  # sharing the image prefix (mmproj/data/pipeline.py); the first turn is the caption with probability
  # caption_prob. Captions name every object's size, colour and shape in reading order: that dense signal is
  # what teaches the from-scratch ViT colour-independent shape features. With QA pairs alone (caption_prob 0.1)
  # shape questions stay at chance after 800 steps; with 1.0, shape and colour questions pass 70%.
  c.data = dict(name='shapes', data_dir='~/.cache/mmproj/data', image_size=48, grid=3, jitter=1,
                num_train=512 if smoke else 20_000, num_test=64 if smoke else 500, min_objects=1, max_objects=6,
                seed=0, text_len=64, turns=8, isolate_turns=True, caption_prob=1.0, worker_count=0,
                read_threads=1,       # rows are built in Python: a 2nd thread only contends for the GIL
                bad_records='error')  # unreadable record: 'error' | 'skip' (a stand-in row, counted)

  c.model = mlc.ConfigDict()
  c.model.use_image = True
  c.model.image_token_id = 3
  c.model.dtype = 'float32'
  c.model.encoder = dict(name='vit', image_size=48, patch_size=patch_size, width=96, depth=3, num_heads=4,
                         mlp_dim=384, output_layer=-1, cls_token=False, pre_norm=False, final_norm=True,
                         norm_eps=1e-6, act='gelu')
  c.model.projector = dict(projector)
  c.model.lm = dict(vocab_size=64, width=128, depth=3, num_heads=4, num_kv_heads=2, head_dim=None, mlp_dim=384,
                    rope_theta=10_000.0, norm_eps=1e-6, tie_embeddings=False, max_len=256)

  c.train = dict(steps=60 if smoke else steps, batch_size=32 if smoke else 64, learning_rate=1e-3,
                 warmup_steps=10 if smoke else 100, end_lr_frac=0.05, weight_decay=0.01, grad_clip=1.0,
                 b1=0.9, b2=0.98, trainable=['.*'], frozen=[], grad_accum_steps=1,
                 on_nonfinite='skip',  # NaN/Inf loss or grads: 'skip' the update (counted) | 'stop', last good saved
                 loss_positions='auto')  # vocab projection at the text positions only | 'all' | 'K'
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  c.sharding_rules = None   # None = mmproj.train.sharding.DEFAULT_RULES
  c.checkpoint = dict(every=20 if smoke else 200, keep=3, async_save=True)
  c.log_every = 10 if smoke else 50
  c.eval = dict(batch_size=64 if smoke else 250, max_new_tokens=6, max_examples=mlc.config_dict.placeholder(int))
  return c


def parse_arg(arg: str, where: str, **defaults) -> mlc.ConfigDict:
  """'key=value,key2=value2' -> ConfigDict over `defaults` (values cast to the default's type; an unknown key is
  a ValueError naming the config file). big_vision-style config arguments, e.g. `llava15_stage1.py:lm=/m/vicuna`."""
  out = mlc.ConfigDict(defaults)
  for item in filter(None, (a.strip() for a in arg.split(','))):
    key, sep, value = item.partition('=')
    if not sep or key not in defaults:
      raise ValueError(f'{where}: bad argument {item!r}; expected key=value with key in {sorted(defaults)}')
    default = defaults[key]
    out[key] = type(default)(value) if default is not None and not isinstance(default, str) else value
  return out


# LLaVA-1.5-7B's parts (Liu et al. 2023, "Improved Baselines with Visual Instruction Tuning"): CLIP ViT-L/14 at
# 336 px (openai/clip-vit-large-patch14-336), penultimate layer, CLS dropped -> 24 x 24 = 576 tokens; Vicuna-7B
# v1.5 (lmsys/vicuna-7b-v1.5, a Llama-2-7B fine-tune); a 2-layer GELU MLP between them. Used when the HF
# directories are not on this machine (abstract builds, memory estimates); otherwise their config.json wins.
CLIP_L14_336 = dict(name='vit', image_size=336, patch_size=14, width=1024, depth=24, num_heads=16, mlp_dim=4096,
                    output_layer=-2, cls_token=True, pre_norm=True, final_norm=False, norm_eps=1e-5,
                    act='quick_gelu', image_mean=[0.48145466, 0.4578275, 0.40821073],
                    image_std=[0.26862954, 0.26130258, 0.27577711])
VICUNA_7B = dict(vocab_size=32064, width=4096, depth=32, num_heads=32, num_kv_heads=32, head_dim=128,
                 mlp_dim=11008, rope_theta=10_000.0, norm_eps=1e-5, tie_embeddings=False, max_len=4096,
                 qkv_bias=False, rope_scaling=None, sliding_window=None)
VICUNA_13B = dict(VICUNA_7B, width=5120, depth=40, num_heads=40, num_kv_heads=40, mlp_dim=13824)
LLAVA_IMAGE_TOKEN_ID = 32000   # <image> in llava-hf/llava-1.5-7b-hf's tokenizer.json


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def hf_model_parts(vision_dir: str, lm_dir: str, tokenizer_path: str, *, output_layer: int = -2,
                   image_token: str = '<image>', default_lm: dict | None = None) -> tuple[dict, dict, int]:
  """(cfg.model.encoder, cfg.model.lm, image_token_id) from HF directories when they exist, else LLaVA-1.5-7B's.

  The LM's vocabulary is the larger of the checkpoint's and the tokenizer's, rounded up to a multiple of 64
  (32000 + <image> + <pad> -> 32064, as llava-hf); the rows added start at the mean embedding (train/pretrained.py).
  """
  import json
  import os

  from mmproj.convert import hf_dir, llama, vision
  from mmproj.data import preprocess

  vision_dir, lm_dir, tokenizer_path = (os.path.expanduser(p) for p in (vision_dir, lm_dir, tokenizer_path))
  encoder = dict(CLIP_L14_336)
  if os.path.isfile(os.path.join(vision_dir, 'config.json')):
    hf = hf_dir.read_config(vision_dir)
    encoder = vision.encoder_config_from_hf(hf, output_layer=output_layer)
    clip = encoder['cls_token']
    encoder['image_mean'] = list(preprocess.OPENAI_CLIP_MEAN if clip else preprocess.IMAGENET_STANDARD_MEAN)
    encoder['image_std'] = list(preprocess.OPENAI_CLIP_STD if clip else preprocess.IMAGENET_STANDARD_STD)
    if os.path.isfile(os.path.join(vision_dir, 'preprocessor_config.json')):
      processor = preprocess.ImageProcessor.from_dir(vision_dir)
      encoder['image_mean'], encoder['image_std'] = list(processor.image_mean), list(processor.image_std)
  lm, image_token_id = dict(default_lm or VICUNA_7B), LLAVA_IMAGE_TOKEN_ID
  if os.path.isfile(os.path.join(lm_dir, 'config.json')):
    lm = llama.lm_config_from_hf(hf_dir.read_config(lm_dir))
  tok_file = os.path.join(tokenizer_path, 'tokenizer.json') if os.path.isdir(tokenizer_path) else tokenizer_path
  if os.path.isfile(tok_file):
    with open(tok_file) as f:
      tok = json.load(f)
    vocab = dict(tok['model'].get('vocab') or {})
    vocab.update({t['content']: t['id'] for t in tok.get('added_tokens', [])})
    if image_token not in vocab:
      raise ValueError(f'data.tokenizer={tokenizer_path}: no {image_token} token (use a LLaVA tokenizer.json, e.g. '
                       "llava-hf/llava-1.5-7b-hf's, or add it as a special token)")
    image_token_id = vocab[image_token]
    lm['vocab_size'] = _round_up(max(lm['vocab_size'], max(vocab.values()) + 1), 64)
  return encoder, lm, image_token_id


def llava15_experiment(arg: str, *, stage: int, name: str, size: str = '7b', fsdp: int = 1, scan: bool = False,
                       remat: str = 'none') -> mlc.ConfigDict:
  """LLaVA-1.5 training on LLaVA-format data with a released CLIP and LM (see configs/llava15_stage*.py).

  size: '7b' | '13b' (the Vicuna v1.5 the defaults describe); fsdp: the fsdp mesh axis (-1 = every device,
  params and optimizer state sharded; the data axis takes the rest); scan/remat: model.*.scan_layers and
  model.remat, the memory levers for large models."""
  where = f'configs/{name}.py'
  if stage == 1:
    defaults = dict(json='~/data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json', images='~/data/LLaVA-Pretrain/images',
                    steps=2180, batch=256, lr=1e-3, projector='')
  else:
    defaults = dict(json='~/data/LLaVA-Instruct/llava_v1_5_mix665k.json', images='~/data/LLaVA-Instruct',
                    steps=5198, batch=128, lr=2e-5, projector='runs/llava15_stage1')
  a = parse_arg(arg, where, vision='~/models/clip-vit-large-patch14-336', lm=f'~/models/vicuna-{size}-v1.5',
                tokenizer='~/models/llava-1.5-7b-hf/tokenizer.json', data_dir='~/.cache/mmproj/data',
                text_len=1472, dtype='bfloat16', save_every=500, log_every=10, fsdp=fsdp, tensor=1,
                scan=int(scan), remat=remat, **defaults)
  encoder, lm, image_token_id = hf_model_parts(a.vision, a.lm, a.tokenizer,
                                               default_lm={'7b': VICUNA_7B, '13b': VICUNA_13B}[size])
  lm['scan_layers'] = encoder['scan_layers'] = bool(a.scan)

  c = mlc.ConfigDict()
  c.name = name
  c.seed = 0
  c.baseline = ''
  # Stage 1 (feature alignment): image + caption, loss on the caption; stage 2 (visual instruction tuning):
  # multi-turn conversations in Vicuna's template, loss on the assistant turns; images padded to a square
  # with the mean colour, as LLaVA-1.5's fine-tuning does.
  c.data = dict(name='llava_json', json=a.json, image_dir=a.images, data_dir=a.data_dir, tokenizer=a.tokenizer,
                template='plain' if stage == 1 else 'vicuna_v1', text_len=a.text_len,
                image_size=encoder['image_size'], image_aspect='crop' if stage == 1 else 'pad',
                image_mean=list(encoder['image_mean']),
                overflow='truncate', image_token='<image>', bos_token='<s>', eos_token='</s>', worker_count=0,
                bad_records='error')  # malformed entry / undecodable image: 'error' | 'skip' (counted)
  c.model = mlc.ConfigDict()
  c.model.use_image = True
  c.model.image_token_id = image_token_id
  c.model.dtype = a.dtype
  c.model.remat = a.remat
  c.model.encoder = encoder
  c.model.projector = dict(name='mlp', depth=2, act='gelu', use_bias=True)
  c.model.lm = lm
  c.init = dict(encoder=a.vision, lm=a.lm, projector=a.projector or None)
  # Stage 1 trains the projector only; stage 2 the projector and the LM. The CLIP tower stays frozen.
  c.train = dict(steps=a.steps, batch_size=a.batch, learning_rate=a.lr, warmup_steps=max(1, round(0.03 * a.steps)),
                 end_lr_frac=0.0, weight_decay=0.0, grad_clip=1.0, b1=0.9, b2=0.999,
                 trainable=['projector/.*'] if stage == 1 else ['projector/.*', 'lm/.*'], frozen=[],
                 grad_accum_steps=1, on_nonfinite='skip', loss_positions='auto')
  c.mesh = dict(data=-1 if a.fsdp != -1 else 1, fsdp=a.fsdp, tensor=a.tensor)
  c.sharding_rules = None
  c.checkpoint = dict(every=a.save_every, keep=3, async_save=True)
  c.log_every = a.log_every
  c.eval = dict(batch_size=8, max_new_tokens=32, max_examples=mlc.config_dict.placeholder(int))
  return c


def load_config_file(spec: str) -> mlc.ConfigDict:
  """'configs/x.py[:ARG]' -> get_config(ARG), as `--config` of mmproj.main reads it."""
  import importlib.util
  import os

  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'config file {path} not found')
  module_spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()
