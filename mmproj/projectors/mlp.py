"""MLP projector — LLaVA-1.5 (Liu et al. 2023, "Improved Baselines with Visual Instruction Tuning",
arXiv:2310.03744), `mlp{depth}x_gelu`.

Depth-N MLP applied to every encoder token independently, an activation (default exact erf GELU, HF "gelu")
between layers, none after the last:
  depth 1: Linear(Dv, Dt)
  depth 2: Linear(Dv, Dt) GELU Linear(Dt, Dt)                 (LLaVA-1.5's mlp2x_gelu)
  depth N: Linear(Dv, Dt) [GELU Linear(Dt, Dt)] * (N - 1)

  tokens in -> out:  N -> M = N  (one LM token per patch, h * w; per frame, T, for an audio grid (T,))
  params:            (in_dim * out_dim + out_dim) + (depth - 1) * (out_dim * out_dim + out_dim)
                     (without the out_dim bias terms when use_bias=False)
  spatial locality:  kept — output token i depends only on patch i (row-major grid)
  shapes:            x [B, N, Dv] -> linear_1 -> [B, N, Dt] -> GELU -> linear_2 -> ... -> y [B, N, Dt]

Layers are named linear_1 .. linear_N (HF LlavaMultiModalProjector). Kernel logical axes alternate
('embed', 'mlp'), ('mlp', 'embed'), ('embed', 'mlp'), ... (column- then row-parallel, as in Megatron), because one
array cannot carry the same logical name twice; each bias carries its kernel's output axis.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mmproj.layers import ACTIVATIONS, dense, get_activation
from mmproj.layers.token_grid import grid_tokens
from mmproj.projectors.registry import check_choice, check_int, register


@register('mlp')
class MLPProjector(nn.Module):
  """Token-wise depth-N GELU MLP: [B, N, Dv] -> [B, N, Dt]."""

  in_dim: int
  out_dim: int
  depth: int = 2
  act: str = 'gelu'       # a key of mmproj.layers.ACTIVATIONS (HF projector_hidden_act)
  use_bias: bool = True   # HF multimodal_projector_bias
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, grid=None, deterministic: bool = True):    # x [B, N, Dv]
    del grid, deterministic  # token-wise map: no grid, no dropout
    if x.shape[-1] != self.in_dim:
      raise ValueError(f'mlp projector expects in_dim={self.in_dim}, got tokens of width {x.shape[-1]}')
    return dense_stack(x, self.out_dim, self.depth, self.act, self.use_bias, self.dtype)  # [B, N, Dt]

  @nn.nowrap
  def check(self) -> None:
    check_int('depth', self.depth)
    check_choice('act', self.act, ACTIVATIONS)

  @nn.nowrap
  def num_output_tokens(self, grid) -> int:
    return grid_tokens(grid, 'mlp projector')

  @nn.nowrap
  def param_count(self) -> int:
    return dense_stack_param_count(self.in_dim, self.out_dim, self.depth, self.use_bias)


def dense_stack(x, out_dim: int, depth: int, act: str, use_bias: bool, dtype, prefix: str = 'linear'):
  """Linear (act Linear) * (depth - 1) as layers {prefix}_1 .. {prefix}_{depth} of the calling module, kernel axes
  alternating as in the module docstring: [..., Din] -> [..., out_dim]. The MLP projector's body, and the readout
  of the Honeybee abstractors (prefix 'readout')."""
  for i in range(depth):
    if i > 0:
      x = get_activation(act)(x)                                        # [..., out_dim]
    names = ('embed', 'mlp') if i % 2 == 0 else ('mlp', 'embed')
    x = dense(out_dim, names, use_bias=use_bias, dtype=dtype, name=f'{prefix}_{i + 1}')(x)
  return x                                                              # [..., out_dim]


def dense_stack_param_count(in_dim: int, out_dim: int, depth: int, use_bias: bool = True) -> int:
  """The module docstring's formula: (in_dim*out_dim + b*out_dim) + (depth - 1) * (out_dim*out_dim + b*out_dim)."""
  bias = int(use_bias)
  return (in_dim * out_dim + bias * out_dim) + (depth - 1) * (out_dim * out_dim + bias * out_dim)
