"""Audio Flamingo 3 connector — Audio Flamingo 3 (Goel et al. 2025, "Audio Flamingo 3: Advancing Audio
Intelligence with Fully Open Large Audio Language Models", arXiv:2507.08128).

Audio Flamingo 3's AF-Whisper encoder ends, like Qwen2-Audio's, with a stride-2 average pool over time and a
LayerNorm; its adaptor is then a two-layer MLP to the LM width (transformers AudioFlamingo3MultiModalProjector).
Pool and norm belong to this connector, so that an encoder with its final norm off plus this projector computes
the reference's pool -> layer_norm -> linear_1 -> act -> linear_2:

    x [B, T, Dv] ──average pool, kernel = stride = pool_stride──> [B, T/s, Dv] ──norm?──>
                 ──linear_1──> [B, T/s, Dt] ──act──> ──linear_2──> y [B, T/s, Dt]

  Audio Flamingo 3 (encoder tail + AudioFlamingo3MultiModalProjector):  pool_stride=2, norm='layernorm' (defaults)
  AudioFlamingo3MultiModalProjector alone:                               pool_stride=1, norm='none'

The pool is torch AvgPool1d(s, stride=s) (mmproj.layers.token_grid.pool_frames: the last T % s frames are dropped);
the tokens are read as one sequence in the order given (time order for an audio grid (T,); row-major for an image
grid (h, w), whose pooling runs straddle rows when s does not divide w).

  tokens in -> out:  N -> M = floor(N / pool_stride)   (N = T, or h*w for an image grid)
  params:            2*Dv ('layernorm'; 0 for 'none') + Dv*Dt + b*Dt + Dt*Dt + b*Dt,  b = use_bias
  temporal locality: kept — output token i depends only on frames i*s .. i*s + s - 1
  shapes:            x [B, T, Dv] -> pool [B, M, Dv] -> norm ('norm' [Dv]) -> linear_1 [Dv, Dt] ('embed', 'mlp')
                     -> act -> linear_2 [Dt, Dt] ('mlp', 'embed') -> y [B, M, Dt]
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mmproj.layers import ACTIVATIONS
from mmproj.layers.token_grid import grid_tokens, norm_params
from mmproj.projectors.mlp import dense_stack, dense_stack_param_count
from mmproj.projectors.qwen2_audio import AUDIO_NORMS, pool_and_norm, pooled_length
from mmproj.projectors.registry import check_choice, check_int, check_positive, register


@register('audio_flamingo3', modality='audio')
class AudioFlamingo3Projector(nn.Module):
  """Temporal average pool, optional LayerNorm, Linear-act-Linear: [B, T, Dv] -> [B, T // pool_stride, Dt]."""

  in_dim: int
  out_dim: int
  pool_stride: int = 2       # AvgPool1d(s, stride=s) over time; 1 = no pool
  norm: str = 'layernorm'    # 'layernorm' (the encoder's final norm, moved here) | 'none'
  norm_eps: float = 1e-5     # torch nn.LayerNorm
  act: str = 'gelu'          # HF projector_hidden_act (exact erf GELU)
  use_bias: bool = True      # HF projector_bias
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, grid=None, deterministic: bool = True):    # x [B, T, Dv]
    del deterministic  # no dropout
    x = pool_and_norm(x, grid, in_dim=self.in_dim, pool_stride=self.pool_stride, norm=self.norm,
                      norm_eps=self.norm_eps, dtype=self.dtype, what='audio_flamingo3 projector')   # [B, M, Dv]
    return dense_stack(x, self.out_dim, 2, self.act, self.use_bias, self.dtype)   # [B, M, Dt]

  @nn.nowrap
  def check(self) -> None:
    check_int('pool_stride', self.pool_stride)
    check_choice('norm', self.norm, AUDIO_NORMS)
    check_positive('norm_eps', self.norm_eps)
    check_choice('act', self.act, ACTIVATIONS)

  @nn.nowrap
  def num_output_tokens(self, grid) -> int:
    what = 'audio_flamingo3 projector'
    return pooled_length(grid_tokens(grid, what), self.pool_stride, what)

  @nn.nowrap
  def param_count(self) -> int:
    return norm_params(self.norm, self.in_dim) + dense_stack_param_count(self.in_dim, self.out_dim, 2, self.use_bias)
