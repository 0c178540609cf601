"""Cross-attention: queries from one sequence, keys/values from another (multi-head, GQA, masks, q/k norms).

  q = q_proj(queries)  [B, T, H, Dh]      k = k_proj(keys)  [B, S, Hkv, Dh]      v = v_proj(values)  [B, S, Hkv, Dh]
  (optional q_norm / k_norm over Dh, one norm shared by all heads — Idefics' qk_layer_norms)
  y = o_proj(softmax(q k^T / sqrt(Dh) + mask) v)  [B, T, Dout]

`values` defaults to `keys`; they differ when keys carry position embeddings that values must not (Qwen-VL's
resampler, DETR-style). Queries with no visible key attend to nothing (zero output), as in
`mmproj.layers.dot_product_attention`, which does the GQA softmax (query head h reads kv head h // G).

Parameter names and layouts follow `mmproj.layers.Attention` (HF q_proj/k_proj/v_proj/o_proj, heads as axes):
  q_proj [Dq, H, Dh] ('embed', 'heads', 'head_dim')    k_proj, v_proj [Dk, Hkv, Dh] ('embed', 'kv_heads', 'head_dim')
  o_proj [H, Dh, Dout] ('heads', 'head_dim', 'embed')  biases (use_bias) carry the output axes
  q_norm, k_norm: scale [Dh] (+ bias for 'layer') ('norm',)
  params: Dq*H*Dh + (Dk + Dv)*Hkv*Dh + H*Dh*Dout  (+ H*Dh + 2*Hkv*Dh + Dout with biases)  (+ 2 * norm(Dh))
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mmproj.layers.attention import _dense, dot_product_attention
from mmproj.layers.norms import LayerNorm, RMSNorm

Dtype = Any

QK_NORMS = (None, 'layer', 'rms')


def norm_param_count(kind: str, dim: int) -> int:
  """Parameters of a norm over `dim`: LayerNorm scale + bias, RMSNorm scale."""
  return {'layer': 2 * dim, 'rms': dim}[kind]


def make_norm(kind: str, eps: float, dtype: Dtype, name: str):
  """'layer' -> mmproj LayerNorm (scale + bias), 'rms' -> RMSNorm (scale); params carry 'norm'."""
  if kind == 'layer':
    return LayerNorm(eps=eps, dtype=dtype, name=name)
  if kind == 'rms':
    return RMSNorm(eps=eps, dtype=dtype, name=name)
  raise ValueError(f'unknown norm kind {kind!r}; expected "layer" or "rms"')


class CrossAttention(nn.Module):
  """Multi-head (GQA) attention of `queries` [B, T, Dq] over `keys`/`values` [B, S, Dk] -> [B, T, Dout]."""

  num_heads: int
  head_dim: int
  num_kv_heads: int | None = None    # None = num_heads (MHA); 1 = MQA
  out_features: int | None = None    # None = query width Dq
  use_bias: bool = False             # nn.MultiheadAttention: True; Perceiver/Idefics2: False
  qk_norm: str | None = None         # None, 'layer' or 'rms' over head_dim on q and k
  norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, queries, keys, values=None, *, mask=None):
    """queries [B, T, Dq], keys [B, S, Dk], values [B, S, Dk] (default keys), mask bool [B, T, S] or None."""
    h = self.num_heads
    hkv = self.num_kv_heads or h
    if h % hkv:
      raise ValueError(f'num_heads={h} is not divisible by num_kv_heads={hkv}')
    dh = self.head_dim
    values = keys if values is None else values
    q = _dense((h, dh), -1, ('embed', 'heads', 'head_dim'), ('heads', 'head_dim'),
               self.use_bias, self.dtype, 'q_proj')(queries)                  # [B, T, H, Dh]
    k = _dense((hkv, dh), -1, ('embed', 'kv_heads', 'head_dim'), ('kv_heads', 'head_dim'),
               self.use_bias, self.dtype, 'k_proj')(keys)                     # [B, S, Hkv, Dh]
    v = _dense((hkv, dh), -1, ('embed', 'kv_heads', 'head_dim'), ('kv_heads', 'head_dim'),
               self.use_bias, self.dtype, 'v_proj')(values)                   # [B, S, Hkv, Dh]
    if self.qk_norm is not None:
      q = make_norm(self.qk_norm, self.norm_eps, self.dtype, 'q_norm')(q)     # [B, T, H, Dh]
      k = make_norm(self.qk_norm, self.norm_eps, self.dtype, 'k_norm')(k)     # [B, S, Hkv, Dh]
    if self.is_mutable_collection('intermediates'):  # apply(..., mutable=['intermediates']): mmproj/inference/attention.py
      out, probs = dot_product_attention(q, k, v, mask, return_probs=True)    # [B, T, H, Dh], [B, H, T, S]
      self.sow('intermediates', 'attention_probs', probs)
    else:
      out = dot_product_attention(q, k, v, mask)                              # [B, T, H, Dh]
    d_out = self.out_features or queries.shape[-1]
    return _dense(d_out, (-2, -1), ('heads', 'head_dim', 'embed'), ('embed',),
                  self.use_bias, self.dtype, 'o_proj')(out)                   # [B, T, Dout]

  @staticmethod
  def param_count(q_dim: int, kv_dim: int, out_dim: int, num_heads: int, head_dim: int,
                  num_kv_heads: int | None = None, use_bias: bool = False, qk_norm: str | None = None) -> int:
    """The formula in the module docstring (keys and values of the same width kv_dim)."""
    h, hkv, dh = num_heads, num_kv_heads or num_heads, head_dim
    n = q_dim * h * dh + 2 * kv_dim * hkv * dh + h * dh * out_dim
    if use_bias:
      n += h * dh + 2 * hkv * dh + out_dim
    if qk_norm is not None:
      n += 2 * norm_param_count(qk_norm, dh)
    return n
