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


def make_loss_sums(s: Setup) -> Callable:
  """(params, batch, rng) -> (sum of nll, (number correct, number of loss positions)): the model's forward in
  training mode (dropout from rng) and token_loss_sums at setup.loss_positions."""

  def loss_sums(params, batch, rng):
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    with activation_rules(s.rules):             # activation constraints (sharding.constrain) follow them
      hidden = s.model.apply({'params': params}, inputs, deterministic=False, return_hidden=True,
                             rngs={'dropout': rng})                                # [B, L, D]

      def head(h):
        return s.model.apply({'params': params}, h, method='head')

      nll, correct, count = token_loss_sums(head, hidden, batch['targets'], batch['loss_mask'], s.loss_positions)
    return nll, (correct, count)

  return loss_sums


def _microbatches(batch: dict, k: int) -> dict:
  """[B, ...] -> [k, B/k, ...] with micro-batch j = rows j, j+k, j+2k, ...: each device's contiguous block of
  rows is spread over all k micro-batches, so every micro-batch keeps every device busy."""
  def split(x):
    x = x.reshape((x.shape[0] // k, k) + x.shape[1:])                     # [B/k, k, ...]
    return jnp.swapaxes(x, 0, 1)                                           # [k, B/k, ...]
  return {name: split(x) for name, x in batch.items()}


def make_loss_and_grads(s) -> Callable:
  """(params, batch, rng) -> ((mean loss, token accuracy), grads), both normalised by the batch's loss positions.

  With train.grad_accum_steps = k > 1 the batch runs as k micro-batches (lax.scan) whose gradient sums add up:
  the same update as one pass over the batch, with about 1/k of the activation memory."""
  loss_sums = make_loss_sums(s)
  accum = int(s.cfg.train.grad_accum_steps)

  def mean_loss(params, batch, rng):
    nll, (correct, count) = loss_sums(params, batch, rng)
    denom = jnp.maximum(count, 1.0)
    return nll / denom, correct / denom

  def accumulated(params, batch, rng):
    grad_fn = jax.value_and_grad(loss_sums, has_aux=True)

    def body(carry, xs):
      grads, nll, correct, count = carry
      mb, i = xs
      (n, (c, m)), g = grad_fn(params, mb, jax.random.fold_in(rng, i))
      return (jax.tree.map(jnp.add, grads, g), nll + n, correct + c, count + m), None

    init = (jax.tree.map(jnp.zeros_like, params), jnp.float32(0), jnp.float32(0), jnp.float32(0))
    (grads, nll, correct, count), _ = jax.lax.scan(body, init, (_microbatches(batch, accum), jnp.arange(accum)))
    denom = jnp.maximum(count, 1.0)
    return (nll / denom, correct / denom), jax.tree.map(lambda g: g / denom, grads)

  return accumulated if accum > 1 else jax.value_and_grad(mean_loss, has_aux=True)
