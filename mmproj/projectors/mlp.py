"""MLP projector — LLaVA-1.5 (Liu et al. 2023, "Improved Baselines with Visual Instruction Tuning",
arXiv:2310.03744), `mlp{depth}x_gelu`.

Depth-N MLP applied to every encoder token independently, exact (erf) GELU between layers, none after the last:
  depth 1: Linear(Dv, Dt)
  depth 2: Linear(Dv, Dt) GELU Linear(Dt, Dt)                 (LLaVA-1.5's mlp2x_gelu)
  depth N: Linear(Dv, Dt) [GELU Linear(Dt, Dt)] * (N - 1)

  tokens in -> out:  N -> M = N  (one LM token per patch, h * w)
  params:            (in_dim * out_dim + out_dim) + (depth - 1) * (out_dim * out_dim + out_dim)
  spatial locality:  kept — output token i depends only on patch i (row-major grid)
  shapes:            x [B, N, Dv] -> linear_1 -> [B, N, Dt] -> GELU -> linear_2 -> ... -> y [B, N, Dt]

Layers are named linear_1 .. linear_N (HF LlavaMultiModalProjector). Kernel logical axes alternate
('embed', 'mlp'), ('mlp', 'embed'), ('embed', 'mlp'), ... (column- then row-parallel, as in Megatron), because one
array cannot carry the same logical name twice; each bias carries its kernel's output axis.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmproj.layers import dense
from mmproj.projectors import register


@register('mlp')
class MLPProjector(nn.Module):
  """Token-wise depth-N GELU MLP: [B, N, Dv] -> [B, N, Dt]."""

  in_dim: int
  out_dim: int
  depth: int = 2
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, grid=None, deterministic: bool = True):    # x [B, N, Dv]
    del grid, deterministic  # token-wise map: no grid, no dropout
    if x.shape[-1] != self.in_dim:
      raise ValueError(f'mlp projector expects in_dim={self.in_dim}, got tokens of width {x.shape[-1]}')
    for i in range(self.depth):
      if i > 0:
        x = jax.nn.gelu(x, approximate=False)                         # [B, N, Dt]
      names = ('embed', 'mlp') if i % 2 == 0 else ('mlp', 'embed')
      x = dense(self.out_dim, names, use_bias=True, dtype=self.dtype, name=f'linear_{i + 1}')(x)  # [B, N, Dt]
    return x                                                            # [B, N, Dt]

  @classmethod
  def check_config(cls, cfg) -> None:
    depth = cfg.get('depth', 2)
    if not isinstance(depth, int) or depth < 1:
      raise ValueError(f'model.projector.depth must be an int >= 1, got {depth!r}')

  @classmethod
  def num_output_tokens(cls, cfg, grid) -> int:
    return grid[0] * grid[1]

  @classmethod
  def param_count(cls, cfg, in_dim: int, out_dim: int) -> int:
    depth = cfg.get('depth', 2)
    return (in_dim * out_dim + out_dim) + (depth - 1) * (out_dim * out_dim + out_dim)
