"""LDPv2 — MobileVLM V2 (Chu, Qiao, Zhang, Xu, Wei, Yang, Zhang, Zhang, Wei, Shen, 2024, "MobileVLM V2: Faster
and Stronger Baseline for Vision Language Model", arXiv:2402.03766).

The V2 projector drops LDP's inverted-residual blocks: a token-wise MLP, an average pool that quarters the token
count, and a positional encoding generator (PEG, Chu et al. 2021 "Conditional Positional Encodings") that adds
a depthwise 3x3 conv of the pooled map back onto it:

  x [B, N, Dv] --Linear GELU Linear--> [B, h, w, D]        (feature interaction, D = Dt)
    --average pool 2x2 (`pool`)--> [B, h', w', D]          (token reduction)
    --PEG: z + DWConv3x3(z) (bias)--> [B, h', w', D]        (positional enhancement)
    --> y [B, h'*w', D]

MobileVLM V2's code pools with `AdaptiveAvgPool2d((12, 12))` on the 24 x 24 CLIP grid, i.e. a 2 x 2 mean. Here the
output grid is (ceil(h / pool), ceil(w / pool)) through the same adaptive pool: exact non-overlapping pool x pool
means when pool divides the grid, torch AdaptiveAvgPool2d's uneven windows [floor(i*h/h'), ceil((i+1)*h/h'))
(sizes pool-1..pool+1, neighbours may share a row) when it does not.

  tokens in -> out:  N = h * w -> M = ceil(h / pool) * ceil(w / pool)
  params:            (Dv*D + D) + (D*D + D) + (9*D + D)          (MLP, PEG depthwise kernel + bias)
  spatial locality:  kept: output (i, j) depends only on the pool windows of cells i-1..i+1 and j-1..j+1
                     (clipped to the pooled grid) — the PEG's 3x3 neighbourhood, each cell its own window.
  shapes:            x [B, h*w, Dv] -> mlp [B, h*w, D] -> [B, h, w, D] -> pool [B, h', w', D] -> peg [B, h', w', D]
                     -> y [B, h'*w', D]

Param names: linear_1, linear_2, peg (kernel [9, D] ('patch', 'mlp'), bias [D] ('mlp',)).
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mmproj.layers.feature_map import DepthwiseConv2d, map_to_tokens, tokens_to_map
from mmproj.layers.token_grid import avg_pool_2d, require_2d
from mmproj.projectors.registry import check_int, register
from mmproj.projectors.ldp import pointwise_mlp


def pooled_grid(grid, pool: int) -> tuple[int, int]:
  require_2d(grid, f'ldpv2 projector (pool={pool})')
  return -(-grid[0] // pool), -(-grid[1] // pool)


@register('ldpv2')
class LDPv2Projector(nn.Module):
  """MobileVLM V2 LDPv2: pointwise MLP -> average pool -> PEG (depthwise 3x3 conv + residual)."""

  in_dim: int
  out_dim: int
  pool: int = 2                   # pool x pool token reduction (ceil on odd grids)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, grid, deterministic: bool = True):          # x [B, N, Dv]
    del deterministic  # no dropout
    who = f'ldpv2 projector (pool={self.pool})'
    require_2d(grid, who)   # 2-D pool and a 3x3 positional convolution over the patch map
    if x.shape[-1] != self.in_dim:
      raise ValueError(f'{who} expects in_dim={self.in_dim}, got tokens of width {x.shape[-1]}')
    tokens_to_map(x, grid, who)   # checks N == h * w before any compute
    x = pointwise_mlp(x, self.out_dim, self.dtype)                        # [B, N, D]
    hp, wp = pooled_grid(grid, self.pool)
    x = avg_pool_2d(x, grid, (hp, wp)).reshape(-1, hp, wp, self.out_dim)  # [B, h', w', D]
    x = x + DepthwiseConv2d(3, 1, use_bias=True, dtype=self.dtype, name='peg')(x)   # [B, h', w', D]
    return map_to_tokens(x)                                               # [B, h'*w', D]

  @nn.nowrap
  def check(self) -> None:
    check_int('pool', self.pool)

  @nn.nowrap
  def num_output_tokens(self, grid) -> int:
    hp, wp = pooled_grid(grid, self.pool)
    return hp * wp

  @nn.nowrap
  def param_count(self) -> int:
    dv, d = self.in_dim, self.out_dim
    return (dv * d + d) + (d * d + d) + (9 * d + d)
