"""Rotary position embeddings (RoFormer, Su et al. 2021) in the Llama / HF "rotate_half" convention.

The head dimension is split in two halves (not interleaved pairs): feature i is rotated together with feature
i + Dh/2 by the angle pos * theta^(-2i/Dh). This is the layout of HF `LlamaRotaryEmbedding` + `apply_rotary_pos_emb`,
so HF Llama q/k projection weights port without a permutation.
"""

import jax.numpy as jnp


def rope_inv_freq(head_dim: int, theta: float = 10000.0):
  """Inverse frequencies theta^(-2i/Dh), i < Dh/2.  -> [Dh/2] float32."""
  if head_dim % 2:
    raise ValueError(f'RoPE needs an even head_dim, got {head_dim}')
  return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def rope_cos_sin(positions, head_dim: int, theta: float = 10000.0):
  """cos/sin tables for integer positions [B, T] -> two arrays [B, T, Dh] float32 (halves repeated)."""
  angles = positions.astype(jnp.float32)[..., None] * rope_inv_freq(head_dim, theta)  # [B, T, Dh/2]
  angles = jnp.concatenate([angles, angles], axis=-1)                                # [B, T, Dh]
  return jnp.cos(angles), jnp.sin(angles)


def rotate_half(x):
  """[x1, x2] -> [-x2, x1] on the last axis (x1, x2 the two halves)."""
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x, positions, theta: float = 10000.0):
  """Rotates queries or keys x [B, T, H, Dh] by their positions [B, T]; math in float32, returns x.dtype."""
  cos, sin = rope_cos_sin(positions, x.shape[-1], theta)   # [B, T, Dh]
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]        # [B, T, 1, Dh]
  x32 = x.astype(jnp.float32)
  return (x32 * cos + rotate_half(x32) * sin).astype(x.dtype)  # [B, T, H, Dh]
