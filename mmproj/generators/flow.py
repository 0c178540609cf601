"""Rectified flow (Liu et al. 2023, "Flow Straight and Fast"; as Stable Diffusion 3 trains it, Esser et al. 2024):
the generator's training loss and its sampler, and the caption tokens its text encoder reads.

  images uint8 [B, S, S, 3] -> x = pixels / 127.5 - 1 in [-1, 1]
  t ~ logit-normal(0, 1) (or uniform; generator.time_sampling), noise ~ N(0, I)
  x_t = (1 - t) * noise + t * x        (t = 0: noise, t = 1: data)
  loss = mean over pixels and batch of (velocity(x_t, t, cond) - (x - noise))^2

The loss is a plain function of cond, so an output projector trains through a frozen generator by this loss: the
gradient reaches cond through the cross-attention and the pooled-text path, and no optimizer state exists for the
generator's params if the caller gives them none.

Sampling integrates dx/dt = v from t = 0 (noise) to 1 with `steps` Euler steps of 1/steps. Classifier-free guidance
(Ho & Salimans 2022): v = v(x, t, null) + guidance * (v(x, t, cond) - v(x, t, null)), the two in one batched call;
guidance 1 is the conditional velocity alone, and the sampler then skips the null branch (half the work).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmproj.generators.dit import Generator

# The special tokens of the world tokenizers (mmproj/data/tokenizer.py), looked up by name.
PAD, BOS, EOS, UNK = '<pad>', '<bos>', '<eos>', '<unk>'


def to_unit_range(images):
  """uint8 [..., 3] in [0, 255] -> float32 in [-1, 1]."""
  return images.astype(jnp.float32) / 127.5 - 1.0


def to_uint8(x):
  """float [..., 3] in [-1, 1] (clipped) -> uint8 [0, 255], rounded to nearest."""
  return jnp.round(jnp.clip((x + 1.0) * 127.5, 0.0, 255.0)).astype(jnp.uint8)


def sample_time(rng, batch_size: int, time_sampling: str):
  """t [B] in (0, 1): uniform, or logit-normal(0, 1) = sigmoid of a standard normal (SD3's choice; weights the
  middle of the path, where the velocity is hardest to predict)."""
  if time_sampling == 'uniform':
    return jax.random.uniform(rng, (batch_size,))
  if time_sampling == 'logit_normal':
    return jax.nn.sigmoid(jax.random.normal(rng, (batch_size,)))
  raise ValueError(f'generator.time_sampling={time_sampling!r}: expected uniform or logit_normal')


def flow_matching_losses(generator: Generator, params: Any, images, cond, rng):
  """The rectified-flow loss (module docstring) of each image uint8 [B, S, S, 3] given cond [B, L, Dc] -> [B]
  float32 (the mean over its pixels; a caller averaging over some rows only, e.g. the output side's, needs them
  apart). rng: a key; t and the noise are drawn from it. Differentiable in params and cond."""
  if images.dtype != jnp.uint8:
    raise ValueError(f'flow_matching_loss: images must be uint8 [B, S, S, 3], got {images.dtype}')
  x = to_unit_range(images)                                                  # [B, S, S, 3]
  t_rng, noise_rng = jax.random.split(rng)
  t = sample_time(t_rng, x.shape[0], generator.time_sampling)                # [B]
  noise = jax.random.normal(noise_rng, x.shape)                              # [B, S, S, 3]
  x_t = (1.0 - t)[:, None, None, None] * noise + t[:, None, None, None] * x
  v = generator.apply({'params': params}, x_t, t, cond, method='velocity')  # [B, S, S, 3]
  return jnp.mean(jnp.square(v - (x - noise)), axis=(1, 2, 3))


def flow_matching_loss(generator: Generator, params: Any, images, cond, rng):
  """flow_matching_losses averaged over the batch -> scalar float32."""
  return jnp.mean(flow_matching_losses(generator, params, images, cond, rng))


def euler_sample(generator: Generator, params: Any, cond, rng, *, steps: int, guidance: float):
  """Euler integration from noise (t = 0) to data (t = 1) with classifier-free guidance -> float32 [B, S, S, 3]
  (images in about [-1, 1]). cond [B, L, Dc]; rng: the noise's key; steps, guidance: Python numbers (the loop
  length and whether the null branch runs are fixed at trace time). jit-able."""
  steps = int(steps)
  if steps < 1:
    raise ValueError(f'sample: steps={steps} must be >= 1')
  b, s = cond.shape[0], generator.image_size
  apply = lambda x, t, c: generator.apply({'params': params}, x, t, c, method='velocity')
  guided = float(guidance) != 1.0
  if guided:
    null = generator.apply({'params': params}, b, method='null_condition')   # [B, L, Dc]
    both = jnp.concatenate([cond, null.astype(cond.dtype)], axis=0)           # [2B, L, Dc]

  def velocity(x, t):                                                        # x [B, S, S, 3], t [B]
    if not guided:
      return apply(x, t, cond)
    v_cond, v_null = jnp.split(apply(jnp.concatenate([x, x]), jnp.concatenate([t, t]), both), 2)
    return v_null + guidance * (v_cond - v_null)

  def step(k, x):
    t = jnp.full((b,), k / steps, jnp.float32)
    return x + velocity(x, t) / steps

  x0 = jax.random.normal(rng, (b, s, s, 3), jnp.float32)
  return jax.lax.fori_loop(0, steps, step, x0)


def sample(generator: Generator, params: Any, cond, rng, *, steps: int, guidance: float):
  """Images drawn for cond [B, L, Dc] -> uint8 [B, S, S, 3] (euler_sample, rounded and clipped). jit-able, e.g.
  jax.jit(functools.partial(sample, generator, steps=25, guidance=3.0))(params, cond, rng)."""
  return to_uint8(euler_sample(generator, params, cond, rng, steps=steps, guidance=guidance))


def caption_tokens(tokenizer: Any, captions: Sequence[str], text_len: int) -> np.ndarray:
  """Captions -> the text encoder's fixed-length input int32 [B, L]: <bos> words <eos>, then <pad> to L = text_len.
  ValueError naming generator.text_len when a caption does not fit, and for a word outside the vocabulary."""
  bos, eos, pad, unk = (tokenizer.token_to_id(t) for t in (BOS, EOS, PAD, UNK))
  if None in (bos, eos, pad):
    raise ValueError(f'caption_tokens: the tokenizer lacks one of {PAD}, {BOS}, {EOS}')
  out = np.full((len(captions), text_len), pad, np.int32)
  for i, text in enumerate(captions):
    encoding = tokenizer.encode(text, add_special_tokens=False)
    if unk is not None and unk in encoding.ids:
      bad = [w for w, j in zip(encoding.tokens, encoding.ids) if j == unk]
      raise ValueError(f'caption_tokens: out-of-vocabulary words {bad} in {text!r}')
    row = [bos] + encoding.ids + [eos]
    if len(row) > text_len:
      raise ValueError(f'generator.text_len={text_len}: the caption {text!r} needs {len(row)} tokens')
    out[i, :len(row)] = row
  return out
