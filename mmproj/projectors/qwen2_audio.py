"""Qwen2-Audio connector — Qwen2-Audio (Chu et al. 2024, "Qwen2-Audio Technical Report", arXiv:2407.10759).

Qwen2-Audio's Whisper-large-v3 encoder ends with a stride-2 average pool over time and a LayerNorm; its projector
is then one Linear to the LM width. Here pool and norm belong to the connector, so that an encoder with its final
norm off plus this projector computes the reference's pool -> layer_norm -> linear:

    x [B, T, Dv] ──average pool, kernel = stride = pool_stride──> [B, T/s, Dv] ──norm?──> ──Linear──> y [B, T/s, Dt]

  Qwen2-Audio (encoder tail + Qwen2AudioMultiModalProjector):  pool_stride=2, norm='layernorm' (the defaults)
  Qwen2AudioMultiModalProjector alone:                          pool_stride=1, norm='none'

The pool is torch AvgPool1d(s, stride=s): the last T % s frames, which fill no window, are dropped (Qwen2-Audio's
encoder always emits an even 1500 frames). The tokens are read as one sequence in the order given: audio (grid
(T,)) in time order; an image grid (h, w) works too, its patches pooled in row-major runs of s (a run straddles two
rows when s does not divide w).

  tokens in -> out:  N -> M = floor(N / pool_stride)   (N = T, or h*w for an image grid)
  params:            2*Dv ('layernorm'; 0 for 'none') + Dv*Dt + Dt
  temporal locality: kept — output token i averages frames i*s .. i*s + s - 1 and the norm and Linear act on one
                     token at a time
  shapes:            x [B, T, Dv] -> pool [B, M, Dv] -> norm ('norm' scale, bias [Dv]) -> [B, M, Dv]
                     -> linear kernel [Dv, Dt] ('embed', 'mlp'), bias [Dt] -> y [B, M, Dt]
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mmproj.layers import dense
from mmproj.layers.token_grid import check_tokens, grid_tokens, norm_layer, norm_params, pool_frames
from mmproj.projectors.registry import check_choice, check_int, check_positive, register

AUDIO_NORMS = ('none', 'layernorm')


def pool_and_norm(x, grid, *, in_dim: int, pool_stride: int, norm: str, norm_eps: float, dtype, what: str):
  """The front Qwen2-Audio and Audio Flamingo 3 share, called inside their compact __call__ (the norm is their
  submodule): x [B, T, Dv] checked against grid and in_dim -> mean of runs of pool_stride frames -> optional norm
  -> [B, T // pool_stride, Dv]."""
  n = check_tokens(x, grid, what)
  if x.shape[-1] != in_dim:
    raise ValueError(f'{what} expects in_dim={in_dim}, got tokens of width {x.shape[-1]}')
  pooled_length(n, pool_stride, what)
  x = pool_frames(x, pool_stride)                                       # [B, M, Dv]
  layer = norm_layer(norm, norm_eps, dtype)
  return x if layer is None else layer(x)                               # [B, M, Dv]


def pooled_length(n: int, stride: int, what: str) -> int:
  """floor(n / stride) frames after pool_frames; ValueError naming model.projector.pool_stride when that is 0."""
  if n < stride:
    raise ValueError(f'{what}: {n} encoder tokens are fewer than model.projector.pool_stride={stride} '
                     '(the pool would emit no token)')
  return n // stride


@register('qwen2_audio', modality='audio')
class Qwen2AudioProjector(nn.Module):
  """Temporal average pool, optional LayerNorm, one Linear: [B, T, Dv] -> [B, T // pool_stride, Dt]."""

  in_dim: int
  out_dim: int
  pool_stride: int = 2       # AvgPool1d(s, stride=s) over time; 1 = no pool
  norm: str = 'layernorm'    # 'layernorm' (the encoder's final norm, moved here) | 'none'
  norm_eps: float = 1e-5     # torch nn.LayerNorm
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, grid=None, deterministic: bool = True):    # x [B, T, Dv]
    del deterministic  # no dropout
    x = pool_and_norm(x, grid, in_dim=self.in_dim, pool_stride=self.pool_stride, norm=self.norm,
                      norm_eps=self.norm_eps, dtype=self.dtype, what='qwen2_audio projector')   # [B, M, Dv]
    return dense(self.out_dim, ('embed', 'mlp'), use_bias=True, dtype=self.dtype, name='linear')(x)  # [B, M, Dt]

  @nn.nowrap
  def check(self) -> None:
    check_int('pool_stride', self.pool_stride)
    check_choice('norm', self.norm, AUDIO_NORMS)
    check_positive('norm_eps', self.norm_eps)

  @nn.nowrap
  def num_output_tokens(self, grid) -> int:
    return pooled_length(grid_tokens(grid, 'qwen2_audio projector'), self.pool_stride, 'qwen2_audio projector')

  @nn.nowrap
  def param_count(self) -> int:
    return norm_params(self.norm, self.in_dim) + self.in_dim * self.out_dim + self.out_dim
