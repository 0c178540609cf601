"""Decoder-only language model shaped like Llama (Touvron et al. 2023).

  tokens [B, T] --embed_tokens--> [B, T, D]          (MultimodalLM may overwrite rows with visual tokens)
  blocks: x + self_attn(input_layernorm(x)); x + mlp(post_attention_layernorm(x))
          (RMSNorm, GQA attention with RoPE, causal + key-padding mask, SwiGLU MLP)
  norm (RMSNorm) -> lm_head (untied, or embed_tokens^T when tie_embeddings) -> logits [B, T, V] float32

Positions are explicit ([B, T], = max(cumsum(input_mask) - 1, 0)), so left-padded rows behave like unpadded ones.

Functional KV cache for decoding (a plain dict, threaded by the caller):
  cache = {'k': [layers, B, S, Hkv, Dh], 'v': [layers, B, S, Hkv, Dh],   (compute dtype)
           'mask': [B, S] int32 (1 = slot holds a real key), 'index': int32 scalar (next slot to write)}
A call with T new tokens writes slots [index, index + T) and advances index by T; query t sees slot s iff
s <= index + t and mask[s] == 1.

Parameter names follow HF LlamaForCausalLM: embed_tokens, layers_{i}/{input_layernorm, self_attn/{q,k,v,o}_proj,
post_attention_layernorm, mlp/{gate,up,down}_proj}, norm, lm_head.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmproj.layers import Attention, RMSNorm, SwiGLU, causal_padding_mask, dense

Dtype = Any


def make_cache(depth: int, batch_size: int, cache_len: int, num_kv_heads: int, head_dim: int,
               dtype: Dtype = jnp.float32) -> dict:
  """An empty KV cache (all slots invalid, index 0)."""
  kv_shape = (depth, batch_size, cache_len, num_kv_heads, head_dim)
  return {
      'k': jnp.zeros(kv_shape, dtype),                   # [layers, B, S, Hkv, Dh]
      'v': jnp.zeros(kv_shape, dtype),                   # [layers, B, S, Hkv, Dh]
      'mask': jnp.zeros((batch_size, cache_len), jnp.int32),  # [B, S]
      'index': jnp.zeros((), jnp.int32),
  }


class DecoderBlock(nn.Module):
  """Pre-RMSNorm Llama block.  x [B, T, D] -> ([B, T, D], new (k, v) cache of this layer or None)."""

  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, mask, positions, kv_cache=None, cache_index=None):
    h = RMSNorm(self.norm_eps, self.dtype, name='input_layernorm')(x)
    h, kv_cache = Attention(self.num_heads, self.num_kv_heads, self.head_dim, use_bias=False, use_rope=True,
                            rope_theta=self.rope_theta, dtype=self.dtype, name='self_attn')(
                                h, mask=mask, positions=positions, kv_cache=kv_cache, cache_index=cache_index)
    x = x + h                                                                  # [B, T, D]
    h = RMSNorm(self.norm_eps, self.dtype, name='post_attention_layernorm')(x)
    x = x + SwiGLU(self.mlp_dim, dtype=self.dtype, name='mlp')(h)              # [B, T, D]
    return x, kv_cache


class Llama(nn.Module):
  """Llama-shaped decoder-only LM with methods `embed`, `__call__` and `init_cache`."""

  vocab_size: int
  width: int
  depth: int
  num_heads: int
  num_kv_heads: int
  mlp_dim: int
  head_dim: int | None = None            # None -> width // num_heads
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6
  tie_embeddings: bool = False
  max_len: int = 2048
  dtype: Dtype = jnp.float32

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.width // self.num_heads

  def setup(self):
    self.embed_tokens = nn.Embed(
        self.vocab_size, self.width, dtype=self.dtype, param_dtype=jnp.float32,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ('vocab', 'embed')))
    self.layers = [
        DecoderBlock(self.num_heads, self.num_kv_heads, self.dim_per_head, self.mlp_dim, self.rope_theta,
                     self.norm_eps, self.dtype)
        for _ in range(self.depth)]
    self.norm = RMSNorm(self.norm_eps, self.dtype)
    if not self.tie_embeddings:
      self.lm_head = dense(self.vocab_size, ('embed', 'vocab'), use_bias=False, dtype=self.dtype)

  def embed(self, tokens):
    """tokens int [B, T] -> embeddings [B, T, D] (compute dtype)."""
    return self.embed_tokens(tokens)

  def init_cache(self, batch_size: int, cache_len: int) -> dict:
    """An empty KV cache for this LM (compute dtype); needs no params."""
    if cache_len > self.max_len:
      raise ValueError(f'cache_len={cache_len} exceeds model.lm.max_len={self.max_len}')
    return make_cache(self.depth, batch_size, cache_len, self.num_kv_heads, self.dim_per_head, self.dtype)

  def __call__(self, x, positions, input_mask, cache=None, segment_ids=None):
    """x [B, T, D] input embeddings, positions int [B, T], input_mask int [B, T] (0 = padding key).

    segment_ids int [B, T] (optional, no cache): shared-prefix packing. Segment 0 (e.g. <bos> + image) is seen
    by every token; a token of segment k > 0 sees segment 0 and earlier tokens of its own segment only, so
    several independent turns about one image train in one row.

    Without a cache: full causal pass, returns (logits [B, T, V] float32, None).
    With a cache (see module docstring): returns (logits [B, T, V] float32, updated cache).
    """
    t = x.shape[1]
    x = x.astype(self.dtype)
    if cache is None:
      if t > self.max_len:
        raise ValueError(f'sequence length {t} exceeds model.lm.max_len={self.max_len}')
      slots = jnp.arange(t)
      mask = causal_padding_mask(slots, slots, input_mask)                    # [B, T, T]
      if segment_ids is not None:
        seg_q, seg_k = segment_ids[:, :, None], segment_ids[:, None, :]
        mask &= (seg_k == 0) | (seg_k == seg_q)                                # [B, T, T]
      for layer in self.layers:
        x, _ = layer(x, mask=mask, positions=positions)
      new_cache = None
    else:
      index = cache['index']
      key_mask = jax.lax.dynamic_update_slice(cache['mask'], input_mask.astype(jnp.int32), (0, index))  # [B, S]
      mask = causal_padding_mask(index + jnp.arange(t), jnp.arange(key_mask.shape[1]), key_mask)      # [B, T, S]
      ks, vs = [], []
      for i, layer in enumerate(self.layers):
        x, (k, v) = layer(x, mask=mask, positions=positions, kv_cache=(cache['k'][i], cache['v'][i]),
                          cache_index=index)
        ks.append(k)
        vs.append(v)
      new_cache = {'k': jnp.stack(ks), 'v': jnp.stack(vs), 'mask': key_mask, 'index': index + t}
    x = self.norm(x)                                                           # [B, T, D]
    if self.tie_embeddings:
      logits = self.embed_tokens.attend(x)                                     # [B, T, V]
    else:
      logits = self.lm_head(x)                                                 # [B, T, V]
    return logits.astype(jnp.float32), new_cache
