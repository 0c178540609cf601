"""Normalization layers.

`RMSNorm` is Llama's (HF `LlamaRMSNorm`): statistics in float32, learned scale initialised to one, no bias.
`LayerNorm` is `flax.linen.LayerNorm` with logically partitioned scale/bias (CLIP/SigLIP towers).
Both name their parameters with the logical axis 'norm'.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


class RMSNorm(nn.Module):
  """y = x / sqrt(mean(x^2) + eps) * scale, computed in float32, returned in `dtype`."""

  eps: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):                                    # x [..., D]
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, ('norm',)),
                       (x.shape[-1],), jnp.float32)         # [D]
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)  # [..., 1]
    y = x32 * jax.lax.rsqrt(var + self.eps)                 # [..., D]
    return (y * scale).astype(self.dtype)                   # [..., D]


def LayerNorm(eps: float = 1e-6, dtype: Dtype = jnp.float32, name: str | None = None) -> nn.LayerNorm:
  """A `nn.LayerNorm` (scale + bias, float32 statistics) whose params carry the logical axis 'norm'."""
  return nn.LayerNorm(
      epsilon=eps, dtype=dtype, param_dtype=jnp.float32, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ('norm',)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('norm',)))
