"""TokenPacker — Li et al. 2024, "TokenPacker: Efficient Visual Projector for Multimodal LLM", arXiv:2407.02392.

Coarse-to-fine: the grid is downsampled by `scale` s to get one coarse query per s x s region; each query then
attends only to the s*s fine tokens of its own region (region-to-point injection), and an MLP maps the packed
tokens to the LM width.

  x [B, h*w, Dv] ──avg-pool s x s──> x_c [B, M, Dv] ──q_proj (no bias)──> ln_q ──> q [B, M, W]
  f [B, h*w, Dk] (x, or the `kv_features` keyword) ──k_proj MLP──> ln_k ──> k [B, h*w, W]
                                                   ──v_proj MLP──> ln_v ──> v [B, h*w, W]
  per region r:  y_r = MHA(q_r [1, W],  k/v of region r [s*s, W])                     # [B, M, W]
  y = mlp(y)   (Linear W -> Dt, GELU, Linear Dt -> Dt)                                 # [B, M, Dt]

  k_proj, v_proj: Linear(Dk, W) GELU Linear(W, W), with biases (TokenPacker's k_proj_1 / v_proj_1);
  MHA: torch nn.MultiheadAttention (q/k/v/out projections with biases), num_heads heads of W / num_heads;
  LayerNorms eps 1e-6.

What is implemented vs the paper's code:
  - Coarse queries are the mean of each s x s region. TokenPacker's F.interpolate(mode='bilinear') to the coarse
    grid is exactly this mean for s = 2 (half-pixel sampling lands at the centre of each 2 x 2 block); for larger s
    the mean keeps every token of the region (bilinear would read only the central ones) and stays strictly local.
  - Multi-level features: TokenPacker feeds keys/values from several ViT layers concatenated on the channel axis
    (Dk = 4*1024). Here keys/values come from x by default; pass `kv_features=` [B, h*w, kv_dim] (e.g. features of
    several encoder layers concatenated, same grid) and set `kv_dim` to use them. Queries always come from x.
  - Rectangular grids are allowed (h and w both divisible by s); regions and outputs are row-major on the coarse
    grid (h/s) x (w/s).

  tokens in -> out:  N = h*w -> M = (h/s) * (w/s)
  params:            with W = width (default Dv, as TokenPacker whose attention runs at the ViT width) and
                     Dk = kv_dim (default Dv):
                       Dv*W (q_proj) + 2*(Dk*W + W + W*W + W) (k_proj, v_proj) + 6*W (3 LayerNorms)
                       + 4*W*W + 4*W (MHA) + W*Dt + Dt + Dt*Dt + Dt (mlp)
  spatial locality:  kept — output token (i, j) of the coarse grid depends only on the s x s fine tokens
                     rows [i*s, i*s + s), cols [j*s, j*s + s) (its query is their mean, its keys/values are them)
  shapes:            x [B, N, Dv] -> x_c [B, M, Dv]; k/v [B, N, W] -> regions [B*M, s*s, W]; q [B*M, 1, W]
                     -> y [B, M, W] -> [B, M, Dt]
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mmproj.layers import ACTIVATIONS, LayerNorm, dense
from mmproj.layers.cross_attention import CrossAttention
from mmproj.layers.token_grid import require_2d
from mmproj.projectors.registry import check_choice, check_int, check_positive, register
from mmproj.projectors.mlp import MLPProjector


def _coarse_grid(grid, scale: int) -> tuple[int, int]:
  """(h/s, w/s); ValueError naming the grid and model.projector.scale when s does not divide it (or it is 1-D)."""
  h, w = require_2d(grid, 'tokenpacker projector')   # s x s regions of the patch map
  if h % scale or w % scale:
    raise ValueError(f'tokenpacker: encoder grid {(h, w)} is not divisible by model.projector.scale={scale}')
  return h // scale, w // scale


def _regions(t, grid, scale: int):
  """[B, h*w, C] (row-major) -> [B, (h/s)*(w/s), s*s, C]: the fine tokens of each coarse cell, cells row-major."""
  (h, w), s = grid, scale
  b, _, c = t.shape
  t = t.reshape(b, h // s, s, w // s, s, c).transpose(0, 1, 3, 2, 4, 5)                 # [B, h/s, w/s, s, s, C]
  return t.reshape(b, (h // s) * (w // s), s * s, c)                                     # [B, M, s*s, C]


@register('tokenpacker')
class TokenPacker(nn.Module):
  """Coarse queries (s x s means) attend to their own s x s region, then an MLP: [B, h*w, Dv] -> [B, hw/s^2, Dt]."""

  in_dim: int
  out_dim: int
  scale: int = 2               # s: downsampling factor per side; M = N / s^2
  num_heads: int = 8
  width: int | None = None     # attention width W; None = in_dim
  kv_dim: int | None = None    # width of `kv_features` (multi-level); None = in_dim (keys/values from x)
  act: str = 'gelu'
  norm_eps: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, grid=None, deterministic: bool = True, kv_features=None):   # x [B, N, Dv]
    del deterministic  # no dropout
    b, n, dv = x.shape
    if dv != self.in_dim:
      raise ValueError(f'tokenpacker expects in_dim={self.in_dim}, got tokens of width {dv}')
    require_2d(grid, 'tokenpacker projector')
    if int(grid[0]) * int(grid[1]) != n:
      raise ValueError(f'tokenpacker needs grid=(h, w) with h*w = {n} tokens, got grid={grid}')
    hc, wc = _coarse_grid(grid, self.scale)
    grid = (int(grid[0]), int(grid[1]))
    width = self.width or self.in_dim
    if width % self.num_heads:
      raise ValueError(f'model.projector.width={width} (default: in_dim) is not divisible by '
                       f'model.projector.num_heads={self.num_heads}')
    kv_dim = self.kv_dim or self.in_dim
    feats = x if kv_features is None else kv_features
    if feats.shape != (b, n, kv_dim):
      raise ValueError(f'tokenpacker: kv_features must be [B, N, kv_dim] = {(b, n, kv_dim)} '
                       f'(model.projector.kv_dim), got {feats.shape}')
    x, feats = x.astype(self.dtype), feats.astype(self.dtype)

    x_c = _regions(x, grid, self.scale).mean(axis=2)                                     # [B, M, Dv]
    q = dense(width, ('embed', 'mlp'), use_bias=False, dtype=self.dtype, name='q_proj')(x_c)  # [B, M, W]
    q = LayerNorm(self.norm_eps, self.dtype, name='ln_q')(q)                             # [B, M, W]
    k = LayerNorm(self.norm_eps, self.dtype, name='ln_k')(self._kv_mlp(name='k_proj')(feats))  # [B, N, W]
    v = LayerNorm(self.norm_eps, self.dtype, name='ln_v')(self._kv_mlp(name='v_proj')(feats))  # [B, N, W]

    m = hc * wc
    q_r = q.reshape(b * m, 1, width)                                                     # [B*M, 1, W]
    k_r = _regions(k, grid, self.scale).reshape(b * m, self.scale ** 2, width)           # [B*M, s*s, W]
    v_r = _regions(v, grid, self.scale).reshape(b * m, self.scale ** 2, width)           # [B*M, s*s, W]
    y = CrossAttention(self.num_heads, width // self.num_heads, use_bias=True, dtype=self.dtype,
                       name='attn')(q_r, k_r, v_r)                                       # [B*M, 1, W]
    y = y.reshape(b, m, width)                                                           # [B, M, W]
    return self._out_mlp(name='mlp')(y)                                                  # [B, M, Dt]

  @nn.nowrap
  def _kv_mlp(self, **kwargs) -> MLPProjector:
    """k_proj / v_proj: Linear(Dk, W) act Linear(W, W); kwargs (name, parent) go to it."""
    return MLPProjector(self.kv_dim or self.in_dim, self.width or self.in_dim, depth=2, act=self.act,
                        dtype=self.dtype, **kwargs)

  @nn.nowrap
  def _out_mlp(self, **kwargs) -> MLPProjector:
    """mlp: Linear(W, Dt) act Linear(Dt, Dt); kwargs (name, parent) go to it."""
    return MLPProjector(self.width or self.in_dim, self.out_dim, depth=2, act=self.act, dtype=self.dtype, **kwargs)

  @nn.nowrap
  def check(self) -> None:
    check_int('scale', self.scale)
    check_int('kv_dim', self.kv_dim, optional=True)
    width, heads = check_int('width', self.width, optional=True), check_int('num_heads', self.num_heads)
    if width is not None and width % heads:
      raise ValueError(f'model.projector.width={width} is not divisible by model.projector.num_heads={heads}')
    check_choice('act', self.act, ACTIVATIONS)
    check_positive('norm_eps', self.norm_eps)

  @nn.nowrap
  def num_output_tokens(self, grid) -> int:
    hc, wc = _coarse_grid(grid, self.scale)
    return hc * wc

  @nn.nowrap
  def param_count(self) -> int:
    w = self.width or self.in_dim
    mha = CrossAttention.param_count(w, w, w, self.num_heads, w // self.num_heads, use_bias=True)
    kv_mlp, out_mlp = self._kv_mlp(parent=None).param_count(), self._out_mlp(parent=None).param_count()
    return self.in_dim * w + 2 * kv_mlp + 3 * 2 * w + mha + out_mlp
