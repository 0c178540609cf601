"""D-Abstractor — Honeybee (Cha, Kang, Mun, Roh, 2024, "Honeybee: Locality-enhanced Projector for Multimodal
LLM", CVPR 2024, arXiv:2312.06742).

M = m x m learnable queries read the visual map with deformable attention (Deformable DETR, one feature level):
each query samples a few points around a reference point on a regular grid. Honeybee's implementation is an
HF `DeformableDetrDecoder` whose queries start from the adaptive-average-pooled visual features ("v-pooled Q");
every layer here is exactly an HF `DeformableDetrDecoderLayer` (post-norm, torch LayerNorm eps 1e-5):

  x [B, N, Dv] --input_proj (Linear, only when Dv != D)--> [B, N, D] (+ pos_emb) --> value map V [B, h, w, D]
  queries:  t = adaptive_avg_pool(V) to m x m  [B, M, D]   ('pooled'; 'learned': t is a learned table)
            p = query position embedding        [M, D]      (learned)
            r = reference points (x, y)         [M, 2]      (learned; init: centres of the m x m pool cells,
                                                             ((j + .5) / m, (i + .5) / m), so query k starts at
                                                             its pool window; Honeybee's code spreads them from
                                                             corner pixel centre to corner pixel centre instead)
  depth x:  t = LN(t + SelfAttn(q=k=t+p, v=t))                           (all queries, H heads)
            t = LN(t + DeformAttn(t + p, r, V))                           (H heads x P points per query)
            t = LN(t + fc2(act(fc1(t))))                                  (act: relu, DETR's FFN)
  readout:  y = Linear (SiLU Linear) * (mlp_depth - 1) (t)   [B, M, Dt]

DeformAttn (mmproj.layers.deformable_attention): sampling offsets (in pixels) and softmax weights over the P
points are linear in the query; values are read by bilinear interpolation (align_corners=False, zeros outside;
mmproj.layers.feature_map.bilinear_sample == torch grid_sample). The readout is the C-Abstractor's SiLU MLP;
Honeybee's D-Abstractor code ends with a single Linear, i.e. mlp_depth=1. Honeybee's eos tokens are omitted.

  tokens in -> out:  N = h * w -> M = num_queries = m * m (any grid; odd sizes pool with torch AdaptiveAvgPool2d's
                     uneven windows, reference points are normalised so they fit every grid)
  params:            [Dv != D] (Dv*D + D) + [pos_emb_grid (h0, w0)] h0*w0*D
                     + M*D ('pooled') or 2*M*D ('learned')  + 2*M                (query table, reference points)
                     + depth * ( 4*(D*D + D) + 2*D                               (self-attention + LN)
                               + 3*H*P*(D + 1) + 2*(D*D + D) + 2*D               (deformable attention + LN)
                               + 2*D*F + F + D + 2*D )                           (FFN + LN)
                     + D*Dt + Dt + (mlp_depth - 1) * (Dt*Dt + Dt)                (readout)
                     with D = hidden_dim (default Dv), F = ffn_dim (default 4*D), H = num_heads, P = num_points
  spatial locality:  not kept in general. A query reads V only at the 2 x 2 bilinear neighbourhoods of its H*P
                     sampling points, but the offsets are unbounded learned functions of the query, the
                     self-attention mixes all queries, and 'pooled' queries start from their pool windows. What
                     holds exactly: with 'learned' queries, depth 1 and zero offsets, query k depends on x only at
                     the 2 x 2 neighbourhood of its reference point (checked in the tests).
  shapes:            x [B, N, Dv] -> V [B, h, w, D]; t [B, M, D]; offsets [B, M, H, P, 2]; weights [B, M, H, P]
                     -> y [B, M, Dt]

Param names: input_proj, pos_emb [h0*w0, D] ('pos', 'embed'), query_pos [M, D] or query_embed [M, 2D] ('pos',
'embed'; HF split order: position first, then target), reference_points [M, 2] ('pos', 'patch'), layers_{i}/
(self_attn q/k/v/o_proj, self_attn_layer_norm, encoder_attn (sampling_offsets, attention_weights, value_proj,
output_proj), encoder_attn_layer_norm, mlp (fc1, fc2), final_layer_norm), readout_1.. .
"""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mmproj.layers import CrossAttention, GeluMLP, LayerNorm, dense
from mmproj.layers.deformable_attention import DeformableAttention
from mmproj.layers.feature_map import map_to_tokens, square_side, tokens_to_map
from mmproj.layers.token_grid import avg_pool_2d, require_2d
from mmproj.projectors.registry import check_choice, check_int, register
from mmproj.projectors.c_abstractor import check_abstractor_fields, check_grid_matches_pos_emb, position_embedding
from mmproj.projectors.mlp import dense_stack, dense_stack_param_count

QUERY_INITS = ('pooled', 'learned')


def grid_reference_points(m: int) -> np.ndarray:
  """[m*m, 2] (x, y) centres of the m x m cells of the unit square, row-major (query k = row k // m)."""
  c = (np.arange(m, dtype=np.float32) + 0.5) / m
  ys, xs = np.meshgrid(c, c, indexing='ij')
  return np.stack([xs.reshape(-1), ys.reshape(-1)], -1)                   # [M, 2]


class DeformableDecoderLayer(nn.Module):
  """HF DeformableDetrDecoderLayer: post-norm self-attention, deformable cross-attention, FFN."""

  num_heads: int
  num_points: int
  ffn_dim: int
  act: str = 'relu'
  norm_eps: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, t, query_pos, reference_points, value_map):
    """t [B, M, D] targets, query_pos [M, D], reference_points [M, 2], value_map [B, h, w, D] -> [B, M, D]."""
    d = t.shape[-1]
    q = t + query_pos                                                     # [B, M, D]
    # DETR self-attention: the position embedding goes into queries and keys, not values.
    sa = CrossAttention(self.num_heads, d // self.num_heads, use_bias=True, dtype=self.dtype,
                        name='self_attn')(q, q, t)                        # [B, M, D]
    t = LayerNorm(self.norm_eps, self.dtype, 'self_attn_layer_norm')(t + sa)
    ca = DeformableAttention(self.num_heads, self.num_points, self.dtype, name='encoder_attn')(
        t + query_pos, reference_points[None], value_map)                 # [B, M, D]
    t = LayerNorm(self.norm_eps, self.dtype, 'encoder_attn_layer_norm')(t + ca)
    ff = GeluMLP(self.ffn_dim, act=self.act, dtype=self.dtype, name='mlp')(t)   # fc2(act(fc1(t))) [B, M, D]
    return LayerNorm(self.norm_eps, self.dtype, 'final_layer_norm')(t + ff)     # [B, M, D]


@register('d_abstractor')
class DAbstractor(nn.Module):
  """Honeybee D-Abstractor: pooled queries + deformable-attention decoder layers -> MLP readout."""

  in_dim: int
  out_dim: int
  num_queries: int = 144          # M = m * m output tokens
  depth: int = 3                  # decoder layers
  hidden_dim: int | None = None   # D, the decoder width (None = in_dim)
  num_heads: int = 8
  num_points: int = 4             # sampling points per head and query
  ffn_dim: int | None = None      # F (None = 4 * D)
  act: str = 'relu'               # FFN activation (DETR: relu)
  query_init: str = 'pooled'      # 'pooled': queries start from the pooled map (Honeybee); 'learned': a table
  mlp_depth: int = 2              # readout Linear layers (Honeybee's D-Abstractor: 1)
  pos_emb_grid: Sequence[int] | None = None   # (h0, w0): learned position embedding for that encoder grid
  norm_eps: float = 1e-5          # torch nn.LayerNorm
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, grid, deterministic: bool = True):          # x [B, N, Dv]
    del deterministic  # no dropout
    who = f'd_abstractor projector (num_queries={self.num_queries})'
    require_2d(grid, who)   # a convolutional / 2-D sampling map of the patches
    if x.shape[-1] != self.in_dim:
      raise ValueError(f'{who} expects in_dim={self.in_dim}, got tokens of width {x.shape[-1]}')
    m = square_side(self.num_queries, 'model.projector.num_queries')
    check_grid_matches_pos_emb(grid, self.pos_emb_grid, who)
    d = self.hidden_dim or self.in_dim
    if d % self.num_heads:
      raise ValueError(f'{who}: model.projector.num_heads={self.num_heads} must divide the decoder width {d} '
                       f'(model.projector.hidden_dim, default in_dim)')
    v = tokens_to_map(x.astype(self.dtype), grid, who)                    # [B, h, w, Dv]
    if self.in_dim != d:
      v = dense(d, ('embed', 'mlp'), use_bias=True, dtype=self.dtype, name='input_proj')(v)   # [B, h, w, D]
    if self.pos_emb_grid is not None:
      v = v + position_embedding(self, self.pos_emb_grid, d, self.dtype)  # [B, h, w, D]

    table = nn.with_logical_partitioning(nn.initializers.normal(0.02), ('pos', 'embed'))
    if self.query_init == 'pooled':
      t = avg_pool_2d(map_to_tokens(v), grid, (m, m))                     # [B, M, D]
      query_pos = self.param('query_pos', table, (self.num_queries, d), jnp.float32)   # [M, D]
    else:
      embed = self.param('query_embed', table, (self.num_queries, 2 * d), jnp.float32)  # [M, 2D]
      query_pos, target = embed[:, :d], embed[:, d:]                      # [M, D] each
      t = jnp.broadcast_to(target.astype(self.dtype), (x.shape[0], self.num_queries, d))  # [B, M, D]
    ref = self.param('reference_points', nn.with_logical_partitioning(
        lambda key, shape: jnp.asarray(grid_reference_points(m)), ('pos', 'patch')),
        (self.num_queries, 2))                                            # [M, 2]

    for i in range(self.depth):
      t = DeformableDecoderLayer(self.num_heads, self.num_points, self.ffn_dim or 4 * d, self.act,
                                 self.norm_eps, self.dtype, name=f'layers_{i}')(
                                     t, query_pos.astype(self.dtype), ref, v)   # [B, M, D]
    return dense_stack(t, self.out_dim, self.mlp_depth, 'silu', True, self.dtype, 'readout')   # [B, M, Dt]

  @nn.nowrap
  def check(self) -> None:
    check_abstractor_fields(self)
    for key in ('num_heads', 'num_points'):
      check_int(key, getattr(self, key))
    check_int('ffn_dim', self.ffn_dim, optional=True)
    check_choice('query_init', self.query_init, QUERY_INITS)
    if self.hidden_dim is not None and self.hidden_dim % self.num_heads:
      raise ValueError(f'model.projector.num_heads={self.num_heads} must divide '
                       f'model.projector.hidden_dim={self.hidden_dim}')

  @nn.nowrap
  def num_output_tokens(self, grid) -> int:
    require_2d(grid, 'd_abstractor projector')
    return self.num_queries

  @nn.nowrap
  def param_count(self) -> int:
    dv = self.in_dim
    d = self.hidden_dim or dv
    f = self.ffn_dim or 4 * d
    m, hp, pos = self.num_queries, self.num_heads * self.num_points, self.pos_emb_grid
    n = (dv * d + d if dv != d else 0) + (pos[0] * pos[1] * d if pos is not None else 0)
    n += m * d * (1 if self.query_init == 'pooled' else 2) + 2 * m
    layer = (4 * (d * d + d) + 2 * d) + (3 * hp * (d + 1) + 2 * (d * d + d) + 2 * d) + (2 * d * f + f + d + 2 * d)
    return n + self.depth * layer + dense_stack_param_count(d, self.out_dim, self.mlp_depth)
