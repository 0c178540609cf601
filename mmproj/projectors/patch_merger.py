"""Patch-merger projector — Qwen2-VL (Wang et al. 2024, "Qwen2-VL: Enhancing Vision-Language Model's Perception
of the World at Any Resolution", arXiv:2409.12191) and Qwen2.5-VL (Bai et al. 2025, "Qwen2.5-VL Technical
Report", arXiv:2502.13923).

Each patch is normalised on its own (context) width, then every m x m window of neighbouring patches
(m = spatial_merge_size) is concatenated and an MLP that keeps the merged width compresses it to the LM width:

    x [B, h*w, Dv] ──norm(Dv)──> ──merge m x m──> [B, M, Dv*m*m] ──Linear(Dv*m*m, Dv*m*m) GELU Linear(·, Dt)──> y

  Qwen2-VL  (PatchMerger):            norm='layernorm' (eps 1e-6)
  Qwen2.5-VL (Qwen2_5_VLPatchMerger): norm='rmsnorm'   (eps 1e-6)

Input order (`input_order`):
  'row_major' (default, the mmproj encoder interface): x [B, h*w, Dv] with token r*w + c = patch (r, c); the
              windows are gathered here (channel (i*m + j)*Dv + d = patch (R*m + i, C*m + j), as pixel_shuffle).
  'windowed': x [B, h*w, Dv] already in Qwen2-VL's vision-tower order — windows contiguous and row-major, the
              m*m patches of a window row-major inside it (Qwen2VLImageProcessor.patchify's (gh, gw, mh, mw)
              order; transformers.vision_utils.get_vision_position_ids gives each token's (row, col)). The
              reference's [seq, Dv] input for one image is x[None]; grid=(h, w) is still required for checking.
Either way the output tokens are the windows in row-major order over the (h/m, w/m) grid.

Video / temporal patches: x [B, F*h*w, Dv] holds F frames (with a temporal_patch_size > 1 ViT, F temporal patch
groups, Qwen2-VL's grid_t) of grid (h, w) in time order, each in the input order above (Qwen2-VL's video sequence
is its grid_t groups one after another, each in window order); windows never straddle two frames, and the output
is each frame's (h/m)*(w/m) merged tokens, frames in time order. `num_frames` = F is a field (token counts are
known before the call) and is checked against the tokens: N must be num_frames*h*w (ValueError naming
model.projector.num_frames).

  tokens in -> out:  N = F*h*w -> M = F * (h/m) * (w/m)     (F = num_frames, 1 for an image)
  params:            H = in_dim * m^2;  norm: 2*in_dim ('layernorm') | in_dim ('rmsnorm')
                     + (H*H + H) + (H*out_dim + out_dim)
  spatial locality:  kept — output token (R, C) depends only on its m x m window (rows R*m..R*m+m-1, columns
                     C*m..C*m+m-1): the norm is per patch, the MLP per merged token; temporal locality: kept
                     (each output token belongs to one frame / temporal group)
  shapes:            x [B, F*h*w, Dv] -> norm [B, F*h*w, Dv] ('norm': [Dv]) -> [B, M, H] -> linear_1 [H, H]
                     ('embed', 'mlp') -> [B, M, H] -> linear_2 [H, Dt] ('mlp', 'embed') -> y [B, M, Dt]
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mmproj.layers import ACTIVATIONS, dense, get_activation
from mmproj.layers.token_grid import (check_divisible, check_frames, norm_layer, norm_params, space_to_depth,
                                   windows_to_depth)
from mmproj.projectors.registry import check_choice, check_int, register

INPUT_ORDERS = ('row_major', 'windowed')


@register('patch_merger')
class PatchMergerProjector(nn.Module):
  """Per-patch norm, m x m merge, MLP(H, H, Dt): [B, F*h*w, Dv] -> [B, F*(h/m)*(w/m), Dt]."""

  in_dim: int
  out_dim: int
  spatial_merge_size: int = 2   # m: windows of m x m patches
  norm: str = 'layernorm'       # on each patch (width Dv): 'layernorm' (Qwen2-VL) | 'rmsnorm' (Qwen2.5-VL)
  norm_eps: float = 1e-6
  act: str = 'gelu'             # between the two linears (nn.GELU, exact erf)
  input_order: str = 'row_major'
  num_frames: int = 1           # F: frames (temporal patch groups) of grid (h, w) in x; 1 = an image
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, grid=None, deterministic: bool = True):    # x [B, F*h*w, Dv]
    del deterministic  # no dropout
    m = self.spatial_merge_size
    grid = check_frames(x, grid, self.num_frames, 'patch_merger projector')
    check_divisible(grid, m, 'spatial_merge_size', 'patch_merger projector')
    if x.shape[-1] != self.in_dim:
      raise ValueError(f'patch_merger projector expects in_dim={self.in_dim}, got tokens of width {x.shape[-1]}')
    x = norm_layer(self.norm, self.norm_eps, self.dtype)(x)            # [B, F*h*w, Dv]  (per patch: order-free)
    if self.input_order == 'windowed':
      x = windows_to_depth(x, m)                                        # [B, M, H]  (windows inside each frame)
    else:
      x = space_to_depth(x, grid, m, self.num_frames)                   # [B, M, H]
    hidden = self.in_dim * m * m
    x = dense(hidden, ('embed', 'mlp'), use_bias=True, dtype=self.dtype, name='linear_1')(x)      # [B, M, H]
    x = get_activation(self.act)(x)                                                                # [B, M, H]
    return dense(self.out_dim, ('mlp', 'embed'), use_bias=True, dtype=self.dtype, name='linear_2')(x)  # [B, M, Dt]

  @nn.nowrap
  def check(self) -> None:
    check_int('spatial_merge_size', self.spatial_merge_size)
    check_choice('norm', self.norm, ('layernorm', 'rmsnorm'))
    check_choice('act', self.act, ACTIVATIONS)
    check_choice('input_order', self.input_order, INPUT_ORDERS)
    check_int('num_frames', self.num_frames)

  @nn.nowrap
  def num_output_tokens(self, grid) -> int:
    m = self.spatial_merge_size
    check_divisible(grid, m, 'spatial_merge_size', 'patch_merger projector')
    return self.num_frames * (grid[0] // m) * (grid[1] // m)

  @nn.nowrap
  def param_count(self) -> int:
    hidden = self.in_dim * self.spatial_merge_size ** 2
    norm = norm_params(self.norm, self.in_dim)
    return norm + (hidden * hidden + hidden) + (hidden * self.out_dim + self.out_dim)
