"""Position-aware vision-language adapter — Qwen-VL (Bai et al. 2023, "Qwen-VL: A Versatile Vision-Language Model
for Understanding, Localization, Text Reading, and Beyond", arXiv:2308.12966); the `Resampler` + `ln_post` +
`proj` of Qwen-VL's visual.py.

One cross-attention layer: Q learned queries attend to the visual tokens. Fixed 2-D sin-cos position embeddings
(of the query grid G x G, G = sqrt(Q)) are added to the queries and, resized to the encoder grid, to the keys
(not to the values), so the compressed tokens know where in the image they look.

  x [B, N, Dv] ──kv_proj (Linear Dv -> W, no bias; identity when Dv == W)──> ln_kv ──> kv [B, N, W]
  queries [Q, W] ──ln_q──> q [Q, W]
  y = MHA(query = q + pos(G x G),  key = kv + resize(pos, (h, w)),  value = kv)       # [B, Q, W]
  y = proj(ln_post(y))       (proj: Linear W -> Dt, no bias)                           # [B, Q, Dt]

MHA is torch nn.MultiheadAttention: q/k/v/out projections with biases, num_heads heads of W / num_heads.
Key position embeddings: the G x G table is resized to the encoder grid (h, w) (rectangular grids too) with
`jax.image.resize(method='bicubic', antialias=False)` — Keys cubic (a = -0.5) at half-pixel centres; Qwen-VL uses
torch bicubic (a = -0.75), so the two agree exactly only when (h, w) == (G, G), where no resize happens. The table is
a constant (Qwen-VL's frozen pos_embed), not a parameter. Its layout follows MAE / Qwen-VL
`get_2d_sincos_pos_embed`: for the token at row i, column j of a grid,
  pos[i*cols + j] = [sin(j*w_k), cos(j*w_k), sin(i*w_k), cos(i*w_k)],  w_k = 10000^(-k / (W/4)), k < W/4
(the first half encodes the column, the second the row), so W must be divisible by 4.

  tokens in -> out:  N = h*w -> M = num_queries (a perfect square; Qwen-VL: 256)
  params:            Q*W + [Dv != W]*Dv*W + 4*W*W + 4*W (MHA) + 6*W (ln_q, ln_kv, ln_post) + W*Dt,
                     W = width (default Dt, as in Qwen-VL where the resampler runs at the LM width)
  spatial locality:  not kept — every query attends to every visual token; the 2-D positions bias query
                     (i, j) toward its image region but do not restrict it
  shapes:            x [B, N, Dv] -> kv [B, N, W]; queries [Q, W] ('pos', 'embed'); pos_q [Q, W], pos_k [N, W];
                     attention q [B, Q, H, W/H], k/v [B, N, H, W/H] -> y [B, Q, Dt]
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmproj.layers import LayerNorm, dense
from mmproj.layers.cross_attention import CrossAttention
from mmproj.layers.token_grid import require_2d
from mmproj.projectors.registry import check_int, check_positive, register


def sincos_2d(dim: int, rows: int, cols: int) -> np.ndarray:
  """Fixed 2-D sin-cos position table [rows*cols, dim] in row-major order (layout in the module docstring)."""
  if dim % 4:
    raise ValueError(f'2-D sin-cos position embeddings need a width divisible by 4, got {dim}')
  omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim // 4))       # [W/4]
  row, col = np.meshgrid(np.arange(rows, dtype=np.float64), np.arange(cols, dtype=np.float64), indexing='ij')

  def one_axis(pos):                                                                 # [R, C] -> [R*C, W/2]
    angles = pos.reshape(-1, 1) * omega[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

  return np.concatenate([one_axis(col), one_axis(row)], axis=1).astype(np.float32)  # [R*C, W]


@register('qwen_vl_resampler')
class QwenVLResampler(nn.Module):
  """Q learned queries with 2-D sin-cos positions cross-attend once to the visual tokens: [B, N, Dv] -> [B, Q, Dt]."""

  in_dim: int
  out_dim: int
  num_queries: int = 256       # a perfect square: the queries sit on a sqrt(Q) x sqrt(Q) grid
  num_heads: int = 8           # Qwen-VL: W // 128
  width: int | None = None     # resampler width W; None = out_dim
  norm_eps: float = 1e-6       # Qwen-VL's LayerNorm eps
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, grid=None, deterministic: bool = True):    # x [B, N, Dv]
    del deterministic  # no dropout
    b, n, dv = x.shape
    if dv != self.in_dim:
      raise ValueError(f'qwen_vl_resampler expects in_dim={self.in_dim}, got tokens of width {dv}')
    h, w = self._grid(n, grid)
    width = self.width or self.out_dim
    self._check_width(width, self.num_heads, self.width is None)
    g = math.isqrt(self.num_queries)

    kv = x.astype(self.dtype)                                                            # [B, N, Dv]
    if dv != width:
      kv = dense(width, ('embed', 'mlp'), use_bias=False, dtype=self.dtype, name='kv_proj')(kv)  # [B, N, W]
    kv = LayerNorm(self.norm_eps, self.dtype, name='ln_kv')(kv)                          # [B, N, W]

    queries = self.param('queries', nn.with_logical_partitioning(
        nn.initializers.truncated_normal(0.02), ('pos', 'embed')), (self.num_queries, width), jnp.float32)
    q = LayerNorm(self.norm_eps, self.dtype, name='ln_q')(queries.astype(self.dtype))    # [Q, W]

    table = sincos_2d(width, g, g)                                                       # [Q, W]
    pos_k = table if (h, w) == (g, g) else jax.image.resize(
        table.reshape(g, g, width), (h, w, width), method='bicubic', antialias=False).reshape(h * w, width)
    q = jnp.broadcast_to((q + jnp.asarray(table, self.dtype))[None], (b, self.num_queries, width))  # [B, Q, W]
    k = kv + jnp.asarray(pos_k, self.dtype)[None]                                        # [B, N, W]
    y = CrossAttention(self.num_heads, width // self.num_heads, use_bias=True, dtype=self.dtype,
                       name='attn')(q, k, kv)                                            # [B, Q, W]
    y = LayerNorm(self.norm_eps, self.dtype, name='ln_post')(y)                          # [B, Q, W]
    return dense(self.out_dim, ('embed', 'mlp'), use_bias=False, dtype=self.dtype, name='proj')(y)  # [B, Q, Dt]

  @staticmethod
  def _grid(n: int, grid) -> tuple[int, int]:
    """The encoder grid (h, w); without one, a square sqrt(N) grid as in Qwen-VL."""
    if grid is None:
      side = math.isqrt(n)
      if side * side != n:
        raise ValueError(f'qwen_vl_resampler needs grid=(h, w) for {n} tokens (not a square number)')
      return side, side
    h, w = require_2d(grid, 'qwen_vl_resampler projector')   # the 2-D sin-cos key positions are resized to (h, w)
    if h * w != n:
      raise ValueError(f'qwen_vl_resampler: grid {tuple(grid)} does not hold {n} tokens')
    return h, w

  @staticmethod
  def _check_width(width, heads, from_out_dim: bool) -> None:
    field = f'model.projector.width={width}' + (' (default: the LM width out_dim)' if from_out_dim else '')
    if width % heads:
      raise ValueError(f'{field} is not divisible by model.projector.num_heads={heads}')
    if width % 4:
      raise ValueError(f'{field} must be divisible by 4 for the 2-D sin-cos position embeddings')

  @nn.nowrap
  def check(self) -> None:
    q = self.num_queries
    if not isinstance(q, int) or q < 1 or math.isqrt(q) ** 2 != q:
      raise ValueError(f'model.projector.num_queries must be a perfect square >= 1, got {q!r}')
    heads, width = check_int('num_heads', self.num_heads), check_int('width', self.width, optional=True)
    if width is not None:
      self._check_width(width, heads, False)
    check_positive('norm_eps', self.norm_eps)

  @nn.nowrap
  def num_output_tokens(self, grid) -> int:
    require_2d(grid, 'qwen_vl_resampler projector')
    return self.num_queries

  @nn.nowrap
  def param_count(self) -> int:
    w, heads = self.width or self.out_dim, self.num_heads
    kv_proj = self.in_dim * w if self.in_dim != w else 0
    mha = CrossAttention.param_count(w, w, w, heads, w // heads, use_bias=True)
    return self.num_queries * w + kv_proj + mha + 3 * 2 * w + w * self.out_dim
