"""The one training loop: sharded, jitted, checkpointed, resumable.

    result = train(cfg, workdir)     # trains cfg.train.steps steps, resuming from the newest checkpoint in workdir

set up (mmproj/train/state.py: every config error, before anything compiles) -> restore or initialise -> loop
(step, log, save) -> finish. The loss is mmproj/train/loss.py, the log records mmproj/train/metrics.py, the
NaN/Inf policy mmproj/train/nonfinite.py, checkpoints mmproj/train/checkpoint.py.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from mmproj import model as model_lib
from mmproj.train import checkpoint as ckpt_lib
from mmproj.train import distributed
from mmproj.train import flops as flops_lib
from mmproj.train import memory as memory_lib
from mmproj.train import nonfinite
from mmproj.train import optimizer as opt_lib
from mmproj.train import pretrained
from mmproj.train.loss import make_loss_and_grads
from mmproj.train.metrics import LogInterval, MetricWriter
from mmproj.train.nonfinite import NonFiniteError  # noqa: F401  (raised by train)
from mmproj.train.state import Setup, TrainState, dummy_batch, setup  # noqa: F401  (setup: the run's first step)


def init_state(s: Setup, seed: int) -> TrainState:
  """A fresh train state: random params, with the parts named in cfg.init replaced by pretrained weights
  (mmproj/train/pretrained.py), and the optimizer state of those params."""
  batch = {k: jnp.zeros(v.shape, v.dtype) for k, v in dummy_batch(s.cfg, 1).items()}

  def init_params():   # in each tower's storage dtype (model.param_dtype)
    return model_lib.cast_params(flax.linen.unbox(s.model.init(jax.random.key(seed), batch)['params']), s.cfg.model)

  def init_opt(params):
    return TrainState.create(params, s.tx.init(params))

  with jax.set_mesh(s.mesh):
    params = jax.jit(init_params, out_shardings=s.state_sharding.params)()
    loaded = pretrained.load(s.cfg)
    if loaded:
      params = pretrained.place(params, loaded, s.state_sharding.params)
    return jax.jit(init_opt, out_shardings=s.state_sharding, donate_argnums=0)(params)


def make_train_step(s: Setup):
  """The jitted step: (state, batch, rng) -> (state, metrics); the rng is folded with the step. A step whose loss
  or trained-parameter gradients are not finite applies no update (train.on_nonfinite, mmproj/train/nonfinite.py)."""
  schedule = opt_lib.learning_rate_schedule(s.cfg.train)
  trainable = jax.tree.map(lambda label: label == 'train', s.labels)
  loss_and_grads = make_loss_and_grads(s)

  def train_step(state: TrainState, batch: dict, base_rng: jax.Array):
    step = state.step
    (loss, loss_metrics), grads = loss_and_grads(state.params, batch, jax.random.fold_in(base_rng, step))
    updates, opt_state = s.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # The norm covers trained params only: frozen weights' gradients are then unused and XLA drops them (a frozen
    # LM still passes input gradients back to the projector, but computes no weight gradients).
    grad_norm = optax.tree.norm(jax.tree.map(lambda g, t: g if t else jnp.zeros((), g.dtype), grads, trainable))
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    state = nonfinite.apply_if_finite(state, params, opt_state, finite, trainable, s.cfg.train.on_nonfinite)
    metrics = {'loss': loss, **loss_metrics, 'grad_norm': grad_norm, 'learning_rate': schedule(step),
               'nonfinite_steps': state.nonfinite_steps}
    if 'bad_records' in batch:               # data.bad_records='skip': rows standing in for unreadable records
      metrics['bad_records'] = batch['bad_records'].sum().astype(jnp.float32)
    return state, metrics

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
  log = (lambda msg: print(f'{name}{msg}', flush=True)) if distributed.is_main_process() else (lambda msg: None)
  # This process feeds rows [block*B/blocks, (block+1)*B/blocks) of every global batch: those its devices hold.
  block, blocks = distributed.batch_block(s.batch_sharding, int(cfg.train.batch_size))
  data_iter = iter(data.train_loader(cfg.data, tokenizer, num_image_tokens=s.num_image_tokens,
                                     global_batch_size=int(cfg.train.batch_size), seed=int(cfg.seed),
                                     process_index=block, process_count=blocks))

  manager, state, meta, latest = ckpt_lib.restore_latest(workdir, cfg.checkpoint, s.abstract_state, data_iter,
                                                          log=log)
  if latest is None:
    state = init_state(s, int(cfg.seed))
  else:
    log(f'Resuming from checkpoint step {latest} in {ckpt_lib.checkpoint_dir(workdir)}')
  seconds_before, start, total = float(meta.get('train_seconds', 0.0)), int(jax.device_get(state.step)), int(cfg.train.steps)
  if start >= total:
    manager.close()
    return TrainResult(s, state, tokenizer, seconds_before, latest)

  flops = flops_lib.step_flops(cfg, labels=s.labels)
  peak, peak_source = flops_lib.device_peak_flops(s.mesh.devices.flat[0], cfg.model.dtype,
                                                  cfg.train.device_peak_flops)
  interval = LogInterval(meta, flops_per_step=flops['total'], peak_flops=peak, processes=blocks, log=log)
  writer = MetricWriter(workdir, total_steps=total, resume_step=start, name=name)
  log_every, save_every = int(cfg.log_every), int(cfg.checkpoint.every)
  guard = nonfinite.Guard(cfg.train.on_nonfinite, data_iter, state, lookback=log_every + save_every + 1, log=log,
                          name=name)
  base_rng = jax.random.key(int(cfg.seed) + 1)

  def save(step, state):
    ckpt_lib.save(manager, step, state, data_iter,
                  {'train_seconds': seconds_before + time.time() - t_start, **interval.to_meta()})

  def save_last_good(step, state):             # 'stop': the data position goes back before the bad batch
    interval.clear()
    save(step, state)

  def close():
    manager.wait_until_finished()
    manager.close()
    writer.close()

  try:   # on an error too (a bad record, a NaN stop): pending saves finish and the files close
    with jax.set_mesh(s.mesh):
      local = guard.next_batch(start + 1)
      step_fn = make_train_step(s).lower(state, global_batch(s, local), base_rng).compile()   # ahead of time, once
      log(f'{flops_lib.format_flops_summary(flops)}\n{name}peak: {peak_source}\n'
          f'{name}{memory_lib.format_compiled_memory(step_fn)}')
      t_start = time.time()
      interval.start()
      for step in range(start + 1, total + 1):
        if step > start + 1:
          local = guard.next_batch(step)
        state, metrics = step_fn(state, global_batch(s, local), base_rng)
        interval.add(metrics, local)
        log_now, save_now = step % log_every == 0 or step == total, step % save_every == 0 or step == total
        if log_now or save_now:
          guard.stop_if_halted(state, manager, save_last_good, ckpt_lib.checkpoint_dir(workdir))
        if log_now:
          record = interval.record(step)
          writer.write(step, record)
          guard.warn(step, int(record['nonfinite_steps']))
        if save_now:
          save(step, state)
  finally:
    close()
  return TrainResult(s, state, tokenizer, seconds_before + time.time() - t_start, latest)


def check_tokenizer(cfg, tokenizer) -> None:
  vocab = tokenizer.get_vocab_size()
  if vocab > int(cfg.model.lm.vocab_size):
    raise ValueError(f'model.lm.vocab_size={cfg.model.lm.vocab_size} is smaller than the tokenizer ({vocab} ids)')
  if model_lib.has_output(cfg.model):
    first = tokenizer.token_to_id('[IMG0]')
    if first != int(cfg.model.output.signal_token_id):
      raise ValueError(f'model.output.signal_token_id={cfg.model.output.signal_token_id} but the tokenizer has '
                       f'[IMG0]={first}')
  image_id = tokenizer.token_to_id('<image>')
  if cfg.model.use_image and image_id != int(cfg.model.image_token_id):
    raise ValueError(f'model.image_token_id={cfg.model.image_token_id} but the tokenizer has <image>={image_id}')
