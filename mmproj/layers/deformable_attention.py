"""Deformable attention (Zhu et al. 2021, "Deformable DETR: Deformable Transformers for End-to-End Object
Detection", arXiv:2010.04159), one feature level — HF `DeformableDetrMultiscaleDeformableAttention` with
num_feature_levels=1.

Each query looks at a handful of points around its reference point instead of at every key:
  offsets  = sampling_offsets(q)        [B, Q, H, P, 2]  in pixels of the value map (x, y)
  weights  = softmax_P(attention_weights(q))   [B, Q, H, P]
  loc      = ref + offsets / (w, h)     [B, Q, H, P, 2]  normalised (x, y) in [0, 1] (align_corners=False)
  v        = value_proj(value_map)      [B, h, w, H, Dh]
  out_h    = sum_p weights[h, p] * bilinear(v_h, loc[h, p])      (zero outside the map)
  y        = output_proj(concat_h out_h)   [B, Q, D]

The offsets and attention weights depend on the query only (not on the values), so a query reads the value map
only at the 2 x 2 bilinear neighbourhoods of its H * P sampling points; the offsets are unbounded, so nothing
keeps those points near the reference point after training.

Init as Deformable DETR: sampling_offsets kernel 0 and bias = head h's direction (cos, sin)(2 pi h / H) scaled
to unit max-norm times (p + 1) (a ring of points around the reference), attention_weights 0 (uniform), value /
output projections xavier-uniform with zero bias.

params: D * H*P*2 + H*P*2  +  D * H*P + H*P  +  2 * (D * D + D)
Kernels: sampling_offsets [D, H*P*2], attention_weights [D, H*P], value_proj [D, D] ('embed', 'mlp'),
output_proj [D, D] ('mlp', 'embed'); flattened outputs in HF order ((head, point, xy) row-major).
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmproj.layers.feature_map import bilinear_sample

Dtype = Any


def _offset_bias_init(num_heads: int, num_points: int):
  """Deformable DETR's ring init of the sampling-offset bias: [H*P*2], head h at angle 2 pi h / H."""
  def init(key, shape, dtype=jnp.float32):
    del key
    theta = np.arange(num_heads, dtype=np.float64) * (2.0 * math.pi / num_heads)
    grid = np.stack([np.cos(theta), np.sin(theta)], -1)                   # [H, 2]
    grid = grid / np.abs(grid).max(-1, keepdims=True)
    grid = grid[:, None, :] * np.arange(1, num_points + 1)[None, :, None]  # [H, P, 2]
    return jnp.asarray(grid.reshape(shape), dtype)
  return init


def _dense(features, names, kernel_init, dtype, name):
  return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, name=name,
                  kernel_init=nn.with_logical_partitioning(kernel_init, names),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, names[-1:]))


class DeformableAttention(nn.Module):
  """Single-level deformable attention of queries [B, Q, D] over a value map [B, h, w, D] -> [B, Q, D]."""

  num_heads: int
  num_points: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, queries, reference_points, value_map):
    """queries [B, Q, D] (position embedding already added); reference_points [B or 1, Q, 2] normalised (x, y);
    value_map [B, h, w, D]."""
    b, q, d = queries.shape
    _, hh, ww, _ = value_map.shape
    nh, npt = self.num_heads, self.num_points
    if d % nh:
      raise ValueError(f'deformable attention: width {d} is not divisible by num_heads={nh}')
    offsets = nn.Dense(
        nh * npt * 2, dtype=jnp.float32, param_dtype=jnp.float32, name='sampling_offsets',
        kernel_init=nn.with_logical_partitioning(nn.initializers.zeros, ('embed', 'mlp')),
        bias_init=nn.with_logical_partitioning(_offset_bias_init(nh, npt), ('mlp',)))(
            queries.astype(jnp.float32)).reshape(b, q, nh, npt, 2)        # [B, Q, H, P, 2] pixels
    logits = nn.Dense(
        nh * npt, dtype=jnp.float32, param_dtype=jnp.float32, name='attention_weights',
        kernel_init=nn.with_logical_partitioning(nn.initializers.zeros, ('embed', 'mlp')),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('mlp',)))(
            queries.astype(jnp.float32)).reshape(b, q, nh, npt)           # [B, Q, H, P]
    weights = jax.nn.softmax(logits, axis=-1)                             # [B, Q, H, P]
    value = _dense(d, ('embed', 'mlp'), nn.initializers.xavier_uniform(), self.dtype,
                   'value_proj')(value_map)                               # [B, h, w, D]
    dh = d // nh
    value = value.reshape(b, hh, ww, nh, dh).transpose(0, 3, 1, 2, 4).reshape(b * nh, hh, ww, dh)  # [B*H, h, w, Dh]
    # Offsets are in pixels: normalising by (w, h) makes offset (1, 0) one pixel to the right.
    normaliser = jnp.asarray([ww, hh], jnp.float32)
    ref = jnp.broadcast_to(reference_points.astype(jnp.float32), (b, q, 2))
    loc = ref[:, :, None, None, :] + offsets / normaliser                 # [B, Q, H, P, 2]
    loc = loc.transpose(0, 2, 1, 3, 4).reshape(b * nh, q * npt, 2)        # [B*H, Q*P, 2]
    sampled = bilinear_sample(value, loc).reshape(b, nh, q, npt, dh)      # [B, H, Q, P, Dh]
    out = jnp.einsum('bhqpd,bqhp->bqhd', sampled, weights.astype(sampled.dtype))  # [B, Q, H, Dh]
    out = out.reshape(b, q, d)                                            # [B, Q, D]
    return _dense(d, ('mlp', 'embed'), nn.initializers.xavier_uniform(), self.dtype, 'output_proj')(out)

  @staticmethod
  def param_count(dim: int, num_heads: int, num_points: int) -> int:
    """The formula in the module docstring."""
    hp = num_heads * num_points
    return (dim * hp * 2 + hp * 2) + (dim * hp + hp) + 2 * (dim * dim + dim)
