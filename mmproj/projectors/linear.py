"""Linear projector — LLaVA (Liu et al. 2023, "Visual Instruction Tuning", arXiv:2304.08485).

One affine map applied to every encoder token independently:  y = x W + b.

  tokens in -> out:  N -> M = N  (one LM token per patch, h * w; per frame, T, for an audio grid (T,))
  params:            in_dim * out_dim + out_dim
  spatial locality:  kept — token i of the output is patch i (row-major grid), nothing is mixed across patches
  shapes:            x [B, N, Dv] -> W [Dv, Dt] ('embed', 'mlp'), b [Dt] ('mlp',) -> y [B, N, Dt]
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mmproj.layers import dense
from mmproj.layers.token_grid import grid_tokens
from mmproj.projectors.registry import register


@register('linear')
class LinearProjector(nn.Module):
  """y = x W + b on every token: [B, N, Dv] -> [B, N, Dt]."""

  in_dim: int
  out_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, grid=None, deterministic: bool = True):    # x [B, N, Dv]
    del grid, deterministic  # token-wise map: no grid, no dropout
    if x.shape[-1] != self.in_dim:
      raise ValueError(f'linear projector expects in_dim={self.in_dim}, got tokens of width {x.shape[-1]}')
    return dense(self.out_dim, ('embed', 'mlp'), use_bias=True, dtype=self.dtype, name='linear')(x)  # [B, N, Dt]

  @nn.nowrap
  def check(self) -> None:
    """Nothing to check: the only fields are the widths."""

  @nn.nowrap
  def num_output_tokens(self, grid) -> int:
    return grid_tokens(grid, 'linear projector')

  @nn.nowrap
  def param_count(self) -> int:
    return self.in_dim * self.out_dim + self.out_dim
