"""Grid operations on row-major encoder tokens, shared by the locality-keeping projectors (pixel_shuffle,
patch_merger, avg_pool), the audio connectors and the video connectors (llava_next_video,
llava_onevision_video, frame_concat).

Encoder tokens arrive as x [B, N, D] with N = h * w in row-major order (token r * w + c is patch (r, c)) for an
image grid (h, w), or N = T in time order for an audio grid (T,). `check_grid` / `require_2d` are for the
projectors whose math needs the 2-D layout (a 1-D grid is a ValueError saying so); `check_tokens` / `grid_tokens`
take either.

`space_to_depth` (pixel unshuffle / Qwen2-VL spatial merge): every s x s block of patches becomes one token whose
channels are the block's patches concatenated in (row offset i, column offset j, channel d) order:
    y[b, R * (w/s) + C, (i * s + j) * D + d] = x[b, (R*s + i) * w + (C*s + j), d]
This is the order of both transformers Idefics3Connector.pixel_shuffle and InternVLModel.pixel_shuffle, and of a
Qwen2-VL merge window flattened by PatchMerger (`windows_to_depth` for tokens already in window order).

`avg_pool_1d`: the same along time, x [B, T, D] -> [B, m, D] (torch AvgPool1d with kernel = stride when m divides T,
AdaptiveAvgPool1d bins otherwise).

`pool_frames`: torch AvgPool1d(s, stride=s) along time (the Whisper-style audio towers' final pool): the trailing
T % s frames, which fill no window, are dropped.

`avg_pool_2d`: mean over (h/oh) x (w/ow) blocks when the output grid divides the grid (torch AvgPool2d with
kernel = stride), otherwise torch AdaptiveAvgPool2d bins: along an axis of length n pooled to m, bin i covers
[floor(i n / m), ceil((i + 1) n / m)) (neighbouring bins overlap by at most one patch). Plain means of slices, no
matmul, so the result does not depend on the backend's matmul precision.

`bilinear_resize`: torch `interpolate(mode='bilinear', align_corners=False)` to a given size, without antialiasing
(jax.image.resize antialiases when it downsamples): along an axis of n resized to m, output i samples the source
coordinate max(0, (i + 1/2) n/m - 1/2) by linear interpolation between its two neighbours (the upper one clamped
to n - 1). Two weighted slices per axis, no matmul.

Video tokens (mmproj's convention) are F frames in time order, each row-major: x [B, F*h*w, D] with grid (h, w) of
one frame. `check_frames` checks that count against a projector's `num_frames`; `space_to_depth(..., frames=F)`
merges blocks inside each frame.

`norm_layer`: the optional per-token norm the projectors put before their MLP ('none' | 'layernorm' | 'rmsnorm').
"""

import math
from typing import Any

import einops
import jax.numpy as jnp
import numpy as np

from mmproj.layers.norms import LayerNorm, RMSNorm

NORMS = ('none', 'layernorm', 'rmsnorm')


def require_2d(grid, what: str) -> tuple[int, int]:
  """(h, w) of a 2-D grid; ValueError naming `what` for a 1-D (audio) grid (T,), None or anything else."""
  if grid is None or len(grid) != 2:
    kind = ' (a 1-D audio grid)' if grid is not None and len(grid) == 1 else ''
    raise ValueError(f'{what} needs a 2-D (h, w) grid of image patches, got grid={grid!r}{kind}')
  return int(grid[0]), int(grid[1])


def check_grid(x, grid, what: str) -> tuple[int, int]:
  """(h, w) after checking that x [B, N, D] holds N = h * w tokens; ValueError naming `what` otherwise (a 1-D
  grid included: see require_2d)."""
  h, w = require_2d(grid, what)
  if x.ndim != 3 or x.shape[1] != h * w:
    raise ValueError(f'{what}: tokens of shape {tuple(x.shape)} do not hold the grid {h}x{w} = {h * w} tokens')
  return h, w


def grid_tokens(grid, what: str) -> int:
  """Tokens a 1-D (T,) or 2-D (h, w) grid holds; ValueError naming `what` for any other grid."""
  if grid is None or len(grid) not in (1, 2) or not all(int(g) >= 1 for g in grid):
    raise ValueError(f'{what} needs grid=(T,) (audio) or (h, w) (image) of positive sizes, got grid={grid!r}')
  return math.prod(int(g) for g in grid)


def check_tokens(x, grid, what: str, frames: bool = False) -> int:
  """N after checking that x [B, N, D] holds the tokens of a 1-D (T,) or 2-D (h, w) grid (None: any N); with
  frames=True, of any whole number of such grids (a video's frames, in time order)."""
  if x.ndim != 3:
    raise ValueError(f'{what}: tokens must be [B, N, D], got shape {tuple(x.shape)}')
  n = x.shape[1]
  if grid is not None and frames and n % grid_tokens(grid, what):
    raise ValueError(f'{what}: x has {n} tokens (shape {tuple(x.shape)}), not a whole number of frames of grid '
                     f'{tuple(grid)}')
  if grid is not None and not frames and grid_tokens(grid, what) != n:
    raise ValueError(f'{what}: grid {tuple(grid)} has {grid_tokens(grid, what)} cells but x has {n} tokens '
                     f'(shape {tuple(x.shape)})')
  return n


def check_frames(x, grid, num_frames: int, what: str) -> tuple[int, int]:
  """(h, w) after checking that x [B, N, D] holds N = num_frames * h * w tokens (num_frames frames of grid (h, w));
  ValueError naming `what`, the grid and model.projector.num_frames otherwise."""
  h, w = require_2d(grid, what)
  if x.ndim != 3 or x.shape[1] != num_frames * h * w:
    n = x.shape[1] if x.ndim == 3 else None
    held = f'{n // (h * w)} frames' if n is not None and h * w and n % (h * w) == 0 else 'not a whole number of frames'
    raise ValueError(f'{what}: tokens of shape {tuple(x.shape)} hold {held} of grid {h}x{w}, but '
                     f'model.projector.num_frames={num_frames} (expected {num_frames * h * w} tokens)')
  return h, w


def check_divisible(grid, s: int, field: str, what: str) -> None:
  """ValueError naming `model.projector.{field}` and the grid unless s divides both h and w (and for a 1-D grid)."""
  h, w = require_2d(grid, what)
  if h % s or w % s:
    raise ValueError(f'{what}: the encoder grid {h}x{w} is not divisible by model.projector.{field}={s}')


def space_to_depth(x, grid: tuple[int, int], s: int, frames: int = 1):
  """x [B, F*h*w, D] (F frames, each row-major) -> [B, F*(h/s)*(w/s), s*s*D] (each frame's blocks row-major,
  channels (i, j, d)); blocks never straddle two frames."""
  h, w = grid
  return einops.rearrange(x, 'b (f R i C j) d -> b (f R C) (i j d)', f=frames, R=h // s, i=s, C=w // s, j=s)


def windows_to_depth(x, s: int):
  """x [B, N, D] already in merge-window order (each s*s window contiguous, windows row-major, patches in a window
  row-major — Qwen2-VL's patch order) -> [B, N/(s*s), s*s*D], the same result as space_to_depth on the grid."""
  return einops.rearrange(x, 'b (m k) d -> b m (k d)', k=s * s)


def _bins(n: int, m: int) -> list[tuple[int, int]]:
  """torch AdaptiveAvgPool bins of an axis of length n pooled to m: [floor(i n/m), ceil((i+1) n/m))."""
  return [((i * n) // m, -((-(i + 1) * n) // m)) for i in range(m)]


def avg_pool_1d(x, m: int):
  """x [B, T, D] (time order) -> [B, m, D]: means over T/m frames when m divides T, AdaptiveAvgPool1d bins
  otherwise; averages in float32, returns x's dtype."""
  t = x.shape[1]
  xf = x.astype(jnp.float32)                                                        # [B, T, D]
  if t % m == 0:  # AvgPool1d(kernel=stride=T/m)
    y = einops.reduce(xf, 'b (m k) d -> b m d', 'mean', m=m)                        # [B, m, D]
  else:
    y = jnp.stack([xf[:, a:b].mean(axis=1) for a, b in _bins(t, m)], axis=1)        # [B, m, D]
  return y.astype(x.dtype)


def pool_frames(x, stride: int):
  """x [B, T, D] -> [B, T // stride, D]: means of consecutive runs of `stride` tokens (the last T % stride dropped);
  stride 1 returns x."""
  if stride == 1:
    return x
  m = x.shape[1] // stride
  return avg_pool_1d(x[:, :m * stride], m)                                          # [B, T // stride, D]


def avg_pool_2d(x, grid: tuple[int, int], out_grid: tuple[int, int]):
  """x [B, h*w, D] -> [B, oh*ow, D] (row-major); averages in float32, returns x's dtype."""
  (h, w), (oh, ow) = grid, out_grid
  xf = einops.rearrange(x.astype(jnp.float32), 'b (h w) d -> b h w d', h=h, w=w)    # [B, h, w, D]
  if h % oh == 0 and w % ow == 0:  # AvgPool2d(kernel=stride=(h/oh, w/ow)): one reshape, no overlap
    y = einops.reduce(xf, 'b (p kh) (q kw) d -> b p q d', 'mean', p=oh, q=ow)        # [B, oh, ow, D]
  else:  # adaptive bins; a rectangle's mean is the mean over its rows of the means over its columns
    y = jnp.stack([xf[:, a:b].mean(axis=1) for a, b in _bins(h, oh)], axis=1)       # [B, oh, w, D]
    y = jnp.stack([y[:, :, a:b].mean(axis=2) for a, b in _bins(w, ow)], axis=2)     # [B, oh, ow, D]
  return einops.rearrange(y, 'b p q d -> b (p q) d').astype(x.dtype)               # [B, oh*ow, D]


def _linear_taps(n: int, m: int):
  """torch's bilinear (align_corners=False) taps along an axis of n resized to m: (lower index [m], upper index [m],
  weight of the upper [m]) as numpy, computed in float32 from the ratio n/m as torch does for a float32 input
  given an explicit size."""
  scale = np.float32(n) / np.float32(m)
  src = np.maximum(scale * (np.arange(m, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5), np.float32(0))
  lower = np.minimum(np.floor(src).astype(np.int64), n - 1)
  upper = np.minimum(lower + 1, n - 1)
  return lower, upper, (src - lower.astype(np.float32)).astype(np.float32)


def bilinear_resize(x, grid: tuple[int, int], out_grid: tuple[int, int]):
  """x [B, h*w, D] (row-major) -> [B, oh*ow, D], torch interpolate(mode='bilinear', align_corners=False, no
  antialias) per channel; computed in float32, returns x's dtype."""
  (h, w), (oh, ow) = grid, out_grid
  xf = einops.rearrange(x.astype(jnp.float32), 'b (h w) d -> b h w d', h=h, w=w)    # [B, h, w, D]
  lo, hi, lam = _linear_taps(h, oh)
  lam = jnp.asarray(lam)[None, :, None, None]
  y = xf[:, lo] * (1 - lam) + xf[:, hi] * lam                                        # [B, oh, w, D]
  lo, hi, lam = _linear_taps(w, ow)
  lam = jnp.asarray(lam)[None, None, :, None]
  y = y[:, :, lo] * (1 - lam) + y[:, :, hi] * lam                                    # [B, oh, ow, D]
  return einops.rearrange(y, 'b p q d -> b (p q) d').astype(x.dtype)               # [B, oh*ow, D]


def norm_layer(kind: str, eps: float, dtype: Any, name: str = 'norm'):
  """'none' -> None, 'layernorm' -> LayerNorm (scale + bias), 'rmsnorm' -> RMSNorm (scale), eps as given."""
  if kind == 'none':
    return None
  if kind == 'layernorm':
    return LayerNorm(eps=eps, dtype=dtype, name=name)
  if kind == 'rmsnorm':
    return RMSNorm(eps=eps, dtype=dtype, name=name)
  raise ValueError(f'unknown norm {kind!r}; known: {list(NORMS)}')


def norm_params(kind: str, width: int) -> int:
  """Parameter count of norm_layer(kind) on tokens of `width`."""
  return {'none': 0, 'layernorm': 2 * width, 'rmsnorm': width}[kind]
