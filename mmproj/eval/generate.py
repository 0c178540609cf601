"""Batched autoregressive generation with the functional KV cache.

prefill (whole left-padded prompt, image included) -> lax.scan of decode_step. Greedy at temperature 0,
categorical sampling from softmax(logits / temperature) otherwise. Once a row has emitted a stop id (`eos_id`: one
id or several, e.g. an HF generation_config's eos_token_id list) it emits `pad_id`.
The <image> placeholder id is never generated (a fed-back placeholder would have no visual token behind it).
One compiled program per (model, batch shapes, max_new_tokens, number of stop ids); the stop ids, pad_id and
temperature are traced.
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Batch entries the model reads; others (answer strings, targets, ...) never enter the jitted function.
_MODEL_KEYS = ('image', 'audio', 'video', 'tokens', 'positions', 'input_mask')


def _sample(logits, key, temperature):
  """logits [B, V] float32, temperature float32 scalar -> token ids int32 [B] (argmax when temperature == 0)."""
  greedy = jnp.argmax(logits, axis=-1)
  sampled = jax.random.categorical(key, logits / jnp.maximum(temperature, 1e-6), axis=-1)
  return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=('model', 'max_new_tokens'))
def _generate(model, params, batch, rng, stop_ids, pad_id, temperature, *, max_new_tokens: int):
  length = batch['tokens'].shape[1]
  cache_len = length + max_new_tokens - 1          # the last sampled token is never fed back
  keys = jax.random.split(rng, max_new_tokens)     # [max_new_tokens]
  variables = {'params': params}
  config = model.config

  def next_token(logits, key, done):
    if config.use_image:                           # never emit the <image> placeholder
      logits = logits.at[:, config.image_token_id].set(-jnp.inf)
    return jnp.where(done, pad_id, _sample(logits, key, temperature))     # [B]

  logits, cache = model.apply(variables, batch, cache_len, method='prefill')    # [B, V]
  first = next_token(logits, keys[0], jnp.zeros(logits.shape[0], bool))       # [B]

  def step(carry, key):
    token, done, cache = carry
    logits, cache = model.apply(variables, token, cache, method='decode_step')  # [B, V]
    nxt = next_token(logits, key, done)
    return (nxt, done | jnp.isin(nxt, stop_ids), cache), nxt

  _, rest = jax.lax.scan(step, (first, jnp.isin(first, stop_ids), cache), keys[1:])      # [max_new_tokens - 1, B]
  return jnp.concatenate([first[:, None], rest.T], axis=1)                     # [B, max_new_tokens]


def generate_tokens(model, params, batch, *, max_new_tokens: int, eos_id: int | Sequence[int], pad_id: int = 0,
                    temperature: float = 0.0, rng=None):
  """Generates continuations of left-padded prompts.

  model: a MultimodalLM; params: its params (boxed or plain); batch: dict with 'tokens', 'positions',
  'input_mask' [B, L] (+ 'image'), prompts ending at the last column. eos_id: the stop id or ids. rng: a PRNG
  key, required when temperature > 0. Returns int32 [B, max_new_tokens] (pad_id after a row's stop id).
  """
  if max_new_tokens < 1:
    raise ValueError(f'max_new_tokens must be >= 1, got {max_new_tokens}')
  if temperature < 0:
    raise ValueError(f'temperature must be >= 0, got {temperature}')
  if temperature > 0 and rng is None:
    raise ValueError('sampling (temperature > 0) needs an rng key')
  if rng is None:
    rng = jax.random.key(0)
  stop_ids = jnp.asarray(np.atleast_1d(np.asarray(eos_id, np.int32)))        # [K]
  if stop_ids.size == 0:
    raise ValueError('eos_id: at least one stop id is needed')
  inputs = {k: batch[k] for k in _MODEL_KEYS if k in batch}     # numpy or (sharded) jax arrays, kept as given
  return _generate(model, params, inputs, rng, stop_ids, jnp.int32(pad_id), jnp.float32(temperature),
                   max_new_tokens=int(max_new_tokens))
