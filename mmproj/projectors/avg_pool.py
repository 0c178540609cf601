"""Average-pooling projector — DeCo (Yao et al. 2024, "DeCo: Decoupling Token Compression from Semantic
Abstraction in Multimodal Large Language Models", arXiv:2405.20985) and Gemma 3's pooling projector (Gemma Team
2025, "Gemma 3 Technical Report", arXiv:2503.19786).

DeCo's point: compress tokens with a parameter-free 2-D average pool at the patch level and leave the semantic
abstraction to the LLM, so the projector only maps widths:

    x [B, h*w, Dv] ──view as grid h x w──> ──2-D average pool to (oh, ow)──> [B, oh*ow, Dv] ──norm?──> ──MLP──> y

  DeCo (pool + LLaVA-1.5's mlp2x_gelu):    norm='none',    depth=2, use_bias=True  (the defaults)
  Gemma 3 (Gemma3MultiModalProjector):     norm='rmsnorm', depth=1, use_bias=False, norm_eps = vision
                                           layer_norm_eps; AvgPool2d(k) -> Gemma3RMSNorm -> x @ W (no bias).
                                           Gemma3RMSNorm scales by (1 + weight): its weight w is our scale 1 + w.

Pooling: when (oh, ow) divides the grid it is torch AvgPool2d with kernel = stride = (h/oh, w/ow). Otherwise
`adaptive=True` selects torch AdaptiveAvgPool2d bins (DeCo's pooling: along an axis of n patches pooled to m
tokens, token i averages patches floor(i n/m) .. ceil((i+1) n/m) - 1); with adaptive=False an indivisible grid is
a ValueError naming model.projector.output_grid and the grid. Output tokens are row-major over (oh, ow).

Audio (grid=(T,), tokens in time order): the pool runs along time to output_grid = m (an int, or a 1-tuple (m,)):
means over T/m consecutive frames (AvgPool1d, kernel = stride) when m divides T, AdaptiveAvgPool1d bins with
adaptive=True otherwise. An int output_grid is (m, m) for an image grid and m for an audio grid; a pair needs an
image grid, a 1-tuple an audio grid.

  tokens in -> out:  N = h*w -> M = oh * ow; audio N = T -> M = m  (output_grid; independent of the encoder grid)
  params:            norm: 2*in_dim ('layernorm') | in_dim ('rmsnorm') | 0 ('none')
                     + in_dim*out_dim + b*out_dim + (depth - 1) * (out_dim*out_dim + b*out_dim),  b = use_bias
  spatial locality:  kept — output token (p, q) averages only its pooling window (a contiguous rectangle of
                     patches; for audio a contiguous run of frames, so temporal order is kept); the norm and MLP
                     act on one token at a time
  shapes:            x [B, h*w, Dv] -> [B, h, w, Dv] -> pool [B, oh, ow, Dv] -> [B, M, Dv] ('norm': [Dv])
                     -> MLP linear_1 [Dv, Dt] ('embed', 'mlp'), linear_k [Dt, Dt] -> y [B, M, Dt]
                     audio: x [B, T, Dv] -> pool [B, m, Dv] -> norm, MLP as above -> y [B, m, Dt]
"""

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mmproj.layers.token_grid import NORMS, avg_pool_1d, avg_pool_2d, check_tokens, grid_tokens, norm_layer, norm_params
from mmproj.projectors.registry import check_choice, register
from mmproj.projectors.mlp import MLPProjector


def _output_grid(value) -> tuple[int, ...]:
  """output_grid as given: an int n -> (n,); a pair (oh, ow) or a 1-tuple (m,) of ints >= 1 -> tuple; ValueError
  naming model.projector.output_grid otherwise."""
  grid = (value,) if isinstance(value, int) else tuple(value) if isinstance(value, (tuple, list)) else ()
  if len(grid) not in (1, 2) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in grid):
    raise ValueError(f'model.projector.output_grid must be an int >= 1, a pair (oh, ow) of them (image grid) or a '
                     f'1-tuple (m,) (audio grid), got {value!r}')
  return grid


def _out_grid(value, grid) -> tuple[int, ...]:
  """output_grid for the encoder grid's rank: an int n -> (n, n) for an image grid (h, w), (n,) for an audio grid
  (T,); ValueError naming model.projector.output_grid when its rank does not match the grid's."""
  out = _output_grid(value)
  if isinstance(value, int):
    out = out * len(grid)
  if len(out) != len(grid):
    kind = 'an image grid (h, w)' if len(out) == 2 else 'an audio grid (T,)'
    raise ValueError(f'avg_pool projector: model.projector.output_grid={value!r} is for {kind}, but the encoder '
                     f'grid is {tuple(grid)}; give an int or a {len(grid)}-tuple')
  return out


def _check_pool(grid, out_grid, adaptive: bool) -> None:
  shown = lambda g: 'x'.join(map(str, g))
  what = f'avg_pool projector (output_grid={shown(out_grid)})'
  if any(o > g for o, g in zip(out_grid, grid)):
    raise ValueError(f'{what}: model.projector.output_grid is larger than the encoder grid {shown(grid)} '
                     '(pooling cannot upsample)')
  if not adaptive and any(g % o for o, g in zip(out_grid, grid)):
    raise ValueError(f'{what}: the encoder grid {shown(grid)} is not divisible by model.projector.output_grid; '
                     f'set model.projector.adaptive=True for AdaptiveAvgPool{len(grid)}d bins')


@register('avg_pool')
class AvgPoolProjector(nn.Module):
  """Average pool to output_grid (2-D, or along time for audio), optional norm, depth-N MLP:
  [B, h*w, Dv] -> [B, oh*ow, Dt] or [B, T, Dv] -> [B, m, Dt]."""

  in_dim: int
  out_dim: int
  output_grid: Any = None   # (oh, ow), (m,) for audio, or an int (square / m); required (None: check() names it)
  adaptive: bool = False    # AdaptiveAvgPool{1,2}d bins when output_grid does not divide the grid
  norm: str = 'none'        # on the pooled tokens (width Dv): 'none' (DeCo) | 'rmsnorm' (Gemma 3) | 'layernorm'
  norm_eps: float = 1e-6
  depth: int = 2            # MLP depth: 2 = DeCo's mlp2x_gelu, 1 = Gemma 3's single matrix
  act: str = 'gelu'         # between MLP layers
  use_bias: bool = True     # Gemma 3's mm_input_projection_weight has no bias
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, grid=None, deterministic: bool = True):    # x [B, h*w, Dv] or [B, T, Dv]
    del deterministic  # no dropout
    if grid is None:
      raise ValueError('avg_pool projector needs grid=(h, w) (image) or grid=(T,) (audio) of the encoder tokens')
    check_tokens(x, grid, 'avg_pool projector')
    grid = tuple(int(g) for g in grid)
    out_grid = _out_grid(self.output_grid, grid)
    _check_pool(grid, out_grid, self.adaptive)
    if x.shape[-1] != self.in_dim:
      raise ValueError(f'avg_pool projector expects in_dim={self.in_dim}, got tokens of width {x.shape[-1]}')
    if len(grid) == 1:
      x = avg_pool_1d(x, out_grid[0])                                   # [B, m, Dv]
    else:
      x = avg_pool_2d(x, grid, out_grid)                                # [B, M, Dv]
    norm = norm_layer(self.norm, self.norm_eps, self.dtype)
    if norm is not None:
      x = norm(x)                                                       # [B, M, Dv]
    return self._head(name='mlp')(x)                                    # [B, M, Dt]

  @nn.nowrap
  def _head(self, **kwargs) -> MLPProjector:
    """The MLP on the pooled tokens; kwargs (name, parent) go to it."""
    return MLPProjector(in_dim=self.in_dim, out_dim=self.out_dim, depth=self.depth, act=self.act,
                        use_bias=self.use_bias, dtype=self.dtype, **kwargs)

  @nn.nowrap
  def check(self) -> None:
    if self.output_grid is None:
      raise ValueError('model.projector.output_grid is required for the avg_pool projector: (oh, ow) or an int')
    _output_grid(self.output_grid)
    check_choice('norm', self.norm, NORMS)
    self._head(parent=None).check()   # the MLP head's depth and act

  @nn.nowrap
  def num_output_tokens(self, grid) -> int:
    grid_tokens(grid, 'avg_pool projector')
    grid = tuple(int(g) for g in grid)
    out_grid = _out_grid(self.output_grid, grid)
    _check_pool(grid, out_grid, self.adaptive)
    return math.prod(out_grid)

  @nn.nowrap
  def param_count(self) -> int:
    return norm_params(self.norm, self.in_dim) + self._head(parent=None).param_count()
