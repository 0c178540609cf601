"""Multi-head attention with grouped-query attention (GQA), optional RoPE, masks and a functional KV cache.

Queries have `num_heads` heads, keys/values `num_kv_heads` heads; query head h reads kv head h // G with
G = num_heads // num_kv_heads (HF `repeat_kv` order). num_kv_heads == num_heads is plain MHA, 1 is MQA.

Masks are boolean [B, T, S] (True = query t may attend key s), built with the helpers below. A query whose keys
are all masked (e.g. a left-padding position) attends to nothing: its attention output is zero (no NaNs, and no
dependence on other positions). Which implementation computes it is model.kernels.attention
(mmproj/layers/kernels.py): jax.nn.dot_product_attention by default.

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

from mmproj.layers import kernels
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


@jax.custom_vjp
def masked_softmax(logits, mask=None):
  """Softmax over the last axis of float logits, with keys where `mask` (bool, broadcastable) is False left out.

  A row whose keys are all masked gives zeros. The backward is d logits = p * (g - sum(p * g)): it reads only the
  saved probabilities and the incoming gradient (differentiating exp / sum / divide directly, as
  jax.nn.softmax does by default, keeps more [.., T, S] arrays alive and reads three of them), and needs no
  select for the mask, since masked probabilities are zero.
  """
  return _masked_softmax_fwd(logits, mask)[0]


def _masked_softmax_fwd(logits, mask):
  lowest = jnp.finfo(logits.dtype).min
  if mask is not None:
    logits = jnp.where(mask, logits, lowest)
  peak = jnp.max(logits, axis=-1, keepdims=True)
  e = jnp.exp(logits - peak)                       # masked keys: exp(lowest - peak) = 0 unless the row is all masked
  scale = 1.0 / jnp.sum(e, axis=-1, keepdims=True)
  if mask is not None:
    scale = jnp.where(peak > lowest, scale, 0.0)   # an all-masked row (its peak is `lowest`) -> zeros
  probs = e * scale
  return probs, probs


def _masked_softmax_bwd(probs, g):
  return probs * (g - jnp.sum(probs * g, axis=-1, keepdims=True)), None


masked_softmax.defvjp(_masked_softmax_fwd, _masked_softmax_bwd)


def causal_query_blocks(length: int) -> list[tuple[int, int]]:
  """Query blocks [start, end) for causal self-attention over `length` tokens (model.kernels.attention =
  'query_blocks'): block i needs keys [0, end) only, since every later key is masked for all of its queries.
  length // 176 blocks (at most 8) of near-equal size, one (plain dense attention) below 352 tokens; n blocks
  compute (n + 1) / 2n of the L x L scores (5/8 at L = 704, 9/16 at 2048). The block size is the one the CPU
  benchmark's LLaVA stage-1 step ran fastest with (BENCHMARKS.md)."""
  n = min(8, length // 176)
  if n < 2:
    return [(0, length)]
  bounds = [round(i * length / n) for i in range(n + 1)]
  return list(zip(bounds[:-1], bounds[1:]))


def attention_pairs(num_queries: int, num_keys: int, *, causal: bool = False, kernel: str = 'xla') -> int:
  """(query, key) score pairs one head of `dot_product_attention` computes with model.kernels.attention =
  `kernel`: T * S, or for causal self-attention with 'query_blocks' the pairs of its blocks."""
  if causal and kernel == 'query_blocks':
    return sum((hi - lo) * hi for lo, hi in causal_query_blocks(num_queries))
  return num_queries * num_keys


def _attend(q, k, v, mask):
  """q [B, T, Hkv, G, Dh] (scaled), k/v [B, S, Hkv, Dh], mask bool [B, T, S] or None -> (out [B, T, Hkv, G, Dh],
  probs [B, Hkv, G, T, S] float32)."""
  logits = jnp.einsum('btkgd,bskd->bkgts', q, k,
                      preferred_element_type=jnp.float32)                     # [B, Hkv, G, T, S]
  probs = masked_softmax(logits, None if mask is None else mask[:, None, None, :, :])  # [B, Hkv, G, T, S]
  return jnp.einsum('bkgts,bskd->btkgd', probs.astype(v.dtype), v), probs     # [B, T, Hkv, G, Dh]


def dot_product_attention(q, k, v, mask=None, return_probs: bool = False, causal: bool = False):
  """Grouped-query softmax attention, by the implementation of model.kernels.attention (mmproj/layers/kernels.py).

  q [B, T, H, Dh], k/v [B, S, Hkv, Dh], mask bool [B, T, S] or None.  -> [B, T, H, Dh] in q.dtype.
  Logits and softmax in float32. A query whose keys are all masked gets a zero output. return_probs=True also
  returns the float32 softmax probabilities [B, H, T, S] (head h = query head h; fully masked rows are zero),
  i.e. (out, probs): the output is the kernel's, the probabilities come from the einsum path (computed again).

  causal=True promises that query t and key s are the same sequence's slots (S == T) and that the mask hides
  every key s > t (it may hide more: padding, a sliding window, segments). The 'query_blocks' kernel then splits
  the queries into causal_query_blocks, block [a, b) attending keys [0, b) only: the same result without the
  scores above the diagonal blocks; 'cudnn' uses its causal mask type.
  """
  if causal and k.shape[1] != q.shape[1]:
    raise ValueError(f'causal attention needs as many keys as queries: {k.shape[1]} keys, {q.shape[1]} queries')
  kernel = kernels.current().attention
  if kernel == 'cudnn' and not cudnn_takes(q, k, masked=mask is not None):
    kernel = 'xla'
  if kernel == 'query_blocks':
    out = _einsum_attention(q, k, v, mask, False, causal)
  else:
    out = jax.nn.dot_product_attention(q, k, v, mask=None if mask is None else mask[:, None],
                                       is_causal=causal and kernel == 'cudnn', implementation=kernel)
    if mask is not None:                                                      # fully masked queries -> 0
      out = out * jnp.any(mask, axis=-1)[:, :, None, None].astype(out.dtype)
  if return_probs:       # the maps from the einsum path; the output stays the kernel's
    return out, _einsum_attention(q, k, v, mask, True, False)[1]
  return out                                                                  # [B, T, H, Dh]


def cudnn_takes(q, k, *, masked: bool) -> bool:
  """Whether cuDNN's fused attention runs these shapes (jax.nn.dot_product_attention's 'cudnn' checks, on every
  GPU generation): bf16 / fp16 inputs, a head dim that is a multiple of 8 and at most 128, and with a mask (which
  it takes as a bias) even query and key lengths. The 'cudnn' kernel sends any other call (a small projector's
  odd head dim, an f32 layer) to the 'xla' path."""
  t, dh, s = q.shape[1], q.shape[-1], k.shape[1]
  return (q.dtype in (jnp.bfloat16, jnp.float16) and dh % 8 == 0 and dh <= 128
          and (not masked or (t % 2 == 0 and s % 2 == 0)))


def _einsum_attention(q, k, v, mask, return_probs: bool, causal: bool):
  """The einsum path: scores, masked_softmax, weighted sum; causal queries in blocks (see dot_product_attention)."""
  b, t, h, dh = q.shape
  hkv = k.shape[2]
  q = q.reshape(b, t, hkv, h // hkv, dh) * jnp.asarray(dh ** -0.5, q.dtype)  # [B, T, Hkv, G, Dh]
  blocks = causal_query_blocks(t) if causal and not return_probs else [(0, t)]
  if len(blocks) > 1:
    # Head-major layout, so that each block's rows are contiguous slices and its dots need no transposes.
    qh = jnp.transpose(q, (0, 2, 3, 1, 4))                                   # [B, Hkv, G, T, Dh]
    kh, vh = jnp.transpose(k, (0, 2, 1, 3)), jnp.transpose(v, (0, 2, 1, 3))  # [B, Hkv, S, Dh]
    outs = []
    for lo, hi in blocks:
      logits = jnp.einsum('bkgtd,bksd->bkgts', qh[:, :, :, lo:hi], kh[:, :, :hi],
                          preferred_element_type=jnp.float32)                 # [B, Hkv, G, hi - lo, hi]
      block_mask = None if mask is None else mask[:, None, None, lo:hi, :hi]
      probs = masked_softmax(logits, block_mask)
      outs.append(jnp.einsum('bkgts,bksd->bkgtd', probs.astype(vh.dtype), vh[:, :, :hi]))  # [B, Hkv, G, ., Dh]
    out = jnp.concatenate(outs, axis=3)                                       # [B, Hkv, G, T, Dh]
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, h, dh)          # [B, T, H, Dh]
  out, probs = _attend(q, k, v, mask)
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
  k_bias: bool | None = None      # None -> as q/v; False: no k_proj bias (Whisper: a key bias adds q . b_k to a
                                  # whole row of scores, which softmax cancels, so it would never train)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, mask=None, positions=None, kv_cache=None, cache_index=None, causal: bool = False):
    """x [B, T, D]; mask bool [B, T, S] or None; positions [B, T] (needed with RoPE);
    kv_cache (k, v) each [B, S, Hkv, Dh] or None; cache_index int32 scalar. causal=True (no cache): the mask
    hides every later key, so attention may skip the blocks above the diagonal (see dot_product_attention).

    Returns (y [B, T, D], new_kv_cache or None).
    """
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f'num_heads={self.num_heads} is not divisible by num_kv_heads={self.num_kv_heads}')
    d = x.shape[-1]
    h, hkv, dh = self.num_heads, self.num_kv_heads, self.head_dim
    qkv_bias = self.use_bias if self.qkv_bias is None else self.qkv_bias
    k_bias = qkv_bias if self.k_bias is None else self.k_bias
    q = _dense((h, dh), -1, ('embed', 'heads', 'head_dim'), ('heads', 'head_dim'),
               qkv_bias, self.dtype, 'q_proj')(x)                             # [B, T, H, Dh]
    k = _dense((hkv, dh), -1, ('embed', 'kv_heads', 'head_dim'), ('kv_heads', 'head_dim'),
               k_bias, self.dtype, 'k_proj')(x)                               # [B, T, Hkv, Dh]
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

    if self.is_mutable_collection('intermediates'):  # apply(..., mutable=['intermediates']): mmproj/inference/attention.py
      out, probs = dot_product_attention(q, k, v, mask, return_probs=True)    # [B, T, H, Dh], [B, H, T, S]
      self.sow('intermediates', 'attention_probs', probs)
    else:
      out = dot_product_attention(q, k, v, mask, causal=causal and kv_cache is None)  # [B, T, H, Dh]
    y = _dense(d, (-2, -1), ('heads', 'head_dim', 'embed'), ('embed',),
               self.use_bias, self.dtype, 'o_proj')(out)                      # [B, T, D]
    return y, new_cache
