"""Conv-style blocks for projectors that treat encoder tokens as a 2-D feature map in NHWC layout ([B, h, w, C])
(C-/D-Abstractor, LDP, LDPv2; adaptive average pooling lives in mmproj.layers.token_grid.avg_pool_2d).

  tokens_to_map / map_to_tokens   row-major tokens [B, h*w, C] <-> map [B, h, w, C] (grid (h, w) checked)
  DepthwiseConv2d                 k x k per-channel conv with torch padding k // 2 (symmetric), stride s:
                                   out = floor((n + 2*(k//2) - k) / s) + 1 (= ceil(n / 2) for k=3, s=2)
  bilinear_sample(value, loc)     == torch grid_sample(mode='bilinear', padding_mode='zeros') at loc in [0, 1]
  SqueezeExcite                   SE gate (Hu et al. 2018): x * gate(fc2(act(fc1(mean_hw(x))))) — note the mean
                                   over the whole map: a block with SE is no longer spatially local

Depthwise kernels are stored flattened as [k*k, C] ('patch', <channel axis>) in (row, col) order — torch weight
[C, 1, k, k] reshaped to [C, k*k] and transposed — because a 4-d HWIO kernel would need four distinct logical
names (see the ViT patch embedding). The conv itself is `jax.lax.conv_general_dilated` in NHWC with
feature_group_count=C, i.e. what `flax.linen.Conv(feature_group_count=C)` runs.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmproj.layers.mlp import dense, get_activation
from mmproj.layers.token_grid import require_2d

Dtype = Any

# Gates of SqueezeExcite: timm SEModule uses sigmoid, torchvision (MobileNetV3) hard-sigmoid relu6(x + 3) / 6.
SE_GATES = {'sigmoid': jax.nn.sigmoid, 'hard_sigmoid': jax.nn.hard_sigmoid}


def tokens_to_map(x, grid, who: str):
  """[B, N, C] row-major tokens -> [B, h, w, C]; ValueError naming the grid when N != h * w or it is not 2-D."""
  h, w = require_2d(grid, who)
  if x.ndim != 3 or x.shape[1] != h * w:
    raise ValueError(f'{who}: grid={tuple(grid)} needs tokens [B, {h * w}, C], got shape {tuple(x.shape)}')
  return x.reshape(x.shape[0], h, w, x.shape[-1])                         # [B, h, w, C]


def map_to_tokens(x):
  """[B, h, w, C] -> row-major tokens [B, h*w, C]."""
  return x.reshape(x.shape[0], x.shape[1] * x.shape[2], x.shape[3])       # [B, h*w, C]


class DepthwiseConv2d(nn.Module):
  """Per-channel k x k conv (torch Conv2d(C, C, k, stride, padding=k // 2, groups=C)) on [B, h, w, C]."""

  kernel_size: int = 3
  stride: int = 1
  use_bias: bool = False
  channel_axis: str = 'mlp'       # logical name of the channel axis of kernel and bias
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):                                                  # x [B, h, w, C]
    k, c = self.kernel_size, x.shape[-1]
    kernel = self.param('kernel', nn.with_logical_partitioning(
        nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal', in_axis=0, out_axis=1),
        ('patch', self.channel_axis)), (k * k, c), jnp.float32)           # [k*k, C]
    pad = k // 2
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), kernel.astype(self.dtype).reshape(k, k, 1, c),
        window_strides=(self.stride, self.stride), padding=((pad, pad), (pad, pad)),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=c)  # [B, h', w', C]
    if self.use_bias:
      bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros, (self.channel_axis,)),
                        (c,), jnp.float32)                                # [C]
      y = y + bias.astype(self.dtype)
    return y                                                              # [B, h', w', C]


def conv_out_size(n: int, kernel_size: int, stride: int) -> int:
  """Output length of DepthwiseConv2d along one axis of length n."""
  return (n + 2 * (kernel_size // 2) - kernel_size) // stride + 1


def bilinear_sample(value, loc, *, align_corners: bool = False):
  """Bilinear interpolation of a map at continuous points, zero outside the map.

  value [B, H, W, C]; loc [B, K, 2] as (x, y) normalised to [0, 1] (Deformable DETR's convention) -> [B, K, C].
  align_corners=False (default, what Deformable DETR / HF use): pixel (i, j) has its centre at ((j + .5) / W,
  (i + .5) / H), so 0 and 1 are the outer edges of the border pixels; the pixel coordinate is x * W - 0.5.
  align_corners=True: 0 and 1 are the centres of the border pixels; the pixel coordinate is x * (W - 1).
  Each point reads its 2 x 2 neighbours (floor, floor + 1) with weights (1 - f, f) per axis; a neighbour outside
  the map contributes zero (torch padding_mode='zeros'). Equals torch grid_sample(value, 2 * loc - 1, 'bilinear',
  'zeros', align_corners). Coordinates and weights in float32, values gathered in value.dtype.
  """
  b, hh, ww, c = value.shape
  loc = loc.astype(jnp.float32)
  if align_corners:
    px, py = loc[..., 0] * (ww - 1), loc[..., 1] * (hh - 1)              # [B, K]
  else:
    px, py = loc[..., 0] * ww - 0.5, loc[..., 1] * hh - 0.5               # [B, K]
  # Far-away points read only zeros; clipping first keeps the int cast defined (inf/huge offsets).
  px, py = jnp.clip(px, -2.0, ww + 1.0), jnp.clip(py, -2.0, hh + 1.0)
  x0, y0 = jnp.floor(px), jnp.floor(py)
  fx, fy = px - x0, py - y0                                               # [B, K] in [0, 1)
  x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)
  flat = value.reshape(b, hh * ww, c)                                     # [B, H*W, C]
  gather = jax.vmap(lambda f, i: f[i])
  out = jnp.zeros((b, loc.shape[1], c), value.dtype)
  for dy, wy in ((0, 1.0 - fy), (1, fy)):
    for dx, wx in ((0, 1.0 - fx), (1, fx)):
      xi, yi = x0 + dx, y0 + dy                                           # [B, K]
      inside = (xi >= 0) & (xi < ww) & (yi >= 0) & (yi < hh)
      idx = jnp.clip(yi, 0, hh - 1) * ww + jnp.clip(xi, 0, ww - 1)        # [B, K]
      weight = jnp.where(inside, wx * wy, 0.0).astype(value.dtype)        # [B, K]
      out = out + gather(flat, idx) * weight[..., None]                   # [B, K, C]
  return out                                                              # [B, K, C]


def square_side(num_queries: Any, field: str) -> int:
  """m for num_queries = m * m; ValueError naming `field` otherwise."""
  if not isinstance(num_queries, int) or isinstance(num_queries, bool) or num_queries < 1 \
      or math.isqrt(num_queries) ** 2 != num_queries:
    raise ValueError(f'{field} must be a positive square number m*m (an m x m query grid), got {num_queries!r}')
  return math.isqrt(num_queries)


class SqueezeExcite(nn.Module):
  """Squeeze-and-excitation on [B, h, w, C]: per-channel gate from the map's global mean.

  fc1 [C, R] ('mlp', 'embed') and fc2 [R, C] ('embed', 'mlp') are 1 x 1 convs with biases (timm SEModule,
  torchvision SqueezeExcitation). params: 2 * C * R + R + C.
  """

  reduced: int
  act: str = 'relu'
  gate: str = 'sigmoid'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):                                                  # x [B, h, w, C]
    c = x.shape[-1]
    s = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(self.dtype)  # [B, 1, 1, C]
    s = dense(self.reduced, ('mlp', 'embed'), use_bias=True, dtype=self.dtype, name='fc1')(s)  # [B, 1, 1, R]
    s = get_activation(self.act)(s)
    s = dense(c, ('embed', 'mlp'), use_bias=True, dtype=self.dtype, name='fc2')(s)  # [B, 1, 1, C]
    return x * SE_GATES[self.gate](s)                                     # [B, h, w, C]
