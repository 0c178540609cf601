"""LLaVA-NeXT-Video's video connector (Zhang et al. 2024, "LLaVA-NeXT: A Strong Zero-shot Video Understanding
Model", a LLaVA blog post, no arXiv paper; transformers LlavaNextVideoPooler + LlavaNextVideoMultiModalProjector).

Every frame is encoded on its own (the ViT folds frames into the batch); the connector first pools each frame's
patch grid spatially by a stride-s window (the `vision_resampler`), then maps every pooled token with LLaVA-1.5's
MLP (LlavaNextVideoModel.get_video_features runs the pooler before the projector):

    x [B, F*h*w, Dv] ──per frame: pool s x s, stride s──> [B, F*(h/s)*(w/s), Dv] ──Linear GELU Linear──> y [B, M, Dt]

  pool_mode 'average': AvgPool2d(s, s)  (HF's default and the published models': s = 2 on CLIP-L/336's 24 x 24 grid)
            'max':     MaxPool2d(s, s)
            'conv':    Conv2d(Dv, Dv, kernel s, stride s, with bias) == s x s space-to-depth + Linear(s*s*Dv, Dv)
                       (HF's spatial_pool_out_channels must equal Dv, the projector's input width)
The grid must be divisible by s (ValueError naming model.projector.spatial_pool_stride and the grid): torch's
pools would silently drop the last rows and columns. The output is each frame's pooled tokens, row-major, frames in
time order (HF: video_features.unflatten(0, (B, F)).flatten(1, 2)). The number of frames is the field
`num_frames` (token counts are known before the call), checked against the tokens at call time (ValueError naming
model.projector.num_frames); an image is num_frames = 1.

  tokens in -> out:  N = F*h*w -> M = F * (h/s) * (w/s)      (F = num_frames)
  params:            [pool_mode 'conv'] s*s*Dv*Dv + Dv
                     + (Dv*Dt + b*Dt) + (depth - 1) * (Dt*Dt + b*Dt),  b = use_bias  (LLaVA: depth 2)
  spatial locality:  kept — output token (r, c) of frame f depends only on frame f's s x s window at (r*s, c*s);
                     temporal locality kept (no mixing across frames)
  shapes:            x [B, F*h*w, Dv] -> [B*F, h, w, Dv] -> pool [B*F, h/s, w/s, Dv] ('conv': pool/kernel
                     [s*s*Dv, Dv] ('embed', 'mlp'), pool/bias [Dv]) -> [B, M, Dv] -> linear_1 [Dv, Dt] -> GELU
                     -> linear_2 [Dt, Dt] -> y [B, M, Dt]

Parameter names follow HF: pool (vision_resampler.pool, conv only), linear_1, linear_2 (multi_modal_projector).
mmproj.convert.llava_video.llava_next_video_connector ports the pair.
"""

from typing import Any

import einops
import flax.linen as nn
import jax.numpy as jnp

from mmproj.layers import ACTIVATIONS, dense
from mmproj.layers.token_grid import check_divisible, check_frames, space_to_depth, require_2d
from mmproj.projectors.mlp import dense_stack, dense_stack_param_count
from mmproj.projectors.registry import check_choice, check_int, register

POOL_MODES = ('average', 'max', 'conv')


@register('llava_next_video', modality='video')
class LlavaNextVideoProjector(nn.Module):
  """Per-frame s x s spatial pool, then a token-wise MLP: [B, F*h*w, Dv] -> [B, F*(h/s)*(w/s), Dt]."""

  in_dim: int
  out_dim: int
  num_frames: int = 1             # F: frames of grid (h, w) in x
  pool_mode: str = 'average'      # 'average' | 'max' | 'conv' (HF spatial_pool_mode)
  spatial_pool_stride: int = 2    # s: kernel = stride (HF spatial_pool_stride)
  depth: int = 2                  # MLP depth (LLaVA's projector: 2)
  act: str = 'gelu'               # HF projector_hidden_act
  use_bias: bool = True           # HF multimodal_projector_bias
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, grid=None, deterministic: bool = True):    # x [B, F*h*w, Dv]
    del deterministic  # no dropout
    what = 'llava_next_video projector'
    h, w = check_frames(x, grid, self.num_frames, what)
    s = self.spatial_pool_stride
    check_divisible((h, w), s, 'spatial_pool_stride', what)
    if x.shape[-1] != self.in_dim:
      raise ValueError(f'{what} expects in_dim={self.in_dim}, got tokens of width {x.shape[-1]}')
    x = x.astype(self.dtype)
    if self.pool_mode == 'conv':
      x = space_to_depth(x, (h, w), s, self.num_frames)                 # [B, M, s*s*Dv]  (i, j, d) = conv taps
      x = dense(self.in_dim, ('embed', 'mlp'), use_bias=True, dtype=self.dtype, name='pool')(x)  # [B, M, Dv]
    else:
      reduce = 'mean' if self.pool_mode == 'average' else 'max'
      x = einops.reduce(x, 'b (f R i C j) d -> b (f R C) d', reduce, f=self.num_frames, R=h // s, i=s,
                        C=w // s, j=s)                                  # [B, M, Dv]
    return dense_stack(x, self.out_dim, self.depth, self.act, self.use_bias, self.dtype)  # [B, M, Dt]

  @nn.nowrap
  def check(self) -> None:
    check_int('num_frames', self.num_frames)
    check_choice('pool_mode', self.pool_mode, POOL_MODES)
    check_int('spatial_pool_stride', self.spatial_pool_stride)
    check_int('depth', self.depth)
    check_choice('act', self.act, ACTIVATIONS)

  @nn.nowrap
  def num_output_tokens(self, grid) -> int:
    grid = require_2d(grid, 'llava_next_video projector')
    s = self.spatial_pool_stride
    check_divisible(grid, s, 'spatial_pool_stride', 'llava_next_video projector')
    return self.num_frames * (grid[0] // s) * (grid[1] // s)

  @nn.nowrap
  def param_count(self) -> int:
    s, dv = self.spatial_pool_stride, self.in_dim
    pool = s * s * dv * dv + dv if self.pool_mode == 'conv' else 0
    return pool + dense_stack_param_count(dv, self.out_dim, self.depth, self.use_bias)
