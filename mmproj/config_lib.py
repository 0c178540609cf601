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
                seed=0, text_len=64, turns=8, isolate_turns=True, caption_prob=1.0, worker_count=0)

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
                 b1=0.9, b2=0.98, trainable=['.*'], frozen=[])
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  c.sharding_rules = None   # None = mmproj.train.sharding.DEFAULT_RULES
  c.checkpoint = dict(every=20 if smoke else 200, keep=3, async_save=True)
  c.log_every = 10 if smoke else 50
  c.eval = dict(batch_size=64 if smoke else 250, max_new_tokens=6, max_examples=None)
  return c
