"""LLaVA-OneVision's video connector (Li et al. 2024, "LLaVA-OneVision: Easy Visual Task Transfer",
arXiv:2408.03326; transformers LlavaOnevisionModel.get_video_features).

Every frame is encoded on its own; LLaVA-1.5's MLP maps every patch token first, then each frame's grid is
downsampled 2x by bilinear interpolation to ceil(h/2) x ceil(w/2) (`apply_pooling`: torch interpolate, bilinear,
align_corners=False, no antialiasing), the frames are concatenated in time order and one learned `image_newline`
token is appended after the last frame, once per video (not per frame or per row):

    x [B, F*h*w, Dv] ──Linear GELU Linear──> [B, F*h*w, Dt] ──per frame: bilinear to (h', w')──> [B, F*h'*w', Dt]
                     ──append image_newline──> y [B, F*h'*w' + 1, Dt]           h' = ceil(h/2), w' = ceil(w/2)

At odd sizes the 2x downsampling is not a 2x2 mean: along an axis of n resized to m = ceil(n/2), output i samples
the source coordinate (i + 1/2) n/m - 1/2 between its two neighbours (mmproj.layers.token_grid.bilinear_resize).
The number of frames is the field `num_frames` (token counts are known before the call), checked against the
tokens at call time (ValueError naming model.projector.num_frames); an image is num_frames = 1 (LLaVA-OneVision's
own image path is anyres tiling, which is not this).

  tokens in -> out:  N = F*h*w -> M = F * ceil(h/2) * ceil(w/2) + [newline]      (F = num_frames)
  params:            (Dv*Dt + b*Dt) + (depth - 1) * (Dt*Dt + b*Dt) + [newline] Dt,  b = use_bias  (LLaVA: depth 2)
  spatial locality:  kept — output token (r, c) of frame f mixes at most 2 x 2 neighbouring patches of frame f
                     around (r*h/h', c*w/w'); temporal locality kept; the newline token depends on no input
  shapes:            x [B, F*h*w, Dv] -> linear_1 [Dv, Dt] ('embed', 'mlp') -> GELU -> linear_2 [Dt, Dt]
                     -> [B, F*h*w, Dt] -> [B*F, h*w, Dt] -> [B*F, h'*w', Dt] -> [B, F*h'*w', Dt]
                     ; image_newline [Dt] ('embed',) -> [B, 1, Dt] -> y [B, M, Dt]

Parameter names follow HF: linear_1, linear_2 (multi_modal_projector), image_newline.
mmproj.convert.llava_video.llava_onevision_video_connector ports them.
"""

from typing import Any

import einops
import flax.linen as nn
import jax.numpy as jnp

from mmproj.layers import ACTIVATIONS
from mmproj.layers.token_grid import bilinear_resize, check_frames, require_2d
from mmproj.projectors.mlp import dense_stack, dense_stack_param_count
from mmproj.projectors.registry import check_choice, check_int, register


def pooled_grid(grid) -> tuple[int, int]:
  """(ceil(h/2), ceil(w/2)): LLaVA-OneVision's per-frame output grid."""
  return -(-int(grid[0]) // 2), -(-int(grid[1]) // 2)


@register('llava_onevision_video', modality='video')
class LlavaOnevisionVideoProjector(nn.Module):
  """Token-wise MLP, per-frame bilinear 2x downsampling, one newline token per video: [B, F*h*w, Dv] ->
  [B, F*ceil(h/2)*ceil(w/2) + 1, Dt]."""

  in_dim: int
  out_dim: int
  num_frames: int = 1             # F: frames of grid (h, w) in x
  newline: bool = True            # append the learned image_newline token after the frames (HF always does)
  depth: int = 2                  # MLP depth (LLaVA's projector: 2)
  act: str = 'gelu'               # HF projector_hidden_act
  use_bias: bool = True           # HF multimodal_projector_bias
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, grid=None, deterministic: bool = True):    # x [B, F*h*w, Dv]
    del deterministic  # no dropout
    what = 'llava_onevision_video projector'
    h, w = check_frames(x, grid, self.num_frames, what)
    if x.shape[-1] != self.in_dim:
      raise ValueError(f'{what} expects in_dim={self.in_dim}, got tokens of width {x.shape[-1]}')
    b = x.shape[0]
    x = dense_stack(x.astype(self.dtype), self.out_dim, self.depth, self.act, self.use_bias, self.dtype)  # [B, N, Dt]
    x = einops.rearrange(x, 'b (f n) d -> (b f) n d', f=self.num_frames)                      # [B*F, h*w, Dt]
    x = bilinear_resize(x, (h, w), pooled_grid((h, w)))                                        # [B*F, h'*w', Dt]
    x = einops.rearrange(x, '(b f) n d -> b (f n) d', b=b)                                    # [B, F*h'*w', Dt]
    if self.newline:
      newline = self.param('image_newline', nn.with_logical_partitioning(nn.initializers.normal(0.02), ('embed',)),
                           (self.out_dim,), jnp.float32)                                       # [Dt]
      newline = jnp.broadcast_to(newline.astype(self.dtype), (b, 1, self.out_dim))            # [B, 1, Dt]
      x = jnp.concatenate([x, newline], axis=1)                                                # [B, M, Dt]
    return x                                                                                   # [B, M, Dt]

  @nn.nowrap
  def check(self) -> None:
    check_int('num_frames', self.num_frames)
    check_int('depth', self.depth)
    check_choice('act', self.act, ACTIVATIONS)

  @nn.nowrap
  def num_output_tokens(self, grid) -> int:
    oh, ow = pooled_grid(require_2d(grid, 'llava_onevision_video projector'))
    return self.num_frames * oh * ow + int(self.newline)

  @nn.nowrap
  def param_count(self) -> int:
    return dense_stack_param_count(self.in_dim, self.out_dim, self.depth, self.use_bias) + self.newline * self.out_dim
