"""Multi-head attention with grouped-query attention (GQA), optional RoPE, masks and a functional KV cache.

Queries have `num_heads` heads, keys/values `num_kv_heads` heads; query head h reads kv head h // G with
G = num_heads // num_kv_heads (HF `repeat_kv` order). num_kv_heads == num_heads is plain MHA, 1 is MQA.

Masks are boolean [B, T, S] (True = query t may attend key s), built with the helpers below. A query whose keys
are all masked (e.g. a left-padding position) attends to nothing: its attention output is zero (no NaNs, and no
dependence on other positions).

KV cache (decoding): pass `kv_cache=(k, v)` with k, v [B, S, Hkv, Dh] and `cache_index` (int32 scalar). The T new
keys/values are written at slots [cache_index, cache_index + T) and the queries attend over all S slots; the new
(k, v) come back so the caller threads them functionally.

Parameter names follow HF Llama (q_proj/k_proj/v_proj/o_proj); kernels keep heads as separate axes:
  q_proj [D, H, Dh] ('embed', 'heads', 'head_dim')     k_proj, v_proj [D, Hkv, Dh] ('embed', 'kv_heads', 'head_dim')
  o_proj [H, Dh, D] ('heads', 'head_dim', 'embed')     biases (optional) carry the output axes.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmproj.layers.rope import apply_rope

Dtype = Any


def padding_mask(key_mask, num_queries: int):
  """Bidirectional mask from key validity [B, S] (nonzero = real token) -> bool [B, T, S]."""
  key_ok = key_mask.astype(bool)[:, None, :]                                  # [B, 1, S]
  return jnp.broadcast_to(key_ok, (key_ok.shape[0], num_queries, key_ok.shape[-1]))


def causal_padding_mask(query_slots, key_slots, key_mask):
  """Causal + key-padding mask.

  query_slots [T] and key_slots [S] are sequence slots (cache slots when decoding); query t sees key s iff
  key_slots[s] <= query_slots[t] and key_mask[b, s] != 0.  -> bool [B, T, S].
  """
  causal = key_slots[None, :] <= query_slots[:, None]                         # [T, S]
  return causal[None, :, :] & key_mask.astype(bool)[:, None, :]               # [B, T, S]


def dot_product_attention(q, k, v, mask=None, return_probs: bool = False):
  """Grouped-query softmax attention.

  q [B, T, H, Dh], k/v [B, S, Hkv, Dh], mask bool [B, T, S] or None.  -> [B, T, H, Dh] in q.dtype.
  Logits and softmax in float32. return_probs=True also returns the float32 softmax probabilities
  [B, H, T, S] (head h = query head h; fully masked rows are zero), i.e. (out, probs).
  """
  b, t, h, dh = q.shape
  hkv = k.shape[2]
  q = q.reshape(b, t, hkv, h // hkv, dh) * jnp.asarray(dh ** -0.5, q.dtype)  # [B, T, Hkv, G, Dh]
  logits = jnp.einsum('btkgd,bskd->bkgts', q, k,
                      preferred_element_type=jnp.float32)                     # [B, Hkv, G, T, S]
  if mask is not None:
    mask = mask[:, None, None, :, :]                                          # [B, 1, 1, T, S]
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)                                     # [B, Hkv, G, T, S]
  if mask is not None:
    probs = jnp.where(jnp.any(mask, axis=-1, keepdims=True), probs, 0.0)     # fully masked query -> 0
  out = jnp.einsum('bkgts,bskd->btkgd', probs.astype(v.dtype), v)            # [B, T, Hkv, G, Dh]
  out = out.reshape(b, t, h, dh)                                              # [B, T, H, Dh]
  if return_probs:
    return out, probs.reshape(b, h, t, k.shape[1])                            # [B, H, T, S]
  return out


def _dense(features, axis, names, bias_names, use_bias, dtype, name):
  return nn.DenseGeneral(
      features=features, axis=axis, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name,
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), names),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, bias_names))


class Attention(nn.Module):
  """Self-attention block: q/k/v projections -> (RoPE) -> GQA softmax attention -> output projection."""

  num_heads: int
  num_kv_heads: int
  head_dim: int
  use_bias: bool = False          # CLIP/SigLIP: True, Llama: False
  use_rope: bool = False
  rope_theta: float = 10000.0
  rope_scaling: Any = None        # None, or a rope frequency scaling dict (mmproj/layers/rope.py)
  qkv_bias: bool | None = None    # None -> use_bias; True/False: biases on q/k/v only (Qwen2: True)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, mask=None, positions=None, kv_cache=None, cache_index=None):
    """x [B, T, D]; mask bool [B, T, S] or None; positions [B, T] (needed with RoPE);
    kv_cache (k, v) each [B, S, Hkv, Dh] or None; cache_index int32 scalar.

    Returns (y [B, T, D], new_kv_cache or None).
    """
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f'num_heads={self.num_heads} is not divisible by num_kv_heads={self.num_kv_heads}')
    d = x.shape[-1]
    h, hkv, dh = self.num_heads, self.num_kv_heads, self.head_dim
    qkv_bias = self.use_bias if self.qkv_bias is None else self.qkv_bias
    q = _dense((h, dh), -1, ('embed', 'heads', 'head_dim'), ('heads', 'head_dim'),
               qkv_bias, self.dtype, 'q_proj')(x)                             # [B, T, H, Dh]
    k = _dense((hkv, dh), -1, ('embed', 'kv_heads', 'head_dim'), ('kv_heads', 'head_dim'),
               qkv_bias, self.dtype, 'k_proj')(x)                             # [B, T, Hkv, Dh]
    v = _dense((hkv, dh), -1, ('embed', 'kv_heads', 'head_dim'), ('kv_heads', 'head_dim'),
               qkv_bias, self.dtype, 'v_proj')(x)                             # [B, T, Hkv, Dh]
    if self.use_rope:
      if positions is None:
        raise ValueError('Attention with use_rope=True needs positions [B, T]')
      q = apply_rope(q, positions, self.rope_theta, self.rope_scaling)
      k = apply_rope(k, positions, self.rope_theta, self.rope_scaling)

    new_cache = None
    if kv_cache is not None:
      k_cache, v_cache = kv_cache                                             # [B, S, Hkv, Dh]
      start = (0, cache_index, 0, 0)
      k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), start)  # [B, S, Hkv, Dh]
      v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), start)  # [B, S, Hkv, Dh]
      new_cache = (k, v)
      k, v = k.astype(self.dtype), v.astype(self.dtype)

    if self.is_mutable_collection('intermediates'):  # apply(..., mutable=['intermediates']): mmproj/eval/attention.py
      out, probs = dot_product_attention(q, k, v, mask, return_probs=True)    # [B, T, H, Dh], [B, H, T, S]
      self.sow('intermediates', 'attention_probs', probs)
    else:
      out = dot_product_attention(q, k, v, mask)                              # [B, T, H, Dh]
    y = _dense(d, (-2, -1), ('heads', 'head_dim', 'embed'), ('embed',),
               self.use_bias, self.dtype, 'o_proj')(out)                      # [B, T, D]
    return y, new_cache
