"""Rotary position embeddings (RoFormer, Su et al. 2021) in the Llama / HF "rotate_half" convention.

The head dimension is split in two halves (not interleaved pairs): feature i is rotated together with feature
i + Dh/2 by the angle pos * theta^(-2i/Dh). This is the layout of HF `LlamaRotaryEmbedding` + `apply_rotary_pos_emb`,
so HF Llama q/k projection weights port without a permutation.

Frequency scaling (`scaling`, cfg.model.lm.rope_scaling; None = plain RoPE) follows transformers'
modeling_rope_utils (HF `rope_parameters` / `rope_scaling` minus rope_theta), for the rope types whose
attention factor is 1:
  {'rope_type': 'linear', 'factor': f}                       inv_freq / f (position interpolation)
  {'rope_type': 'llama3', 'factor': f, 'low_freq_factor': l, 'high_freq_factor': h,
   'original_max_position_embeddings': L}                   Llama 3.1: long wavelengths / f, short ones kept,
                                                             a smooth blend in between
Other types (dynamic, yarn, longrope, ...) raise a ValueError naming model.lm.rope_scaling.
"""

import math
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

ROPE_SCALING_KEYS = {
    'linear': ('factor',),
    'llama3': ('factor', 'low_freq_factor', 'high_freq_factor', 'original_max_position_embeddings'),
}


def check_rope_scaling(scaling: Any) -> dict | None:
  """cfg.model.lm.rope_scaling (None, or a mapping with rope_type/type) -> plain dict or None; ValueError naming
  model.lm.rope_scaling for an unsupported type or a missing key."""
  if scaling is None:
    return None
  if isinstance(scaling, tuple):            # hashable form ((key, value), ...) that modules pass down
    scaling = dict(scaling)
  if not isinstance(scaling, Mapping) and not hasattr(scaling, 'items'):
    raise ValueError(f'model.lm.rope_scaling={scaling!r} must be None or a dict with a rope_type')
  scaling = dict(scaling.items())
  rope_type = scaling.get('rope_type', scaling.get('type'))
  if rope_type in (None, 'default'):
    return None
  if rope_type not in ROPE_SCALING_KEYS:
    raise ValueError(f'model.lm.rope_scaling: rope_type {rope_type!r} is not supported; supported: '
                     f'{sorted(ROPE_SCALING_KEYS)} (or None for plain RoPE)')
  missing = [k for k in ROPE_SCALING_KEYS[rope_type] if scaling.get(k) is None]
  if missing:
    raise ValueError(f'model.lm.rope_scaling: rope_type {rope_type!r} needs {missing}')
  return {'rope_type': rope_type, **{k: scaling[k] for k in ROPE_SCALING_KEYS[rope_type]}}


def rope_inv_freq(head_dim: int, theta: float = 10000.0, scaling: Any = None):
  """Inverse frequencies theta^(-2i/Dh), i < Dh/2, then `scaling` (see module docstring).  -> [Dh/2] float32."""
  if head_dim % 2:
    raise ValueError(f'RoPE needs an even head_dim, got {head_dim}')
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  scaling = check_rope_scaling(scaling)
  if scaling is None:
    return inv_freq
  factor = scaling['factor']
  if scaling['rope_type'] == 'linear':
    return inv_freq / factor
  # llama3 (transformers _compute_llama3_parameters, float32)
  low, high = scaling['low_freq_factor'], scaling['high_freq_factor']
  old_len = scaling['original_max_position_embeddings']
  low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
  wavelen = 2 * math.pi / inv_freq
  scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
  smooth = (old_len / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
  return jnp.where(is_medium, smoothed, scaled).astype(jnp.float32)


def rope_cos_sin(positions, head_dim: int, theta: float = 10000.0, scaling: Any = None):
  """cos/sin tables for integer positions [B, T] -> two arrays [B, T, Dh] float32 (halves repeated)."""
  angles = positions.astype(jnp.float32)[..., None] * rope_inv_freq(head_dim, theta, scaling)  # [B, T, Dh/2]
  angles = jnp.concatenate([angles, angles], axis=-1)                                # [B, T, Dh]
  return jnp.cos(angles), jnp.sin(angles)


def rotate_half(x):
  """[x1, x2] -> [-x2, x1] on the last axis (x1, x2 the two halves)."""
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x, positions, theta: float = 10000.0, scaling: Any = None):
  """Rotates queries or keys x [B, T, H, Dh] by their positions [B, T]; math in float32, returns x.dtype."""
  cos, sin = rope_cos_sin(positions, x.shape[-1], theta, scaling)   # [B, T, Dh]
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]        # [B, T, 1, Dh]
  x32 = x.astype(jnp.float32)
  return (x32 * cos + rotate_half(x32) * sin).astype(x.dtype)  # [B, T, H, Dh]
