"""Quickstart: LLaVA-1.5-style MLP projector between a small ViT and a small Llama-shaped LM, trained from
scratch in the procedural shapes world, with a blind (no-image) baseline trained on the same budget.

  ./launch.sh                                        # = configs/quickstart.py, writes runs/quickstart/
  ./launch.sh configs/quickstart.py:smoke --workdir /tmp/smoke   # the same pipeline in about 2 minutes
  ./launch.sh configs/quickstart.py --config.model.projector.name=linear

Variants (get_config arg): '' (default, ~10 minutes on a 2-core laptop CPU), 'smoke' (tiny data and steps, for
tests and quick checks).
"""
import ml_collections as mlc

VARIANTS = ('', 'smoke')


def get_config(arg: str = ''):
  variant = arg or 'default'
  if variant not in ('default', 'smoke'):
    raise ValueError(f'configs/quickstart.py: unknown variant {arg!r} (use "" or "smoke")')
  smoke = variant == 'smoke'
  c = mlc.ConfigDict()
  c.name = 'quickstart'
  c.seed = 0
  c.baseline = 'blind'

  # Images on a 3x3 grid of 16 px cells; every training row packs up to 8 isolated turns (QA pairs, or the
  # caption) about one image, sharing the image prefix (see mmproj/data/pipeline.py).
  c.data = dict(name='shapes', data_dir='~/.cache/mmproj/data', image_size=48, grid=3, jitter=1,
                num_train=512 if smoke else 20_000, num_test=64 if smoke else 500, min_objects=1, max_objects=6,
                seed=0, text_len=64, turns=8, isolate_turns=True, caption_prob=0.1, worker_count=0)

  c.model = mlc.ConfigDict()
  c.model.use_image = True
  c.model.image_token_id = 3
  c.model.dtype = 'float32'
  c.model.encoder = dict(name='vit', image_size=48, patch_size=16, width=96, depth=3, num_heads=4, mlp_dim=384,
                         output_layer=-1, cls_token=False, pre_norm=False, final_norm=True, norm_eps=1e-6,
                         act='gelu')
  c.model.projector = dict(name='mlp', depth=2)
  c.model.lm = dict(vocab_size=64, width=128, depth=3, num_heads=4, num_kv_heads=2, head_dim=None, mlp_dim=384,
                    rope_theta=10_000.0, norm_eps=1e-6, tie_embeddings=False, max_len=256)

  c.train = dict(steps=60 if smoke else 800, batch_size=32 if smoke else 64, learning_rate=1e-3,
                 warmup_steps=10 if smoke else 100, end_lr_frac=0.05, weight_decay=0.01, grad_clip=1.0,
                 b1=0.9, b2=0.98, trainable=['.*'], frozen=[])
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  c.sharding_rules = None   # None = mmproj.train.sharding.DEFAULT_RULES
  c.checkpoint = dict(every=20 if smoke else 200, keep=3, async_save=True)
  c.log_every = 10 if smoke else 50
  c.eval = dict(batch_size=64 if smoke else 250, max_new_tokens=6, max_examples=None)
  return c
