"""The training loss: next-token cross entropy over the loss positions of each row.

    loss_and_grads = make_loss_and_grads(setup)   # (params, batch, rng) -> ((loss, accuracy), grads)

The model returns the LM's last hidden states; only the positions whose loss_mask is set are projected to the
vocabulary (setup.loss_positions of them per row, gathered first), so the LM head, log-softmax and argmax run on
[B, K, V] instead of [B, L, V]. Micro-batches (train.grad_accum_steps) add up sums; the mean is taken over the
whole batch's loss positions.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from mmproj import generators
from mmproj import model as model_lib
from mmproj.layers.partitioning import activation_rules

MODEL_INPUTS = ('image', 'audio', 'video', 'tokens', 'positions', 'input_mask', 'segment_ids')


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


# train.output_loss: the output side's training term (mmproj/model.py, model.output), added to the token loss.
#   align     NExT-GPT's / GILL's first stage: MSE between the output projector's conditioning and the generator's
#             own text encoder on the row's caption (batch['gen_text']), the target held fixed
#   generate  the generator's flow-matching loss on the row's image (batch['gen_image']) with the output
#             projector's conditioning in place of its text encoder's, through the frozen generator
OUTPUT_LOSSES = ('align', 'generate')


def output_loss(cfg) -> tuple[str | None, float]:
  """(train.output_loss or None, train.output_loss_weight): ValueError naming the field."""
  kind = cfg.train.get('output_loss')
  weight = float(cfg.train.get('output_loss_weight', 1.0))
  if kind in (None, '', 'none'):
    return None, weight
  if kind not in OUTPUT_LOSSES:
    raise ValueError(f'train.output_loss={kind!r} must be one of {OUTPUT_LOSSES} or None')
  if weight <= 0:
    raise ValueError(f'train.output_loss_weight={weight} must be positive')
  return kind, weight


def output_rows(s, batch) -> jax.Array:
  """Rows of the batch that hold all K signal tokens (those the output loss averages over): float32 [B]."""
  out = s.cfg.model.output
  _, present = model_lib.signal_positions(batch['tokens'], int(out.signal_token_id), int(out.num_signal_tokens))
  return present.astype(jnp.float32)


def make_loss_sums(s) -> Callable:
  """(params, batch, rng) -> sums {'nll', 'correct', 'count'} (token loss, correct tokens, loss positions), and
  with train.output_loss also {'output', 'output_rows'} (the output term summed over the rows holding signal
  tokens, and their number): the model's forward in training mode (dropout from rng), token_loss_sums at
  setup.loss_positions, and the output side's term."""
  kind, _ = output_loss(s.cfg)
  generator = model_lib.output_modules(s.cfg.model, model_lib.DTYPES[s.cfg.model.dtype])[1] if kind else None

  def loss_sums(params, batch, rng):
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    variables = {'params': params}
    with activation_rules(s.rules):             # activation constraints (sharding.constrain) follow them
      hidden = s.model.apply(variables, inputs, deterministic=False, return_hidden=True,
                             rngs={'dropout': rng})                                # [B, L, D]

      def head(h):
        return s.model.apply(variables, h, method='head')

      nll, correct, count = token_loss_sums(head, hidden, batch['targets'], batch['loss_mask'], s.loss_positions)
      sums = {'nll': nll, 'correct': correct, 'count': count}
      if kind is not None:
        drop_rng, gen_rng = jax.random.split(jax.random.fold_in(rng, 1))
        cond, present = s.model.apply(variables, hidden, batch['tokens'], deterministic=False,
                                      method='signal_condition', rngs={'dropout': drop_rng})   # [B, L, Dc]
        if kind == 'align':
          target = jax.lax.stop_gradient(s.model.apply(variables, batch['gen_text'], method='text_condition'))
          per_row = jnp.mean(jnp.square(cond.astype(jnp.float32) - target.astype(jnp.float32)), axis=(1, 2))
        else:                                   # through the frozen generator (its params under 'generator')
          per_row = generators.flow_matching_losses(generator, params['generator'], batch['gen_image'], cond,
                                                    gen_rng)                                        # [B]
        present = present.astype(jnp.float32)
        sums.update(output=jnp.sum(per_row * present), output_rows=jnp.sum(present))
    return sums

  return loss_sums


def _microbatches(batch: dict, k: int) -> dict:
  """[B, ...] -> [k, B/k, ...] with micro-batch j = rows j, j+k, j+2k, ...: each device's contiguous block of
  rows is spread over all k micro-batches, so every micro-batch keeps every device busy."""
  def split(x):
    x = x.reshape((x.shape[0] // k, k) + x.shape[1:])                     # [B/k, k, ...]
    return jnp.swapaxes(x, 0, 1)                                           # [k, B/k, ...]
  return {name: split(x) for name, x in batch.items()}


def make_loss_and_grads(s) -> Callable:
  """(params, batch, rng) -> ((loss, metrics), grads). loss = the token cross entropy averaged over the batch's
  loss positions, plus with train.output_loss its weight times the output term averaged over the rows holding
  signal tokens; metrics: {'accuracy'} (token accuracy), and with an output loss {'token_loss', 'output_loss'}.
  The denominators are counted from the whole batch first (loss_mask, the signal tokens), so each micro-batch's
  objective is its share of the batch's and the gradients add up exactly.

  With train.grad_accum_steps = k > 1 the batch runs as k micro-batches (lax.scan) whose gradients add up:
  the same update as one pass over the batch, with about 1/k of the activation memory."""
  loss_sums = make_loss_sums(s)
  kind, weight = output_loss(s.cfg)
  accum = int(s.cfg.train.grad_accum_steps)

  def denominators(batch):
    tokens = jnp.maximum(jnp.sum(batch['loss_mask']), 1.0)
    rows = jnp.maximum(jnp.sum(output_rows(s, batch)), 1.0) if kind is not None else None
    return tokens, rows

  def objective(params, batch, rng, tokens, rows):
    sums = loss_sums(params, batch, rng)
    value = sums['nll'] / tokens
    if kind is not None:
      value = value + weight * sums['output'] / rows
    return value, sums

  def metrics(total, sums, tokens, rows):
    out = {'accuracy': sums['correct'] / tokens}
    if kind is not None:
      out.update(token_loss=sums['nll'] / tokens, output_loss=sums['output'] / rows)
    return total, out

  def single(params, batch, rng):
    tokens, rows = denominators(batch)
    (total, sums), grads = jax.value_and_grad(objective, has_aux=True)(params, batch, rng, tokens, rows)
    return metrics(total, sums, tokens, rows), grads

  def accumulated(params, batch, rng):
    tokens, rows = denominators(batch)
    grad_fn = jax.value_and_grad(objective, has_aux=True)

    def body(carry, xs):
      grads, total, sums = carry
      mb, i = xs
      (value, mb_sums), g = grad_fn(params, mb, jax.random.fold_in(rng, i), tokens, rows)
      return (jax.tree.map(jnp.add, grads, g), total + value, jax.tree.map(jnp.add, sums, mb_sums)), None

    zero_sums = {k: jnp.float32(0) for k in ('nll', 'correct', 'count') + (('output', 'output_rows') if kind else ())}
    init = (jax.tree.map(jnp.zeros_like, params), jnp.float32(0), zero_sums)
    (grads, total, sums), _ = jax.lax.scan(body, init, (_microbatches(batch, accum), jnp.arange(accum)))
    return metrics(total, sums, tokens, rows), grads

  return accumulated if accum > 1 else single
