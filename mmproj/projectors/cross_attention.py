"""Cross-attention projector — the generic learned-query attention pooler (the common core of Set Transformer's
PMA (Lee et al. 2019, arXiv:1810.00825), BLIP-2's Q-Former cross-attention and Perceiver-style resamplers): M
queries at the LM width attend to the visual tokens through multi-head (optionally grouped-query) attention, with an
optional feed-forward, in `depth` pre-norm blocks.

  x [B, N, Dv] ──context_norm──> c [B, N, Dv]          (one norm: the context is the same for every block)
  z = queries [Mq, Dt] (learned)  ++  text queries [B, Mt, Dt] (keyword `queries`, optional)     # [B, M, Dt]
  depth x:  z = z + o_proj(attn(q_proj(norm_q(z)), k_proj(c), v_proj(c)))                       # [B, M, Dt]
            z = z + fc2(act(fc1(norm_ff(z))))              (when ff_mult > 0)                   # [B, M, Dt]
  y = norm(z)                                                                                    # [B, M, Dt]

Text queries: pass `queries=` [B, Mt, Dt] (e.g. LM embeddings of the prompt, as an instruction-aware pooler) —
they are appended after the num_queries learned ones and the output has M = num_queries + Mt tokens; with
num_queries = 0 the projector is driven by text queries only (and `queries` is required). Optional `mask` [B, N]
(nonzero = real visual token) hides padded tokens. Attention has no biases (Llama-style); k/v read the context at
its own width Dv, so no input projection is needed.

  tokens in -> out:  N -> M = num_queries (+ Mt text queries when given); num_output_tokens = num_queries
  params:            with H = num_heads, Hkv = num_kv_heads (default H), Dh = head_dim (default Dt // H),
                     F = ff_mult * Dt:
                       num_queries*Dt + 2*Dv + 2*Dt
                       + depth * (2*Dt + Dt*H*Dh + 2*Dv*Hkv*Dh + H*Dh*Dt + [ff_mult > 0]*(2*Dt + 2*Dt*F + F + Dt))
  spatial locality:  not kept — every query attends to every visual token
  shapes:            x [B, N, Dv]; queries param [Mq, Dt] ('pos', 'embed'); q [B, M, H, Dh], k/v [B, N, Hkv, Dh]
                     -> y [B, M, Dt]
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mmproj.layers import ACTIVATIONS, GeluMLP, LayerNorm, padding_mask
from mmproj.layers.cross_attention import CrossAttention
from mmproj.projectors.registry import check_choice, check_int, check_positive, register


def check_num_kv_heads(kv_heads: int | None, heads: int) -> None:
  """model.projector.num_kv_heads: None (= num_heads) or an int >= 1 dividing num_heads (GQA)."""
  if kv_heads is not None and (not isinstance(kv_heads, int) or kv_heads < 1 or heads % kv_heads):
    raise ValueError(f'model.projector.num_kv_heads={kv_heads!r} must be an int >= 1 dividing num_heads={heads}')


@register('cross_attention')
class CrossAttentionProjector(nn.Module):
  """Learned (and/or text) queries attend to the visual tokens: [B, N, Dv] -> [B, M, Dt]."""

  in_dim: int
  out_dim: int
  num_queries: int = 64
  depth: int = 1
  num_heads: int = 8
  num_kv_heads: int | None = None     # None = num_heads; fewer = GQA
  head_dim: int | None = None         # None = out_dim // num_heads
  ff_mult: int = 4                    # FF hidden = ff_mult * Dt; 0 = no feed-forward
  act: str = 'gelu'
  norm_eps: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, grid=None, deterministic: bool = True, queries=None, mask=None):  # x [B, N, Dv]
    del grid, deterministic  # queries carry no grid positions; no dropout
    b, n, dv = x.shape
    if dv != self.in_dim:
      raise ValueError(f'cross_attention projector expects in_dim={self.in_dim}, got tokens of width {dv}')
    if self.head_dim is None and self.out_dim % self.num_heads:
      raise ValueError(f'model.projector.num_heads={self.num_heads} does not divide the LM width {self.out_dim}; '
                       'set model.projector.head_dim')
    head_dim = self.head_dim or self.out_dim // self.num_heads

    parts = []
    if self.num_queries:
      table = self.param('queries', nn.with_logical_partitioning(
          nn.initializers.normal(0.02), ('pos', 'embed')), (self.num_queries, self.out_dim), jnp.float32)
      parts.append(jnp.broadcast_to(table.astype(self.dtype)[None], (b, *table.shape)))  # [B, Mq, Dt]
    if queries is not None:
      if queries.ndim != 3 or queries.shape[0] != b or queries.shape[-1] != self.out_dim:
        raise ValueError(f'cross_attention: queries must be [B={b}, Mt, Dt={self.out_dim}], got {queries.shape}')
      parts.append(queries.astype(self.dtype))                                          # [B, Mt, Dt]
    if not parts:
      raise ValueError('cross_attention with model.projector.num_queries=0 needs text queries: pass queries=[B, M, Dt]')
    z = jnp.concatenate(parts, axis=1)                                                   # [B, M, Dt]
    m = z.shape[1]

    attn_mask = None
    if mask is not None:
      if mask.shape != (b, n):
        raise ValueError(f'cross_attention mask must be [B, N] = {(b, n)}, got {mask.shape}')
      attn_mask = padding_mask(mask, m)                                                  # [B, M, N]

    c = LayerNorm(self.norm_eps, self.dtype, name='context_norm')(x.astype(self.dtype))  # [B, N, Dv]
    for i in range(self.depth):
      z_n = LayerNorm(self.norm_eps, self.dtype, name=f'attn_norm_{i}')(z)               # [B, M, Dt]
      z = z + CrossAttention(self.num_heads, head_dim, num_kv_heads=self.num_kv_heads, out_features=self.out_dim,
                             dtype=self.dtype, name=f'attn_{i}')(z_n, c, mask=attn_mask)  # [B, M, Dt]
      if self.ff_mult:
        h = LayerNorm(self.norm_eps, self.dtype, name=f'ff_norm_{i}')(z)                 # [B, M, Dt]
        z = z + GeluMLP(self.ff_mult * self.out_dim, act=self.act, dtype=self.dtype, name=f'ff_{i}')(h)
    return LayerNorm(self.norm_eps, self.dtype, name='norm')(z)                          # [B, M, Dt]

  @nn.nowrap
  def check(self) -> None:
    for key, low in (('num_queries', 0), ('depth', 1), ('ff_mult', 0)):
      check_int(key, getattr(self, key), low)
    check_int('head_dim', self.head_dim, optional=True)
    check_num_kv_heads(self.num_kv_heads, check_int('num_heads', self.num_heads))
    check_choice('act', self.act, ACTIVATIONS)
    check_positive('norm_eps', self.norm_eps)

  @nn.nowrap
  def num_output_tokens(self, grid) -> int:
    return self.num_queries

  @nn.nowrap
  def param_count(self) -> int:
    dv, dt, heads = self.in_dim, self.out_dim, self.num_heads
    attn = CrossAttention.param_count(dt, dv, dt, heads, self.head_dim or dt // heads, self.num_kv_heads)
    f = self.ff_mult * dt
    ff = (2 * dt + 2 * dt * f + f + dt) if self.ff_mult else 0
    layer = 2 * dt + attn + ff
    return self.num_queries * dt + 2 * dv + 2 * dt + self.depth * layer
