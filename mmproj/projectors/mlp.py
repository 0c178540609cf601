"""MLP projector — LLaVA-1.5 (Liu et al. 2023, "Improved Baselines with Visual Instruction Tuning",
arXiv:2310.03744), `mlp{depth}x_gelu`.

Depth-N MLP applied to every encoder token independently, an activation (default exact erf GELU, HF "gelu")
between layers, none after the last:
  depth 1: Linear(Dv, Dt)
  depth 2: Linear(Dv, Dt) GELU Linear(Dt, Dt)                 (LLaVA-1.5's mlp2x_gelu)
  depth N: Linear(Dv, Dt) [GELU Linear(Dt, Dt)] * (N - 1)

  tokens in -> out:  N -> M = N  (one LM token per patch, h * w)
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
    for i in range(self.depth):
      if i > 0:
        x = get_activation(self.act)(x)                               # [B, N, Dt]
      names = ('embed', 'mlp') if i % 2 == 0 else ('mlp', 'embed')
      x = dense(self.out_dim, names, use_bias=self.use_bias, dtype=self.dtype, name=f'linear_{i + 1}')(x)
    return x                                                            # [B, N, Dt]

  @classmethod
  def check_config(cls, cfg) -> None:
    check_int(cfg, 'depth', 2)
    check_choice(cfg, 'act', 'gelu', ACTIVATIONS)

  @classmethod
  def num_output_tokens(cls, cfg, grid) -> int:
    return grid[0] * grid[1]

  @classmethod
  def param_count(cls, cfg, in_dim: int, out_dim: int) -> int:
    depth, bias = cfg.get('depth', 2), int(cfg.get('use_bias', True))
    return (in_dim * out_dim + bias * out_dim) + (depth - 1) * (out_dim * out_dim + bias * out_dim)
