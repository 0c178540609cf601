"""Building blocks for experiment configs (configs/*.py): cfg.model's fields (`model_config`), the shapes-world
experiment most configs start from, LLaVA-1.5's, and the one config-file loader. Pure: nothing here reads the disk
but `load_config_file` (the config file itself).

A config file stays a few lines: it names its projector and its variants, and `shapes_experiment` fills in the
data, encoder, LM, optimiser, mesh, checkpoint and eval settings, so every projector trains on the same budget
(configs/zoo.py holds one entry per projector family).

  def get_config(arg=''):
    return config_lib.shapes_experiment(arg, name='quickstart', patch_size=16, projector=dict(name='mlp', depth=2))
"""
from __future__ import annotations

import ast
from collections.abc import Sequence
from typing import Any

import ml_collections as mlc

VARIANTS = ('', 'smoke')  # '' = the full CPU budget; 'smoke' = tiny data and steps, for tests and quick checks


def model_config(*, lm: dict, encoder: dict | None = None, projector: dict | None = None, image_token_id: int = 0,
                 use_image: bool = True, dtype: str = 'float32', param_dtype: dict | None = None,
                 remat: str = 'none', kernels: dict | None = None, modality: str = 'image',
                 num_frames: int | None = None, output: dict | None = None) -> mlc.ConfigDict:
  """cfg.model with every model-level field; the one place they default. The towers' own fields default in their
  modules (mmproj/encoders/vit.py ViT, mmproj/lm/llama.py Llama); their memory levers are added here:
  scan_layers=False and remat=None (= model.remat).

    use_image       False: the blind baseline (LM only, no encoder or projector)
    modality        the media the encoder reads, and their batch key: 'image' | 'video' (a ViT), 'audio'
                    (a Whisper-shaped encoder); mmproj/model.py MODALITIES
    num_frames      video only: frames per example (the token counts depend on it)
    dtype           compute dtype, 'float32' | 'bfloat16'
    param_dtype     {'encoder', 'projector', 'lm'}: the dtype each tower's params are stored in, 'float32' or, for
                    a frozen tower, 'bfloat16' (half the memory; trained params and optimizer state stay float32)
    remat           'none' | 'dots' | 'minimal' | 'full' for both towers (mmproj/layers/scan.py)
    kernels         {'dense', 'attention'}: implementations (mmproj/layers/kernels.py); 'auto' = plain XLA, or
                    cuDNN attention on a GPU in bf16
    output          the output side (mmproj/model.py): {num_signal_tokens, signal_token_id, projector (an output
                    projector, mmproj/output_projectors), generator (the generator's fields, mmproj/generators)}
  """
  levers = dict(scan_layers=False, remat=None)
  c = mlc.ConfigDict()
  c.use_image = use_image
  c.modality = modality
  if num_frames is not None:
    c.num_frames = num_frames
  c.image_token_id = image_token_id
  c.dtype = dtype
  c.param_dtype = {'encoder': 'float32', 'projector': 'float32', 'lm': 'float32', **(param_dtype or {})}
  c.remat = remat
  c.kernels = {'dense': 'auto', 'attention': 'auto', **(kernels or {})}
  c.lm = {**levers, **lm}
  if use_image or encoder is not None:
    c.encoder = {**levers, **encoder}
    c.projector = dict(projector)
  if output:
    c.output = dict(output)
  return c


def parse_variant(arg: str, where: str) -> bool:
  """'' or 'smoke' -> smoke flag; ValueError naming the config file otherwise."""
  if arg not in VARIANTS:
    raise ValueError(f'{where}: unknown variant {arg!r} (use one of {VARIANTS})')
  return arg == 'smoke'


def zoo_argument(arg: str, zoo: dict, where: str, options: Sequence[str] = ('smoke',)) -> tuple[str, tuple[str, ...]]:
  """A zoo config's argument 'NAME[,OPTION]...' -> (NAME, the options given), each option one of `options`;
  ValueError naming the file, the names and the options."""
  name, *given = arg.split(',')
  usage = f'use {where}:NAME[,{"|".join(options)}]... with NAME one of {", ".join(zoo)}'
  if name not in zoo:
    raise ValueError(f'{where}: unknown projector {name!r}; {usage}')
  bad = [o for o in given if o not in options or given.count(o) > 1]
  if bad:
    raise ValueError(f'{where}: unknown or repeated option {bad[0]!r} in {arg!r}; {usage}')
  return name, tuple(given)


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

  c.model = model_config(
      image_token_id=3, projector=projector,
      encoder=dict(name='vit', image_size=48, patch_size=patch_size, width=96, depth=3, num_heads=4, mlp_dim=384,
                   output_layer=-1, cls_token=False, pre_norm=False, final_norm=True, norm_eps=1e-6, act='gelu'),
      lm=dict(vocab_size=64, width=128, depth=3, num_heads=4, num_kv_heads=2, head_dim=None, mlp_dim=384,
              rope_theta=10_000.0, norm_eps=1e-6, tie_embeddings=False, max_len=256))

  c.train = dict(steps=60 if smoke else steps, batch_size=32 if smoke else 64, learning_rate=1e-3,
                 warmup_steps=10 if smoke else 100, end_lr_frac=0.05, weight_decay=0.01, grad_clip=1.0,
                 b1=0.9, b2=0.98, trainable=['.*'], frozen=[], grad_accum_steps=1,
                 on_nonfinite='skip',  # NaN/Inf loss or grads: 'skip' the update (counted) | 'stop', last good saved
                 loss_positions='auto',  # vocab projection at the text positions only | 'all' | 'K'
                 device_peak_flops=None)  # FLOP/s of one device for MFU; None: the accelerator table (CPU: no MFU)
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  c.sharding_rules = None   # None = mmproj.train.sharding.DEFAULT_RULES
  c.init = dict(encoder=None, lm=None, projector=None)   # HF directories / a workdir to start parts from
  c.checkpoint = dict(every=20 if smoke else 200, keep=3, async_save=True)
  c.log_every = 10 if smoke else 50
  c.eval = dict(batch_size=64 if smoke else 250, max_new_tokens=6, max_examples=mlc.config_dict.placeholder(int))
  return c


# The audio and video worlds (configs/audio_tones.py, configs/video_motion.py): the shapes_experiment budget and LM,
# with the world's data and a from-scratch encoder for its modality.
def tones_experiment(arg: str, *, name: str, projector: dict, steps: int = 800,
                     baseline: str = 'blind') -> mlc.ConfigDict:
  """A small Whisper-shaped encoder + projector + Llama-shaped LM trained from scratch in the tones world
  (mmproj/data/tones.py): 2 s clips at 16 kHz, 80 mel bins, 200 frames -> T = 100 encoder tokens.
  model.encoder.chunk_length follows data.clip_seconds. arg: '' (full budget) or 'smoke'."""
  smoke = parse_variant(arg, f'configs/{name}.py')
  c = shapes_experiment(arg, name=name, projector=projector, steps=steps, baseline=baseline)
  c.data = dict(name='tones', data_dir='~/.cache/mmproj/data', clip_seconds=2.0, min_events=1, max_events=4,
                num_train=512 if smoke else 10_000, num_test=64 if smoke else 500, seed=0, text_len=64, turns=8,
                isolate_turns=True, caption_prob=1.0, worker_count=0, read_threads=1, bad_records='error')
  c.model = model_config(
      image_token_id=3, projector=projector, modality='audio',
      encoder=dict(name='whisper', num_mel_bins=80, chunk_length=2.0, width=96, depth=3, num_heads=4, mlp_dim=384,
                   output_layer=-1, final_norm=True, pool_stride=1),
      lm=c.model.lm.to_dict())
  c.model.encoder.chunk_length = c.data.get_ref('clip_seconds')     # the encoder reads the world's whole clips
  return c


def motion_experiment(arg: str, *, name: str, projector: dict, encoder: dict | None = None, steps: int = 800,
                      baseline: str = 'blind') -> mlc.ConfigDict:
  """A small ViT (each frame on its own) + projector + Llama-shaped LM trained from scratch in the motion world
  (mmproj/data/motion.py): 8 frames of 48 px on a 3x3 board, 12 px patches -> a 4x4 grid per frame, 8 x 16 = 128
  encoder tokens. model.num_frames follows data.num_frames. encoder: overrides of the ViT's fields (e.g.
  temporal_patch_size). arg: '' (full budget) or 'smoke'."""
  smoke = parse_variant(arg, f'configs/{name}.py')
  c = shapes_experiment(arg, name=name, projector=projector, steps=steps, baseline=baseline)
  c.data = dict(name='motion', data_dir='~/.cache/mmproj/data', image_size=48, grid=3, num_frames=8,
                max_objects=3, max_move=1, num_train=512 if smoke else 10_000, num_test=64 if smoke else 500,
                seed=0, text_len=64, turns=8, isolate_turns=True, caption_prob=1.0, worker_count=0, read_threads=1,
                bad_records='error')
  c.model = model_config(image_token_id=3, projector=projector, modality='video', num_frames=c.data.num_frames,
                         encoder=dict(c.model.encoder.to_dict(), patch_size=12, **(encoder or {})), lm=c.model.lm.to_dict())
  c.model.num_frames = c.data.get_ref('num_frames')
  return c


# The pretrained-tower regime (configs/scenes.py, configs/stage0/scenes.py): the scenes world (mmproj/data/shapes.py) at
# 96 px on a 6x6 grid, a SigLIP-shaped ViT with 16 px patches (one per cell: a 6x6 grid, N = 36 tokens) and a
# Llama-shaped LM, both pretrained in stage 0 (mmproj/stage0.py) and loaded through cfg.init.
def scenes_data(smoke: bool) -> dict:
  return dict(name='shapes', world='scenes', data_dir='~/.cache/mmproj/data', image_size=96, grid=6, jitter=1,
              num_train=512 if smoke else 20_000, num_test=64 if smoke else 500, min_objects=1, max_objects=12,
              max_glyphs=3, seed=0, text_len=96, turns=8, isolate_turns=True, caption_prob=1.0, worker_count=0,
              read_threads=1, bad_records='error')


def scenes_encoder(smoke: bool) -> dict:
  return dict(name='vit', image_size=96, patch_size=16, width=32 if smoke else 128, depth=1 if smoke else 4,
              num_heads=2 if smoke else 4, mlp_dim=64 if smoke else 512, output_layer=-1, cls_token=False,
              pre_norm=False, final_norm=True, norm_eps=1e-6, act='gelu_tanh', image_mean=[0.5, 0.5, 0.5],
              image_std=[0.5, 0.5, 0.5])


def scenes_lm(smoke: bool) -> dict:
  return dict(vocab_size=96, width=32 if smoke else 128, depth=1 if smoke else 4, num_heads=2 if smoke else 4,
              num_kv_heads=1 if smoke else 2, head_dim=16 if smoke else 32, mlp_dim=64 if smoke else 384,
              rope_theta=10_000.0, norm_eps=1e-6, tie_embeddings=False, max_len=256, qkv_bias=False,
              rope_scaling=None, sliding_window=None)


def _scenes_run(smoke: bool, *, name: str, use_image: bool, projector: dict | None, steps: int,
                batch_size: int) -> mlc.ConfigDict:
  c = shapes_experiment('smoke' if smoke else '', name=name, projector=projector or {}, steps=steps)
  c.data = scenes_data(smoke)
  c.model = model_config(image_token_id=3, use_image=use_image, projector=projector,
                         encoder=scenes_encoder(smoke) if use_image else None, lm=scenes_lm(smoke))
  c.train.batch_size = 32 if smoke else batch_size
  return c


def stage0_recipe(smoke: bool = False) -> mlc.ConfigDict:
  """What stage 0 (mmproj/stage0.py) trains: a SigLIP-shaped ViT against a small text tower, and a text-only LM,
  both in the scenes world. smoke: toy sizes and a few steps (tests)."""
  r = mlc.ConfigDict()
  r.cache_dir = '~/.cache/mmproj/stage0'
  r.data = scenes_data(smoke)
  text = dict(scenes_lm(smoke), depth=1 if smoke else 2, num_kv_heads=2 if not smoke else 1)
  r.vision = dict(encoder=scenes_encoder(smoke), text=text, embed_dim=32 if smoke else 128, text_len=80,
                  steps=20 if smoke else 1500, batch_size=16 if smoke else 128, learning_rate=1e-3,
                  warmup_steps=5 if smoke else 100, end_lr_frac=0.05, weight_decay=0.01, grad_clip=1.0, b1=0.9,
                  b2=0.98, seed=0, log_every=10 if smoke else 100, checkpoint_every=10 if smoke else 250,
                  hard_negatives=True,
                  # SigLIP 2's caption decoder loss (mmproj/stage0.py: Captioner), weight 0 = SigLIP alone;
                  # it writes the objects in reading order ('shuffled' kept less of shapes and cells).
                  caption_weight=1.0, caption_order='reading',
                  captioner=dict(vocab_size=text['vocab_size'], width=text['width'], depth=1 if smoke else 2,
                                 num_heads=text['num_heads'], mlp_dim=text['mlp_dim']))
  lm = _scenes_run(smoke, name='stage0_lm', use_image=False, projector=None, steps=600, batch_size=64)
  lm.baseline = 'none'
  lm.data.isolate_turns = False        # the questions read the caption before them
  lm.data.caption_prob = 1.0
  if smoke:
    lm.train.steps = 20
  r.lm = lm
  return r


# The draw world of the output side (issue 22): the scenes world at 32 px on a 2x2 grid (16 px cells, the
# quickstart's cell size), 1-2 objects, no glyphs, so a caption is at most 10 words ("large red circle top left
# small blue square bottom right"). These are the world's own fields; a data pipeline adds its row fields
# (text_len, turns, ...) around them, e.g. dict(scenes_data(smoke), **draw_world(smoke)).
def draw_world(smoke: bool = False) -> dict:
  return dict(name='shapes', world='scenes', data_dir='~/.cache/mmproj/data', image_size=32, grid=2, jitter=1,
              num_train=64 if smoke else 20_000, num_test=16 if smoke else 500, min_objects=1, max_objects=2,
              max_glyphs=0, seed=0)


def generator_recipe(smoke: bool = False) -> mlc.ConfigDict:
  """What mmproj/stage0_generator.py trains: the draw world's "given" generator (mmproj/generators: a causal text
  encoder + a rectified-flow DiT, trained jointly, GLIDE-style), and how its report samples. smoke: toy sizes and
  a few steps (tests)."""
  r = mlc.ConfigDict()
  r.cache_dir = '~/.cache/mmproj/stage0'
  r.data = draw_world(smoke)
  # text_len 16: a two-object caption is 12 tokens with <bos> and <eos>. vocab_size: the scenes LM's (the world's
  # tokenizer uses 70 ids).
  r.generator = dict(vocab_size=96, text_len=16, text_width=32 if smoke else 128, text_depth=1 if smoke else 2,
                     text_heads=2 if smoke else 4, text_mlp_dim=64 if smoke else 512, image_size=32, patch_size=4,
                     width=32 if smoke else 128, depth=1 if smoke else 4, num_heads=2 if smoke else 4,
                     mlp_dim=64 if smoke else 512, pooled_text=True, time_sampling='logit_normal',
                     prediction='data')
  # 5000 steps at batch 64: ~0.65 s a step measured while a sweep held both cores of the 2-core CPU host, about
  # half that idle, so the whole build (world, training, report) takes ~30 min there (~57 min beside a sweep).
  r.train = dict(steps=30 if smoke else 5000, batch_size=8 if smoke else 64, learning_rate=1e-3,
                 warmup_steps=2 if smoke else 200, end_lr_frac=0.05, b1=0.9, b2=0.99, weight_decay=0.01,
                 grad_clip=1.0,
                 caption_dropout=0.1,     # a caption's cond is replaced by the null conditioning (for CFG)
                 ema_decay=0.999,         # the saved params are this EMA of the trained ones
                 seed=0, log_every=5 if smoke else 100, checkpoint_every=15 if smoke else 250)
  # The report's samples: one image per test caption (num_images of them; None = all), at the guidance scale a
  # generator is used with, and at guidance 1 (no CFG) beside it.
  r.sample = dict(steps=4 if smoke else 25, guidance=3.0, num_images=mlc.config_dict.placeholder(int),
                  batch_size=16 if smoke else 100, seed=0)
  return r


# Options of a connector run between the stage-0 towers (configs/scenes.py:NAME[,OPTION]...). Without a stage
# option a run is one stage whose training rows hold the image's caption and then question turns.
#   align      LLaVA's stage 1 (feature alignment): captions only, ALIGN_STEPS steps, the LM frozen, so only the
#              connector trains (for gated_xattn: its cross-attention blocks inside the LM); evaluated on
#              ALIGN_EVAL_EXAMPLES questions (its caption loss is its figure)
#   instruct   LLaVA's stage 2 (visual instruction tuning): question turns only, INSTRUCT_STEPS steps, connector and
#              LM trained. It starts from an align run with --config.init.projector=<that run's workdir>; without
#              one it is Prismatic's single-stage recipe (Karamcheti et al. 2024)
#   frozen_lm  the LM stays frozen in any stage (the frozen-LM setting of Flamingo and Idefics2's Table 3)
#   pretrain   qformer only: BLIP-2's stage 1, the Q-Former alone on the frozen ViT with ITC + ITM + ITG on the
#              captions (mmproj/qformer_stage1.py) at 1e-3; an align run starts from it through init.projector
#   smoke      toy towers and budget (tests)
SCENES_OPTIONS = ('smoke', 'align', 'instruct', 'frozen_lm', 'pretrain')
# The two stages together cost about one 600-step run of the one-stage regime (a frozen-LM step is cheaper): the
# findings (experiments/findings/) run 129 of them.
ALIGN_STEPS, INSTRUCT_STEPS, ALIGN_EVAL_EXAMPLES = 200, 500, 100
# Every LM param but the gated cross-attention blocks an injecting connector adds (mmproj/lm/llama.py).
FROZEN_LM = 'lm/(?!xattn_layers_).*'


def scenes_experiment(options: str | Sequence[str], *, name: str, projector: dict, steps: int = 600,
                      batch_size: int = 64, baseline: str = 'blind') -> mlc.ConfigDict:
  """A connector between the stage-0 towers (frozen ViT, pretrained LM) trained in the scenes world; the blind
  baseline starts from the same LM. options: a subset of SCENES_OPTIONS (or one comma-separated string)."""
  options = tuple(filter(None, options.split(','))) if isinstance(options, str) else tuple(options)
  where = f'configs/{name}.py'
  if any(o not in SCENES_OPTIONS for o in options) or len({'align', 'instruct', 'pretrain'} & set(options)) > 1:
    raise ValueError(f'{where}: options {options}: each one of {SCENES_OPTIONS}, at most one of align / instruct / '
                     'pretrain')
  if 'pretrain' in options and projector.get('name') != 'qformer':
    raise ValueError(f'{where}: option pretrain is BLIP-2\'s Q-Former stage 1; projector {projector.get("name")!r} '
                     'has none')
  smoke = 'smoke' in options
  c = _scenes_run(smoke, name=name, use_image=True, projector=projector, steps=steps, batch_size=batch_size)
  c.baseline = baseline
  c.stage0 = stage0_recipe(smoke)
  c.init = dict(encoder='stage0', lm='stage0', projector=None)
  c.train.frozen = ['encoder/.*']
  # 3e-3 rather than the from-scratch runs' 1e-3: at 600 x 64 the mlp run's position answers went 13% -> 26% and
  # existence 51% -> 72% (experiments/results/scenes_first_runs.md).
  c.train.learning_rate = 3e-3
  if 'align' in options:
    c.data.update(turns=1, caption_prob=1.0)
    if not smoke:
      c.train.steps, c.eval.max_examples = ALIGN_STEPS, ALIGN_EVAL_EXAMPLES
      c.train.warmup_steps = ALIGN_STEPS // 10     # LLaVA's stage 1 warms up for 3%; 100 would be half of it
  if 'instruct' in options:
    c.data.caption_prob = 0.0
    c.train.steps = c.train.steps if smoke else INSTRUCT_STEPS
  if 'align' in options or 'frozen_lm' in options:
    c.train.frozen.append(FROZEN_LM)
  if 'pretrain' in options:
    c.objective = 'qformer_stage1'
    c.init.lm = None                   # the LM plays no part; its vocabulary sizes the Q-Former's text side
    c.train.learning_rate = 1e-3       # a from-scratch post-LN BERT with its own heads, as the stage-0 towers
  return c


# The output side (configs/draw.py:NAME[,OPTION]...): text -> image through signal tokens, an output projector and
# the stage-0 generator (mmproj/stage0_generator.py), between which the stage-0 LM (frozen) is asked to draw.
#   align      NExT-GPT's / GILL's stage 1: the output projector's conditioning regressed (MSE) onto the
#              generator's own text encoding of the caption; the signal rows and the output projector train
#   generate   stage 2: the generator's flow-matching loss on the record's image through the output projector
#              (the generator frozen); start it from an align run with --config.init.output=<that run's workdir>
#   train_lm   the LM trains too (both stages keep it frozen otherwise)
#   smoke      toy towers, generator and budget (tests)
DRAW_OPTIONS = ('smoke', 'align', 'generate', 'train_lm')
DRAW_SIGNAL_TOKENS = 4        # K, GILL's r = 8 at laptop scale


def draw_experiment(options: str | Sequence[str], *, name: str, projector: dict, steps: int = 600,
                    batch_size: int = 64) -> mlc.ConfigDict:
  """An output projector between the stage-0 LM and the stage-0 generator, trained on the draw task
  (mmproj/data/draw.py) in the generator's world. options: a subset of DRAW_OPTIONS with exactly one of align /
  generate (or one comma-separated string)."""
  options = tuple(filter(None, options.split(','))) if isinstance(options, str) else tuple(options)
  where = f'configs/{name}.py'
  if any(o not in DRAW_OPTIONS for o in options) or len({'align', 'generate'} & set(options)) != 1:
    raise ValueError(f'{where}: options {options}: each one of {DRAW_OPTIONS}, exactly one of align / generate')
  smoke = 'smoke' in options
  generator = generator_recipe(smoke)
  c = _scenes_run(smoke, name=name, use_image=False, projector=None, steps=steps, batch_size=batch_size)
  c.baseline = 'none'
  # Rows: <bos> draw <caption, <= 10 words> <sep> [IMG0]..[IMG3] <eos> = 17 tokens at most.
  c.data = dict(generator.data.to_dict(), task='draw', signal_tokens=DRAW_SIGNAL_TOKENS,
                gen_text_len=generator.generator.text_len, text_len=20, worker_count=0, read_threads=1,
                bad_records='error')
  c.model = model_config(image_token_id=3, use_image=False, lm=c.model.lm.to_dict(),
                         output=dict(num_signal_tokens=DRAW_SIGNAL_TOKENS, signal_token_id=SCENE_DRAW_VOCAB_SIZE,
                                     projector=dict(projector), generator=generator.generator.to_dict()))
  c.model.output.num_signal_tokens = c.data.get_ref('signal_tokens')
  c.stage0 = stage0_recipe(smoke)
  c.generator = generator
  c.init = dict(encoder=None, lm='stage0', projector=None, output=None, generator='stage0')
  c.train.trainable = ['output/.*'] + (['lm/.*'] if 'train_lm' in options else [])
  c.train.frozen = ['generator/.*']
  c.train.output_loss = 'align' if 'align' in options else 'generate'
  c.train.output_loss_weight = 1.0
  c.eval = dict(batch_size=16 if smoke else 100, max_examples=16 if smoke else 500,
                draw_steps=generator.sample.steps, draw_guidance=generator.sample.guidance, draw_seed=0)
  return c


# The scenes tokenizer's ids (mmproj/data/shapes.py SCENE_VOCAB_SIZE: 6 specials + 64 words) and then the draw
# task's word 'draw' (mmproj/data/draw.py): [IMG0] is the next id. Checked against the tokenizer by the trainer.
SCENE_DRAW_VOCAB_SIZE = 71


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
# v1.5 (lmsys/vicuna-7b-v1.5, a Llama-2-7B fine-tune), its vocabulary grown to llava-hf's tokenizer (32000 +
# <image> + <pad>, rounded up to 32064); a 2-layer GELU MLP between them. A run checks the HF directories it starts
# from against these (mmproj/train/pretrained.py) and stops naming the first field that differs.
CLIP_L14_336 = dict(name='vit', image_size=336, patch_size=14, width=1024, depth=24, num_heads=16, mlp_dim=4096,
                    output_layer=-2, cls_token=True, pre_norm=True, final_norm=False, norm_eps=1e-5,
                    act='quick_gelu', image_mean=[0.48145466, 0.4578275, 0.40821073],
                    image_std=[0.26862954, 0.26130258, 0.27577711])
VICUNA_7B = dict(vocab_size=32064, width=4096, depth=32, num_heads=32, num_kv_heads=32, head_dim=128,
                 mlp_dim=11008, rope_theta=10_000.0, norm_eps=1e-5, tie_embeddings=False, max_len=4096,
                 qkv_bias=False, rope_scaling=None, sliding_window=None)
VICUNA_13B = dict(VICUNA_7B, width=5120, depth=40, num_heads=40, num_kv_heads=40, mlp_dim=13824)
LLAVA_IMAGE_TOKEN_ID = 32000   # <image> in llava-hf/llava-1.5-7b-hf's tokenizer.json


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
                text_len=1472, dtype='bfloat16', frozen_dtype='bfloat16', save_every=500, log_every=10, fsdp=fsdp,
                tensor=1, scan=int(scan), remat=remat, **defaults)
  encoder = dict(CLIP_L14_336, scan_layers=bool(a.scan))
  lm = dict({'7b': VICUNA_7B, '13b': VICUNA_13B}[size], scan_layers=bool(a.scan))

  c = mlc.ConfigDict()
  c.name = name
  c.seed = 0
  c.baseline = ''
  # Stage 1 (feature alignment): image + caption, loss on the caption; stage 2 (visual instruction tuning):
  # multi-turn conversations in Vicuna's template, loss on the assistant turns; images padded to a square
  # with the mean colour, as LLaVA-1.5's fine-tuning does.
  c.data = dict(name='llava_json', json=a.json, image_dir=a.images, data_dir=a.data_dir, tokenizer=a.tokenizer,
                template='plain' if stage == 1 else 'vicuna_v1', text_len=a.text_len,
                image_aspect='crop' if stage == 1 else 'pad',
                overflow='truncate', image_token='<image>', bos_token='<s>', eos_token='</s>', worker_count=0,
                bad_records='error')  # malformed entry / undecodable image: 'error' | 'skip' (counted)
  # The frozen towers are stored in frozen_dtype (stage 1: CLIP and the LM; stage 2: CLIP), the trained ones in f32.
  c.model = model_config(image_token_id=LLAVA_IMAGE_TOKEN_ID, dtype=a.dtype, remat=a.remat, encoder=encoder, lm=lm,
                         projector=dict(name='mlp', depth=2, act='gelu', use_bias=True),
                         param_dtype=dict(encoder=a.frozen_dtype, lm=a.frozen_dtype if stage == 1 else 'float32'))
  # The images are prepared at the tower's size, padded with its mean colour (references: they follow the encoder).
  c.data.image_size = c.model.encoder.get_ref('image_size')
  c.data.image_mean = c.model.encoder.get_ref('image_mean')
  c.init = dict(encoder=a.vision, lm=a.lm, projector=a.projector or None)
  # Stage 1 trains the projector only; stage 2 the projector and the LM. The CLIP tower stays frozen.
  c.train = dict(steps=a.steps, batch_size=a.batch, learning_rate=a.lr, warmup_steps=max(1, round(0.03 * a.steps)),
                 end_lr_frac=0.0, weight_decay=0.0, grad_clip=1.0, b1=0.9, b2=0.999,
                 trainable=['projector/.*'] if stage == 1 else ['projector/.*', 'lm/.*'], frozen=[],
                 grad_accum_steps=1, on_nonfinite='skip', loss_positions='auto', device_peak_flops=None)
  c.mesh = dict(data=-1 if a.fsdp != -1 else 1, fsdp=a.fsdp, tensor=a.tensor)
  c.sharding_rules = None
  c.checkpoint = dict(every=a.save_every, keep=3, async_save=True)
  c.log_every = a.log_every
  c.eval = dict(batch_size=8, max_new_tokens=32, max_examples=mlc.config_dict.placeholder(int))
  return c


def sweep_cells(config: str, axes: dict[str, Sequence[Any]], *, fixed: dict[str, Any] | None = None,
                name: str = '') -> list[dict]:
  """The cells of a sweep (configs/sweeps/, run by experiments/sweep.py) over the product of `axes` ({config
  field: values}) on one experiment config, every cell also setting `fixed`. A cell's name is `name` (if any)
  and each axis as field=value, joined by ','; e.g. sweep_cells('configs/zoo.py:mlp', {'model.projector.depth':
  [1, 2]}) -> cells 'model.projector.depth=1' and '...=2'."""
  import itertools
  cells = []
  for values in itertools.product(*axes.values()):
    chosen = dict(zip(axes, values))
    label = ','.join([name] * bool(name) + [f'{k}={v}' for k, v in chosen.items()])
    cells.append(dict(name=label.replace('/', '_') or 'base', config=config, overrides={**(fixed or {}), **chosen}))
  return cells


def sweep_base(name: str, smoke: bool) -> mlc.ConfigDict:
  """A sweep config's name ('<name>_smoke' for the smoke variant) and seeds (0-2; smoke: 0); the caller adds
  cells (and optionally metric / reference_metric: experiments/sweep.py)."""
  c = mlc.ConfigDict()
  c.name = f'{name}_smoke' if smoke else name
  c.seeds = [0] if smoke else [0, 1, 2]
  return c


def zoo_sweep(arg: str, *, name: str, config: str, names: Sequence[str], smoke_entry: str,
              budget: dict[str, Any] | None = None) -> mlc.ConfigDict:
  """A connector table's sweep: every entry `names` of the zoo config `config` (configs/X.py, entries NAME) and the
  blind baseline on the first one's budget, seeds 0-2, no per-run baseline, `budget` overrides (e.g. train.steps)
  on every run; arg 'smoke': `smoke_entry` at its smoke budget, seed 0 (the sweep tool end to end in tests)."""
  smoke = parse_variant(arg, f'configs/sweeps/{name}.py')
  names = [smoke_entry] if smoke else list(names)
  variant = ',smoke' if smoke else ''
  c = mlc.ConfigDict()
  c.name = f'{name}_smoke' if smoke else name
  c.seeds = [0] if smoke else [0, 1, 2]
  fixed = {'baseline': 'none', **({} if smoke else budget or {})}
  c.cells = [dict(name=n, config=f'{config}:{n}{variant}', overrides=dict(fixed)) for n in names]
  if not smoke:
    c.cells.append(dict(name='blind', config=f'{config}:{names[0]}', overrides={**fixed, 'model.use_image': False}))
  return c


def llava_cells(name: str, entry: str, *, frozen_lm: bool = False, one_stage: bool = False,
                overrides: dict[str, Any] | None = None, start: str | None = None, smoke: bool = False,
                where: str = 'configs/scenes.py') -> list[dict]:
  """The sweep cells of one connector trained LLaVA's way between the stage-0 towers (experiments/findings/):
  '<name>.align' (stage 1, `where`:ENTRY,align) and '<name>' (stage 2, ENTRY,instruct, starting from the align
  run of the same seed), both with `overrides` (e.g. {'model.projector.depth': 6}). frozen_lm: stage 2 keeps the
  LM frozen too, cell '<name>.frozen_lm'. one_stage: no stage 1 (Prismatic's single stage), cell
  '<name>.one_stage'. start: where the first stage's connector starts (its init.projector, e.g. '{run:CELL}' of
  a BLIP-2 stage-1 run). The align cell's name does not depend on the stage-2 choices, so sweeps sharing a workdir
  run it once for all of them. smoke: the entries' smoke variants, and stage 2 alone (tests)."""
  smoke_opt = ',smoke' if smoke else ''
  stage2 = dict(name=name + '.frozen_lm' * frozen_lm + '.one_stage' * one_stage,
                config=f'{where}:{entry},instruct{",frozen_lm" * frozen_lm}{smoke_opt}',
                overrides={'baseline': 'none', **(overrides or {})})
  if one_stage or smoke:
    if start:
      stage2['overrides']['init.projector'] = start
    return [stage2]
  stage2['overrides']['init.projector'] = '{run:%s.align}' % name
  align = dict(name=f'{name}.align', config=f'{where}:{entry},align',
               overrides={'baseline': 'none', **(overrides or {}), **({'init.projector': start} if start else {})})
  return [align, stage2]


def finding_sweep(name: str, smoke: bool, *, title: str, source: str) -> mlc.ConfigDict:
  """The fields every findings sweep (experiments/findings/) shares: name (smoke: '<name>_smoke'), title, source,
  seeds (0-2; smoke: 0) and store, the one directory their runs' copies go to (experiments/findings.py)."""
  c = mlc.ConfigDict()
  c.name = name + '_smoke' * smoke
  c.store = 'findings' + '_smoke' * smoke
  c.title, c.source = title, source
  c.seeds = [0] if smoke else [0, 1, 2]
  return c


def frozen_lm_cells(names: Sequence[str], settings: Sequence[bool], smoke: bool) -> list[dict]:
  """llava_cells for each zoo entry in `names` with stage 2's LM frozen and/or trained (`settings`), each align cell
  once."""
  return unique_cells([cell for name in names for frozen in settings
                       for cell in llava_cells(name, name, frozen_lm=frozen, smoke=smoke)])


def unique_cells(cells: Sequence[dict]) -> list[dict]:
  """`cells` with repeats (same name) dropped; ValueError when two cells of one name differ."""
  out: dict[str, dict] = {}
  for c in cells:
    if c['name'] in out and out[c['name']] != c:
      raise ValueError(f'two different sweep cells are named {c["name"]!r}: {out[c["name"]]} and {c}')
    out.setdefault(c['name'], c)
  return list(out.values())


def load_config_file(spec: str, overrides: Sequence[str] = ()) -> mlc.ConfigDict:
  """'configs/x.py[:ARG]' -> get_config(ARG), then each override 'a.b.c=value' applied (the value a Python
  literal, else a string; true/false as booleans): the one way every entry point (mmproj.main, the memory planner,
  the benchmarks, the tests) reads a config file. An override of a field the config does not have, or of the
  wrong type, is a ValueError naming it."""
  import importlib.util
  import os

  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'config file {path} not found')
  module_spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  cfg = module.get_config(arg) if arg else module.get_config()
  for item in overrides:
    field, sep, text = item.partition('=')
    if not sep:
      raise ValueError(f'override {item!r}: expected field=value, e.g. train.steps=200')
    set_field(cfg, field, _literal(text))
  return cfg


def recipe_from_command_line(prog: str, description: str, example: str,
                             argv: Sequence[str] | None = None) -> mlc.ConfigDict:
  """The stage-0 builders' command line, `python -m PROG RECIPE[:ARG] [FIELD=VALUE ...]`, read into its recipe;
  on a CPU host without GLIBC_TUNABLES it says how to run faster (launch.sh's malloc setting)."""
  import argparse
  import os

  parser = argparse.ArgumentParser(prog=f'python -m {prog}', description=description)
  parser.add_argument('config', help=f'a recipe config file, e.g. {example}[:smoke]')
  parser.add_argument('overrides', nargs='*', help='FIELD=VALUE settings of the recipe')
  args = parser.parse_args(argv)
  recipe = load_config_file(args.config, args.overrides)
  import jax                                   # after the arguments: --help and bad input need no backend
  if jax.default_backend() == 'cpu' and 'GLIBC_TUNABLES' not in os.environ:
    print("note: GLIBC_TUNABLES is unset; on a CPU host XLA steps run faster under launch.sh's setting: "
          f'GLIBC_TUNABLES=$(python benchmarks/host_malloc.py) python -m {prog} ...', flush=True)
  return recipe


def _literal(text: str) -> Any:
  if text in ('true', 'false'):
    return text == 'true'
  try:
    return ast.literal_eval(text)
  except (SyntaxError, ValueError):
    return text


def set_field(cfg: mlc.ConfigDict, field: str, value: Any) -> None:
  """cfg.<field> = value for a dotted field ('model.lm.width'); ValueError naming it when the config has no such
  field or the value has the wrong type (an int where a float goes is converted)."""
  *parents, leaf = field.split('.')
  node = cfg
  for i, key in enumerate(parents):
    if not isinstance(node, mlc.ConfigDict) or key not in node:
      raise ValueError(f'config field {".".join(parents[:i + 1])} does not exist (override of {field})')
    node = node[key]
  if not isinstance(node, mlc.ConfigDict) or leaf not in node:
    raise ValueError(f'config field {field} does not exist')
  try:
    node[leaf] = value
  except TypeError as e:
    raise ValueError(f'config field {field}: {e}') from None
