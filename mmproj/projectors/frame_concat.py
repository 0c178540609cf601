"""Frame-wise token concatenation with time markers: a per-frame connector, then the frames' tokens laid out in
time order, each frame's tokens preceded by one learned marker token for its frame index.

Published models write a time marker as text before each frame's visual tokens: Qwen3-VL (Qwen Team 2025, the
Qwen3-VL technical report; transformers Qwen3VLProcessor) puts "<t seconds>" before every temporal group's tokens
in place of Qwen2.5-VL's time-aligned rotary positions, and InternVL's video chat (Chen et al. 2024, "Expanding
Performance Boundaries of Open-Source Multimodal Models with Model, Data, and Test-Time Scaling",
arXiv:2412.05271, and its predecessors) prompts with "Frame{i}: <image>" per frame. Video-LLaMA (Zhang et al.
2023, arXiv:2306.02858) instead adds learned frame position embeddings to the frame features, and LLaVA-Video
(Zhang et al. 2024, arXiv:2410.02713) states the duration and sampled frame times once in the prompt. What we
simplify: the marker is one learned embedding per frame index (Video-LLaMA's table, inserted as a token as the
text markers are) instead of tokenised text of a timestamp, so it tells order, not seconds (no fps), and F is
bounded by max_frames.

    x [B, F*h*w, Dv] ──per frame: frame_projector──> [B, F, m, Dt] ──prepend time_markers[f] to frame f──>
        [B, F, 1 + m, Dt] ──> y [B, F*(m + 1), Dt]

  frame_projector: any registered token map applied to each frame on its own (frames folded into the batch), a
                   projector config dict (default {'name': 'mlp'}, LLaVA-1.5's mlp2x_gelu; e.g. {'name':
                   'avg_pool', 'output_grid': 3} to compress each frame). It may not be gated_xattn (it feeds the
                   LM another way) or frame_concat, and sees one frame (its own num_frames, if any, must be 1).
The number of frames is the field `num_frames` (token counts are known before the call), checked against the
tokens at call time (ValueError naming model.projector.num_frames); num_frames <= max_frames.

  tokens in -> out:  N = F*h*w -> M = F * (m + 1),  m = frame_projector's output tokens for one frame (mlp: h*w)
  params:            frame_projector's params + max_frames * Dt
  spatial locality:  the frame_projector's (the mlp keeps it); temporal locality kept — frame f's tokens depend
                     only on frame f, and sit right after marker f
  shapes:            x [B, F*h*w, Dv] -> [B*F, h*w, Dv] -> frame_projector -> [B*F, m, Dt] -> [B, F, m, Dt];
                     time_markers [max_frames, Dt] ('pos', 'embed') -> [B, F, 1, Dt] -> [B, F, 1+m, Dt]
                     -> y [B, M, Dt]
"""

from collections.abc import Mapping
from typing import Any

import einops
import flax.linen as nn
import jax.numpy as jnp

from mmproj.layers.token_grid import check_frames, require_2d
from mmproj.projectors.registry import check_int, instantiate, register

DEFAULT_FRAME_PROJECTOR = {'name': 'mlp'}
# Not per-frame token maps: the LM cross-attends to gated_xattn's tokens; frame_concat would nest itself.
EXCLUDED = ('gated_xattn', 'frame_concat')


@register('frame_concat', modality='video')
class FrameConcatProjector(nn.Module):
  """Per-frame connector, a learned time-marker token before each frame: [B, F*h*w, Dv] -> [B, F*(m+1), Dt]."""

  in_dim: int
  out_dim: int
  num_frames: int = 1               # F: frames of grid (h, w) in x
  max_frames: int = 8               # rows of the time-marker table (frame index 0 .. max_frames - 1)
  frame_projector: Any = None       # projector config for one frame; None = {'name': 'mlp'}
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, grid=None, deterministic: bool = True):    # x [B, F*h*w, Dv]
    what = 'frame_concat projector'
    h, w = check_frames(x, grid, self.num_frames, what)
    self._check_frames()
    b, f = x.shape[0], self.num_frames
    frames = einops.rearrange(x, 'b (f n) d -> (b f) n d', f=f)                       # [B*F, h*w, Dv]
    y = self._frame_projector(self.in_dim, self.out_dim, self.dtype, name='frame_projector')(
        frames, grid=(h, w), deterministic=deterministic)                              # [B*F, m, Dt]
    y = einops.rearrange(y, '(b f) m d -> b f m d', b=b)                              # [B, F, m, Dt]
    # Small init, as a position table: an untrained marker should not swamp the visual tokens next to it.
    table = self.param('time_markers', nn.with_logical_partitioning(nn.initializers.normal(0.02), ('pos', 'embed')),
                       (self.max_frames, self.out_dim), jnp.float32)                  # [F_max, Dt]
    markers = jnp.broadcast_to(table[:f].astype(y.dtype)[None, :, None], (b, f, 1, self.out_dim))  # [B, F, 1, Dt]
    y = jnp.concatenate([markers, y], axis=2)                                          # [B, F, 1+m, Dt]
    return einops.rearrange(y, 'b f m d -> b (f m) d')                                # [B, M, Dt]

  @nn.nowrap
  def _frame_projector_cfg(self) -> dict:
    cfg = DEFAULT_FRAME_PROJECTOR if self.frame_projector is None else self.frame_projector
    if not (isinstance(cfg, Mapping) or hasattr(cfg, 'to_dict')) or 'name' not in cfg:
      raise ValueError(f'model.projector.frame_projector must be a projector config with a name, got {cfg!r}')
    cfg = dict(cfg)
    if cfg['name'] in EXCLUDED:
      raise ValueError(f'model.projector.frame_projector.name={cfg["name"]!r} is not a per-frame token map '
                       f'(not allowed: {list(EXCLUDED)})')
    return cfg

  @nn.nowrap
  def _frame_projector(self, in_dim, out_dim, dtype=jnp.float32, **module_kwargs):
    """The per-frame projector module (kwargs: name, parent); its ValueErrors name model.projector.frame_projector."""
    cfg = self._frame_projector_cfg()
    try:
      return instantiate(cfg, in_dim, out_dim, dtype, **module_kwargs)
    except ValueError as err:
      raise ValueError(f'model.projector.frame_projector: {err}') from None

  @nn.nowrap
  def _check_frames(self) -> None:
    check_int('num_frames', self.num_frames)
    check_int('max_frames', self.max_frames)
    if self.num_frames > self.max_frames:
      raise ValueError(f'frame_concat projector: model.projector.num_frames={self.num_frames} exceeds '
                       f'model.projector.max_frames={self.max_frames} (the time-marker table)')

  @nn.nowrap
  def check(self) -> None:
    self._check_frames()
    inner = self._frame_projector(self.in_dim, self.out_dim, parent=None)
    try:
      inner.check()
    except ValueError as err:
      raise ValueError(f'model.projector.frame_projector: {err}') from None
    if getattr(inner, 'num_frames', 1) != 1:
      raise ValueError('model.projector.frame_projector.num_frames must be 1 (it sees one frame at a time), got '
                       f'{inner.num_frames}')

  @nn.nowrap
  def num_output_tokens(self, grid) -> int:
    grid = require_2d(grid, 'frame_concat projector')
    inner = self._frame_projector(None, None, parent=None)
    return self.num_frames * (inner.num_output_tokens(grid) + 1)

  @nn.nowrap
  def param_count(self) -> int:
    return self._frame_projector(self.in_dim, self.out_dim, parent=None).param_count() + self.max_frames * self.out_dim
