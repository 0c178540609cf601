"""The one training loop: sharded, jitted, checkpointed, resumable.

    setup(cfg)  -> model, mesh, optimizer and the sharding of every train-state leaf (nothing compiled yet)
    train(cfg, workdir) -> trains cfg.train.steps steps, resuming from the latest checkpoint in workdir

Every config error is raised by `setup` before anything is compiled.
"""
from __future__ import annotations

import collections
import dataclasses
import time
from typing import Any, Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from mmproj import model as model_lib
from mmproj.train import checkpoint as ckpt_lib
from mmproj.train import distributed
from mmproj.train import flops as flops_lib
from mmproj.train import memory as memory_lib
from mmproj.train import optimizer as opt_lib
from mmproj.train import pretrained
from mmproj.train import sharding as shard_lib
from mmproj.train.metrics import MetricWriter


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


def sequence_length(cfg) -> int:
  return model_lib.num_image_tokens(cfg.model) + int(cfg.data.text_len)


def dummy_batch(cfg, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
  seq, size = sequence_length(cfg), int(cfg.data.image_size)
  return {
      'image': jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.uint8),
      'tokens': jax.ShapeDtypeStruct((batch_size, seq), jnp.int32),
      'positions': jax.ShapeDtypeStruct((batch_size, seq), jnp.int32),
      'input_mask': jax.ShapeDtypeStruct((batch_size, seq), jnp.int32),
  }


def validate(cfg) -> None:
  """Cross-field checks of the whole experiment config (model checks live in model.validate)."""
  model_lib.validate(cfg.model)
  if cfg.model.use_image and int(cfg.data.image_size) != int(cfg.model.encoder.image_size):
    raise ValueError(f'data.image_size={cfg.data.image_size} does not match '
                     f'model.encoder.image_size={cfg.model.encoder.image_size}')
  for field in ('steps', 'batch_size'):
    if int(cfg.train[field]) <= 0:
      raise ValueError(f'train.{field}={cfg.train[field]} must be positive')
  accum = int(cfg.train.get('grad_accum_steps', 1) or 1)
  if accum < 1 or int(cfg.train.batch_size) % accum:
    raise ValueError(f'train.grad_accum_steps={accum} must be >= 1 and divide train.batch_size='
                     f'{cfg.train.batch_size}')
  if int(cfg.checkpoint.every) <= 0:
    raise ValueError(f'checkpoint.every={cfg.checkpoint.every} must be positive')
  policy = cfg.train.get('on_nonfinite', 'skip')
  if policy not in NONFINITE_POLICIES:
    raise ValueError(f'train.on_nonfinite={policy!r} must be one of {NONFINITE_POLICIES}')
  loss_positions(cfg)                                     # raises naming train.loss_positions


def setup(cfg, devices: Sequence[jax.Device] | None = None, *, mesh: Any = None) -> Setup:
  """devices: the devices to lay cfg.mesh over (default all); or mesh: a ready Mesh, or a
  jax.sharding.AbstractMesh to plan shardings and memory for a topology this host does not have."""
  validate(cfg)
  if mesh is None:
    mesh = shard_lib.make_mesh(cfg.mesh, devices)
  rules = shard_lib.rules_from_config(cfg)
  shard_lib.check_batch_divisible(int(cfg.train.batch_size), mesh, rules)
  accum = int(cfg.train.get('grad_accum_steps', 1) or 1)
  if accum > 1:
    shard_lib.check_batch_divisible(int(cfg.train.batch_size) // accum, mesh, rules,
                                    field='train.batch_size / train.grad_accum_steps')

  probe = model_lib.build_model(cfg.model)
  boxed = jax.eval_shape(probe.init, jax.random.key(0), dummy_batch(cfg, 1))['params']
  params_sharding = shard_lib.logical_to_shardings(boxed, mesh, rules)
  abstract_params = flax.linen.unbox(boxed)
  labels = opt_lib.trainable_labels(abstract_params, cfg.train)
  model = model_lib.build_model(cfg.model, encoder_trainable=not opt_lib.is_frozen(labels, 'encoder'))
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
               seq_len=sequence_length(cfg), num_image_tokens=model_lib.num_image_tokens(cfg.model))


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


def init_state(s: Setup, seed: int) -> TrainState:
  """A fresh train state: random params, with the parts named in cfg.init replaced by pretrained weights
  (mmproj/train/pretrained.py), and the optimizer state of those params."""
  batch = {k: jnp.zeros(v.shape, v.dtype) for k, v in dummy_batch(s.cfg, 1).items()}

  def init_params():
    return flax.linen.unbox(s.model.init(jax.random.key(seed), batch)['params'])

  def init_opt(params):
    return TrainState.create(params, s.tx.init(params))

  with jax.set_mesh(s.mesh):
    params = jax.jit(init_params, out_shardings=s.state_sharding.params)()
    loaded = pretrained.load(s.cfg)
    if loaded:
      params = pretrained.place(params, loaded, s.state_sharding.params)
    return jax.jit(init_opt, out_shardings=s.state_sharding, donate_argnums=0)(params)


def loss_positions(cfg) -> int | None:
  """How many positions per row the train loss projects to the vocabulary (train.loss_positions), or None for all
  L of them.

  'auto' (default): with visual tokens merged into the sequence, L - M (= data.text_len): no placeholder but the
  last of an image has a text target, so a row with one image has at most that many loss positions; all
  positions otherwise. 'K' or K (an int, 1 <= K <= L) sets it; 'all': every position. Exact whatever the value:
  a batch with a row of more than K loss positions takes the every-position path (see token_loss_sums)."""
  value = cfg.train.get('loss_positions', 'auto')
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


def token_loss_sums(head: Callable[[jax.Array], jax.Array], hidden: jax.Array, targets: jax.Array,
                    mask: jax.Array, positions: int | None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Next-token cross entropy from the LM's last hidden states: (sum of nll, number correct, number of loss
  positions) over the positions where mask is nonzero. head: hidden [B, K, D] -> logits [B, K, V].

  positions=K: each row's loss positions (first K, in order) are gathered before the vocabulary projection, so
  the head, log-softmax and argmax run on [B, K] instead of [B, L]; the sums are the same. A batch where some row
  has more than K loss positions runs the full [B, L] projection instead (lax.cond on the device), so the result
  never depends on K."""
  def sums(h, t, m):
    logits = head(h)                                                               # [B, K, V]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, t[..., None], axis=-1)[..., 0]               # [B, K]
    correct = (jnp.argmax(logits, -1) == t).astype(jnp.float32)
    return (nll * m).sum(), (correct * m).sum()

  count = mask.sum()
  if positions is None or positions >= hidden.shape[1]:
    return sums(hidden, targets, mask) + (count,)
  has_loss = mask != 0
  order = jnp.argsort(~has_loss, axis=1, stable=True)[:, :positions]             # [B, K]: loss positions first

  def take(a):                                                                   # [B, L, ...] -> [B, K, ...]
    return jnp.take_along_axis(a, order.reshape(order.shape + (1,) * (a.ndim - 2)), axis=1)

  def gathered():
    return sums(take(hidden), take(targets), take(mask))

  fits = jnp.all(has_loss.sum(axis=1) <= positions)
  nll, correct = jax.lax.cond(fits, gathered, lambda: sums(hidden, targets, mask))
  return nll, correct, count


def make_loss_sums(s: Setup) -> Callable:
  """(params, batch, rng) -> (sum of nll, (number correct, number of loss positions)): the model's forward in
  training mode (dropout from rng) and token_loss_sums with train.loss_positions."""
  model_inputs = ('image', 'tokens', 'positions', 'input_mask', 'segment_ids')
  positions = loss_positions(s.cfg)

  def loss_sums(params, batch, rng):
    inputs = {k: batch[k] for k in model_inputs if k in batch}
    with shard_lib.activation_rules(s.rules):             # activation constraints (sharding.constrain) follow them
      hidden = s.model.apply({'params': params}, inputs, deterministic=False, return_hidden=True,
                             rngs={'dropout': rng})                                # [B, L, D]

      def head(h):
        return s.model.apply({'params': params}, h, method='head')

      nll, correct, count = token_loss_sums(head, hidden, batch['targets'], batch['loss_mask'], positions)
    return nll, (correct, count)

  return loss_sums


def _microbatches(batch: dict, k: int) -> dict:
  """[B, ...] -> [k, B/k, ...] with micro-batch j = rows j, j+k, j+2k, ...: each device's contiguous block of
  rows is spread over all k micro-batches, so every micro-batch keeps every device busy."""
  def split(x):
    x = x.reshape((x.shape[0] // k, k) + x.shape[1:])                     # [B/k, k, ...]
    return jnp.swapaxes(x, 0, 1)                                           # [k, B/k, ...]
  return {name: split(x) for name, x in batch.items()}


def make_train_step(s: Setup):
  """The jitted step: (state, batch, rng) -> (state, metrics). With train.grad_accum_steps = k > 1 the batch is
  processed as k micro-batches (lax.scan), gradients summed over them, and the loss normalised by the whole
  batch's token count: the same update as one pass over the batch, with about 1/k of the activation memory.

  A step whose loss or trained-parameter gradients hold NaN/Inf applies no update and counts it
  (state.nonfinite_steps). With train.on_nonfinite='stop' it also sets state.halted_at to that step, and every
  later step leaves the state as it is (step counter included), so the host, which looks at each log and save
  point, finds the last good state intact and stops there."""
  schedule = opt_lib.learning_rate_schedule(s.cfg.train)
  accum = int(s.cfg.train.get('grad_accum_steps', 1) or 1)
  stop_on_nonfinite = s.cfg.train.get('on_nonfinite', 'skip') == 'stop'
  trainable = jax.tree.map(lambda label: label == 'train', s.labels)

  summed_loss_fn = make_loss_sums(s)                      # sums, to be normalised over the whole batch

  def loss_fn(params, batch, rng):
    nll, (correct, count) = summed_loss_fn(params, batch, rng)
    denom = jnp.maximum(count, 1.0)
    return nll / denom, correct / denom

  def accumulated(params, batch, rng):
    micro = _microbatches(batch, accum)
    grad_fn = jax.value_and_grad(summed_loss_fn, has_aux=True)

    def body(carry, xs):
      grads, nll, correct, count = carry
      mb, i = xs
      (n, (c, m)), g = grad_fn(params, mb, jax.random.fold_in(rng, i))
      return (jax.tree.map(jnp.add, grads, g), nll + n, correct + c, count + m), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    init = (zeros, jnp.float32(0), jnp.float32(0), jnp.float32(0))
    (grads, nll, correct, count), _ = jax.lax.scan(body, init, (micro, jnp.arange(accum)))
    denom = jnp.maximum(count, 1.0)
    return (nll / denom, correct / denom), jax.tree.map(lambda g: g / denom, grads)

  def train_step(state: TrainState, batch: dict, base_rng: jax.Array):
    rng = jax.random.fold_in(base_rng, state.step)
    if accum > 1:
      (loss, accuracy), grads = accumulated(state.params, batch, rng)
    else:
      (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, rng)
    updates, opt_state = s.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # The norm covers trained params only: frozen weights' gradients are then unused and XLA drops them (a frozen
    # LM still passes input gradients back to the projector, but computes no weight gradients).
    trained_grads = jax.tree.map(lambda g, t: g if t else jnp.zeros((), g.dtype), grads, trainable)
    grad_norm = optax.tree.norm(trained_grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    halted = state.halted_at > 0
    apply = finite & ~halted
    # Frozen leaves keep the old array outright: no select over a frozen LM's weights.
    params = jax.tree.map(lambda t, new, old: jnp.where(apply, new, old) if t else old,
                          trainable, params, state.params)
    opt_state = jax.tree.map(lambda new, old: jnp.where(apply, new, old), opt_state, state.opt_state)
    bad = (~finite & ~halted).astype(jnp.int32)
    if stop_on_nonfinite:
      next_state = TrainState(step=jnp.where(apply, state.step + 1, state.step), params=params, opt_state=opt_state,
                              nonfinite_steps=state.nonfinite_steps + bad,
                              halted_at=jnp.where(halted, state.halted_at, bad * (state.step + 1)))
    else:
      next_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                              nonfinite_steps=state.nonfinite_steps + bad, halted_at=state.halted_at)
    metrics = {'loss': loss, 'accuracy': accuracy, 'grad_norm': grad_norm, 'learning_rate': schedule(state.step),
               'nonfinite_steps': next_state.nonfinite_steps}
    if 'bad_records' in batch:               # data.bad_records='skip': rows standing in for unreadable records
      metrics['bad_records'] = batch['bad_records'].sum().astype(jnp.float32)
    return next_state, metrics

  replicated = NamedSharding(s.mesh, P())
  return jax.jit(train_step, in_shardings=(s.state_sharding, s.batch_sharding, replicated),
                 out_shardings=(s.state_sharding, replicated), donate_argnums=(0,))


def global_batch(s: Setup, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  """Per-process numpy batch -> global jax arrays sharded over the data axes."""
  return {k: jax.make_array_from_process_local_data(s.batch_sharding, v) for k, v in local.items()}


@dataclasses.dataclass
class TrainResult:
  setup: Setup
  state: TrainState
  tokenizer: Any
  train_seconds: float
  resumed_from: int | None


class NonFiniteError(RuntimeError):
  """train.on_nonfinite='stop' met a NaN/Inf loss or gradient; the last good state is saved."""


# Metrics that are a running value, not a per-step figure to average over the log interval; and counts to sum.
_LAST_VALUE_METRICS = ('learning_rate', 'nonfinite_steps')
_SUMMED_METRICS = ('bad_records',)


def train(cfg, workdir: str, *, name: str = '') -> TrainResult:
  """Trains (or resumes, or just restores a finished run) in `workdir`.

  Resuming restarts from the newest checkpoint that reads back whole (an unreadable one is moved aside, with a
  message; see checkpoint.restore_latest) and continues exactly: the data iterator, the step's random key, the
  unlogged metrics of the current log interval and the counters all come back, so a run killed at any point and
  restarted ends with the same params and metrics as one that never stopped (same device count)."""
  from mmproj import data

  s = setup(cfg)
  pretrained.check(cfg)            # cfg.init paths exist and match cfg.model, before any data build or compile
  _, tokenizer = data.prepare(cfg.data)
  check_tokenizer(cfg, tokenizer)
  ckpt_lib.save_run_files(workdir, cfg, tokenizer)
  main = distributed.is_main_process()
  log = (lambda msg: print(f'{name}{msg}', flush=True)) if main else (lambda msg: None)

  # This process feeds rows [block*B/blocks, (block+1)*B/blocks) of every global batch: those its devices hold.
  block, blocks = distributed.batch_block(s.batch_sharding, int(cfg.train.batch_size))
  loader = data.train_loader(cfg.data, tokenizer, num_image_tokens=s.num_image_tokens,
                                 global_batch_size=int(cfg.train.batch_size), seed=int(cfg.seed),
                                 process_index=block, process_count=blocks)
  data_iter = iter(loader)
  manager, state, meta, latest = ckpt_lib.restore_latest(workdir, cfg.checkpoint, s.abstract_state, data_iter,
                                                          log=log)
  total = int(cfg.train.steps)
  if latest is not None:
    log(f'Resuming from checkpoint step {latest} in {ckpt_lib.checkpoint_dir(workdir)}')
  else:
    state = init_state(s, int(cfg.seed))
  seconds_before = float(meta.get('train_seconds', 0.0))
  bad_records = int(meta.get('bad_records', 0))   # data.bad_records='skip' stand-ins so far (logged intervals)
  # The metrics of the log interval the checkpoint cut through (float32, as the step returned them).
  pending = [{k: np.float32(v) for k, v in m.items()} for m in meta.get('pending_metrics', [])]
  start = int(jax.device_get(state.step))
  if start >= total:
    manager.close()
    return TrainResult(s, state, tokenizer, seconds_before, latest)

  base_rng = jax.random.key(int(cfg.seed) + 1)
  writer = MetricWriter(workdir, total_steps=total, resume_step=start, name=name)
  log_every, save_every = int(cfg.log_every), int(cfg.checkpoint.every)
  stop_on_nonfinite = cfg.train.get('on_nonfinite', 'skip') == 'stop'
  # Matmul FLOPs of one step as it runs (frozen parts: no weight gradients; remat recompute included), against
  # the device's dense peak (measured once for a CPU) -> MFU in every log line.
  counts = flops_lib.step_flops(cfg, labels=s.labels)
  peak, peak_source = flops_lib.device_peak_flops(jax.devices()[0], cfg.model.dtype)
  # Throughput counts only the steps this process ran since the last log (pending may hold restored metrics).
  steps_run, tokens_seen, images_seen = 0, 0, 0
  nonfinite_seen = int(jax.device_get(state.nonfinite_steps))
  # 'stop' mode: the iterator state before each recent step's batch, to save the data position of the last good
  # step (the host only looks at the device every log/save point, so it may be a few batches ahead by then).
  iter_states = collections.deque(maxlen=log_every + save_every + 1)

  def next_batch(step):
    if stop_on_nonfinite:
      iter_states.append((step, data_iter.get_state()))
    return next(data_iter)

  def save(step, state):
    ckpt_lib.save(manager, step, state, data_iter,
                  {'train_seconds': seconds_before + time.time() - t_start, 'bad_records': bad_records,
                   'pending_metrics': [{k: float(v) for k, v in jax.device_get(m).items()} for m in pending]})

  def stop_if_halted(state):
    halted_at = int(jax.device_get(state.halted_at))
    if not halted_at:
      return
    good = halted_at - 1                               # state.step stayed here since
    manager.wait_until_finished()
    saved = good in manager.all_steps()
    if not saved and good > 0:
      data_iter.set_state(dict(iter_states)[halted_at])   # the position before the bad step's batch
      pending.clear()
      save(good, state)
      manager.wait_until_finished()
      saved = True
    manager.close()
    writer.close()
    where = (f'{ckpt_lib.checkpoint_dir(workdir)}/{good}' if saved else 'nowhere (no step was good)')
    raise NonFiniteError(f'{name}non-finite loss or gradients at step {halted_at} (train.on_nonfinite=stop): no '
                         f'update applied from there; the last good state (step {good}) is saved in {where}')

  with jax.set_mesh(s.mesh):
    local = next_batch(start + 1)
    batch = global_batch(s, local)
    step_fn = make_train_step(s).lower(state, batch, base_rng).compile()     # compiled once, ahead of time
    log(f'{flops_lib.format_flops_summary(cfg, counts)}\n{name}peak: {peak_source}\n'
        f'{name}{memory_lib.format_compiled_memory(step_fn)}')
    t_start = t_log = time.time()
    for step in range(start + 1, total + 1):
      if step > start + 1:
        local = next_batch(step)
        batch = global_batch(s, local)
      steps_run += 1
      tokens_seen += int(local['input_mask'].sum()) * blocks
      images_seen += len(local['image']) * blocks
      state, metrics = step_fn(state, batch, base_rng)
      pending.append(metrics)
      log_now, save_now = step % log_every == 0 or step == total, step % save_every == 0 or step == total
      if stop_on_nonfinite and (log_now or save_now):
        stop_if_halted(state)
      if log_now:
        values = [jax.device_get(m) for m in pending]
        skip = _LAST_VALUE_METRICS + _SUMMED_METRICS
        means = {k: float(np.mean([v[k] for v in values])) for k in values[0] if k not in skip}
        means.update({k: float(values[-1][k]) for k in _LAST_VALUE_METRICS})
        if 'bad_records' in values[0]:
          new_bad = int(sum(v['bad_records'] for v in values))
          if new_bad:
            log(f'WARNING: {new_bad} unreadable data record(s) in steps {step - len(values) + 1}-{step} were '
                f'skipped (data.bad_records=skip; {bad_records + new_bad} so far)')
          bad_records += new_bad
          means['bad_records'] = float(bad_records)
        dt = time.time() - t_log
        steps_per_sec = steps_run / dt
        means.update(steps_per_sec=steps_per_sec, tokens_per_sec=tokens_seen / dt, images_per_sec=images_seen / dt,
                     tflops_per_device=counts['total'] * steps_per_sec / jax.device_count() / 1e12,
                     mfu=flops_lib.mfu(counts['total'], steps_per_sec, jax.device_count(), peak))
        writer.write(step, means)
        if int(means['nonfinite_steps']) > nonfinite_seen:
          log(f'WARNING: {int(means["nonfinite_steps"]) - nonfinite_seen} step(s) up to step {step} had non-finite '
              f'loss or gradients; their updates were skipped (train.on_nonfinite=skip; '
              f'{int(means["nonfinite_steps"])} so far)')
          nonfinite_seen = int(means['nonfinite_steps'])
        pending, steps_run, tokens_seen, images_seen, t_log = [], 0, 0, 0, time.time()
      if save_now:
        save(step, state)
  manager.wait_until_finished()
  manager.close()
  writer.close()
  return TrainResult(s, state, tokenizer, seconds_before + time.time() - t_start, latest)


def check_tokenizer(cfg, tokenizer) -> None:
  vocab = tokenizer.get_vocab_size()
  if vocab > int(cfg.model.lm.vocab_size):
    raise ValueError(f'model.lm.vocab_size={cfg.model.lm.vocab_size} is smaller than the tokenizer ({vocab} ids)')
  image_id = tokenizer.token_to_id('<image>')
  if cfg.model.use_image and image_id != int(cfg.model.image_token_id):
    raise ValueError(f'model.image_token_id={cfg.model.image_token_id} but the tokenizer has <image>={image_id}')
