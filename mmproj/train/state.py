"""What a run is made of before anything is compiled: the validated config, the model, the mesh, the optimizer,
and the shape and sharding of every train-state leaf.

    s = setup(cfg)                 # every config error is raised here, naming the field
    s.abstract_state               # TrainState of ShapeDtypeStructs carrying their NamedShardings
    s.seq_len, s.num_image_tokens, s.loss_positions

Checkpoints, memory planning, FLOP counts and pretrained loading all work from a Setup; the trainer runs it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from mmproj.data import worlds
from mmproj import model as model_lib
from mmproj.encoders import build_encoder
from mmproj.train import optimizer as opt_lib
from mmproj.train import sharding as shard_lib

NONFINITE_POLICIES = ('skip', 'stop')


@flax.struct.dataclass
class TrainState:
  step: jax.Array             # int32 scalar: batches consumed (= updates applied + updates skipped)
  params: Any
  opt_state: Any
  nonfinite_steps: jax.Array  # int32 scalar: steps whose loss or gradients were NaN/Inf (update not applied)
  halted_at: jax.Array        # int32 scalar: train.on_nonfinite='stop': the first such step, 0 while none

  @classmethod
  def create(cls, params, opt_state, step=0) -> 'TrainState':
    zero = jnp.zeros((), jnp.int32)
    return cls(step=zero + step, params=params, opt_state=opt_state, nonfinite_steps=zero, halted_at=zero)


@dataclasses.dataclass
class Setup:
  cfg: ml_collections.ConfigDict
  model: Any
  mesh: jax.sharding.Mesh
  rules: tuple
  tx: optax.GradientTransformation
  labels: Any                   # 'train' / 'freeze' per param
  abstract_state: TrainState    # ShapeDtypeStructs carrying their shardings
  state_sharding: TrainState
  batch_sharding: NamedSharding
  seq_len: int
  num_image_tokens: int
  loss_positions: int | None    # positions per row the loss projects to the vocabulary (None: all seq_len)


def sequence_length(cfg) -> int:
  return model_lib.num_image_tokens(cfg.model) + int(cfg.data.text_len)


def media_spec(cfg) -> tuple[str, tuple[int, ...], Any]:
  """(batch key, shape of one example's media, dtype) the data gives: a procedural world's own media
  (mmproj.data.pipeline.media_spec), else images of data.image_size (LLaVA-format data)."""
  if worlds.name_of(cfg.data) in worlds.WORLDS:
    from mmproj.data import pipeline  # pylint: disable=g-import-not-at-top
    return pipeline.media_spec(cfg.data)
  size = int(cfg.data.image_size)
  return 'image', (size, size, 3), jnp.uint8


def dummy_batch(cfg, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
  seq = sequence_length(cfg)
  key, shape, dtype = media_spec(cfg)
  return {
      key: jax.ShapeDtypeStruct((batch_size,) + shape, dtype),
      'tokens': jax.ShapeDtypeStruct((batch_size, seq), jnp.int32),
      'positions': jax.ShapeDtypeStruct((batch_size, seq), jnp.int32),
      'input_mask': jax.ShapeDtypeStruct((batch_size, seq), jnp.int32),
  }


def loss_positions(cfg) -> int | None:
  """How many positions per row the train loss projects to the vocabulary (train.loss_positions), or None for all
  L of them.

  'auto' (default): with visual tokens merged into the sequence, L - M (= data.text_len): no placeholder but the
  last of an image has a text target, so a row with one image has at most that many loss positions; all
  positions otherwise. 'K' or K (an int, 1 <= K <= L) sets it; 'all': every position. Exact whatever the value:
  a batch with a row of more than K loss positions takes the every-position path (see token_loss_sums)."""
  value = cfg.train.loss_positions
  length = sequence_length(cfg)
  text = str(value).strip()
  if text == 'all':
    return None
  if text == 'auto':
    merged = bool(cfg.model.use_image) and not model_lib.injects_into_lm(cfg.model)
    k = length - model_lib.num_image_tokens(cfg.model) if merged else length
  elif not isinstance(value, bool) and text.isdigit() and 1 <= int(text) <= length:
    k = int(text)
  else:
    raise ValueError(f"train.loss_positions={value!r} must be 'auto', 'all' or an int in [1, {length}] (the "
                     f'sequence length L = image tokens + data.text_len)')
  return k if k < length else None


def check_media(cfg) -> None:
  """The data's media are what the model reads: the same kind (data's world vs model.modality) and size
  (image_size, clip length); ValueError naming both fields."""
  key, shape, _ = media_spec(cfg)
  modality = model_lib.modality(cfg.model)
  if key != modality:
    raise ValueError(f'data.name={worlds.name_of(cfg.data)!r} gives {key} but model.modality={modality!r}')
  encoder = build_encoder(cfg.model.encoder)
  if key == 'audio':
    if shape[0] != encoder.num_samples():
      raise ValueError(f'the data\'s clips hold {shape[0]} samples (data.clip_seconds) but the encoder reads '
                       f'{encoder.num_samples()} (model.encoder.chunk_length={encoder.chunk_length} s at 16 kHz)')
  elif shape[-3] != encoder.image_size:
    raise ValueError(f'data.image_size={shape[-3]} does not match model.encoder.image_size={encoder.image_size}')
  if key == 'video' and shape[0] != cfg.model.num_frames:
    raise ValueError(f'data.num_frames={shape[0]} does not match model.num_frames={cfg.model.num_frames}')


def validate(cfg) -> None:
  """Cross-field checks of the whole experiment config (model checks live in model.validate)."""
  model_lib.validate(cfg.model)
  if cfg.model.use_image:
    check_media(cfg)
  for field in ('steps', 'batch_size'):
    if int(cfg.train[field]) <= 0:
      raise ValueError(f'train.{field}={cfg.train[field]} must be positive')
  accum = int(cfg.train.grad_accum_steps)
  if accum < 1 or int(cfg.train.batch_size) % accum:
    raise ValueError(f'train.grad_accum_steps={accum} must be >= 1 and divide train.batch_size='
                     f'{cfg.train.batch_size}')
  if int(cfg.checkpoint.every) <= 0:
    raise ValueError(f'checkpoint.every={cfg.checkpoint.every} must be positive')
  policy = cfg.train.on_nonfinite
  if policy not in NONFINITE_POLICIES:
    raise ValueError(f'train.on_nonfinite={policy!r} must be one of {NONFINITE_POLICIES}')
  loss_positions(cfg)                                     # raises naming train.loss_positions
  from mmproj.train.loss import output_loss  # pylint: disable=g-import-not-at-top
  kind, _ = output_loss(cfg)                              # raises naming train.output_loss(_weight)
  if kind is not None and not model_lib.has_output(cfg.model):
    raise ValueError(f'train.output_loss={kind!r} needs an output side (model.output with num_signal_tokens > 0)')
  if kind is not None and cfg.data.get('task') != 'draw':
    raise ValueError(f"train.output_loss={kind!r} reads the draw task's captions and images: set data.task='draw' "
                     f'(got {cfg.data.get("task")!r})')


def check_generator_frozen(labels) -> None:
  """The given generator never trains (its role is Stable Diffusion's in NExT-GPT); ValueError naming the first
  generator parameter train.trainable / train.frozen would train."""
  leaves = jax.tree_util.tree_flatten_with_path(labels.get('generator', {}))[0]
  trained = [opt_lib.path_str(path) for path, label in leaves if label == 'train']
  if trained:
    raise ValueError(f"train.trainable / train.frozen train generator/{trained[0]}: the generator stays frozen (add "
                     f"'generator/.*' to train.frozen)")


def check_param_dtypes(cfg, labels) -> None:
  """A tower stored in a dtype other than float32 (model.param_dtype) must be frozen in every parameter: trained
  parameters take their AdamW updates in float32. ValueError naming the field and the first trained parameter."""
  for tower, dtype in model_lib.param_dtypes(cfg.model).items():
    if dtype == jnp.float32 or tower not in labels:
      continue
    trained = [opt_lib.path_str(path) for path, label in jax.tree_util.tree_flatten_with_path(labels[tower])[0]
               if label == 'train']
    if trained:
      raise ValueError(f'model.param_dtype.{tower}={cfg.model.param_dtype[tower]!r}, but train.trainable / '
                       f'train.frozen train {tower}/{trained[0]} ({len(trained)} {tower} parameters in all): trained '
                       f'parameters are stored in float32; store only a frozen tower in '
                       f'{cfg.model.param_dtype[tower]}')


def setup(cfg, devices: Sequence[jax.Device] | None = None, *, mesh: Any = None) -> Setup:
  """devices: the devices to lay cfg.mesh over (default all); or mesh: a ready Mesh, or a
  jax.sharding.AbstractMesh to plan shardings and memory for a topology this host does not have."""
  validate(cfg)
  if mesh is None:
    mesh = shard_lib.make_mesh(cfg.mesh, devices)
  rules = shard_lib.rules_from_config(cfg)
  shard_lib.check_batch_divisible(int(cfg.train.batch_size), mesh, rules)
  accum = int(cfg.train.grad_accum_steps)
  if accum > 1:
    shard_lib.check_batch_divisible(int(cfg.train.batch_size) // accum, mesh, rules,
                                    field='train.batch_size / train.grad_accum_steps')

  platform = mesh.devices.flat[0].platform if isinstance(mesh, jax.sharding.Mesh) else None
  probe = model_lib.build_model(cfg.model, platform=platform)
  boxed = jax.eval_shape(probe.init, jax.random.key(0), dummy_batch(cfg, 1))['params']
  params_sharding = shard_lib.logical_to_shardings(boxed, mesh, rules)
  abstract_params = flax.linen.unbox(boxed)
  labels = opt_lib.trainable_labels(abstract_params, cfg.train)
  check_param_dtypes(cfg, labels)
  check_generator_frozen(labels)
  abstract_params = jax.eval_shape(lambda p: model_lib.cast_params(p, cfg.model), abstract_params)
  model = model_lib.build_model(cfg.model, encoder_trainable=not opt_lib.is_frozen(labels, 'encoder'),
                                platform=platform)
  tx = opt_lib.make_optimizer(cfg.train, labels)

  replicated = NamedSharding(mesh, P())
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  opt_sharding = _like_params(abstract_opt, abstract_params, params_sharding, replicated)
  state_sharding = TrainState(step=replicated, params=params_sharding, opt_state=opt_sharding,
                              nonfinite_steps=replicated, halted_at=replicated)
  scalar = jax.ShapeDtypeStruct((), jnp.int32)
  abstract_state = TrainState(step=scalar, params=abstract_params, opt_state=abstract_opt, nonfinite_steps=scalar,
                              halted_at=scalar)
  abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                abstract_state, state_sharding)
  return Setup(cfg=cfg, model=model, mesh=mesh, rules=rules, tx=tx, labels=labels, abstract_state=abstract_state,
               state_sharding=state_sharding, batch_sharding=shard_lib.batch_sharding(mesh, rules),
               seq_len=sequence_length(cfg), num_image_tokens=model_lib.num_image_tokens(cfg.model),
               loss_positions=loss_positions(cfg))


def _like_params(opt_state, params, params_sharding, default):
  """Sharding for each optimizer-state leaf: a leaf whose path ends with a parameter's path and has its shape
  (Adam's mu/nu) is placed like that parameter; everything else (counters, masked nodes) gets `default`."""
  by_path = {}
  for (path, leaf), sharding in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                    jax.tree.leaves(params_sharding)):
    by_path[opt_lib.path_str(path)] = (leaf.shape, sharding)

  def place(path, leaf):
    keys = opt_lib.path_str(path).split('/')
    for start in range(len(keys)):
      shape, sharding = by_path.get('/'.join(keys[start:]), (None, None))
      if sharding is not None and shape == leaf.shape:
        return sharding
    return default

  return jax.tree_util.tree_map_with_path(place, opt_state)
