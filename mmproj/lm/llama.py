"""Decoder-only language model shaped like Llama (Touvron et al. 2023).

  tokens [B, T] --embed_tokens--> [B, T, D]          (MultimodalLM may overwrite rows with visual tokens)
  blocks: x + self_attn(input_layernorm(x)); x + mlp(post_attention_layernorm(x))
          (RMSNorm, GQA attention with RoPE, causal + key-padding mask, SwiGLU MLP)
  norm (RMSNorm) -> lm_head (untied, or embed_tokens^T when tie_embeddings) -> logits [B, T, V] float32

Positions are explicit ([B, T], = max(cumsum(input_mask) - 1, 0)), so left-padded rows behave like unpadded ones.

Variants for HF checkpoints (mmproj/convert/llama.py; all default off = the plain Llama above):
  qkv_bias        biases on q/k/v_proj (Qwen2)
  rope_scaling    RoPE frequency scaling, HF rope_type 'linear' or 'llama3' (mmproj/layers/rope.py)
  sliding_window  W: query slot t sees only key slots s with t - W < s <= t (Mistral; HF's sliding-window mask,
                  also on cache slots while decoding). The KV cache still keeps every slot (no rolling buffer).

Functional KV cache for decoding (a plain dict, threaded by the caller):
  cache = {'k': [layers, B, S, Hkv, Dh], 'v': [layers, B, S, Hkv, Dh],   (compute dtype)
           'mask': [B, S] int32 (1 = slot holds a real key), 'index': int32 scalar (next slot to write)}
A call with T new tokens writes slots [index, index + T) and advances index by T; query t sees slot s iff
s <= index + t and mask[s] == 1.

Gated cross-attention (Flamingo; `cross_attention` set by MultimodalLM for an injecting projector such as
gated_xattn): a GatedCrossAttentionBlock (mmproj/layers/gated_cross_attention.py) runs before every `every`-th block
(params xattn_layers_{i}, i = the block it precedes), attending to media tokens [B, T_img, M, D] under a media
mask built from media_index [B, T] (images at or before each token). The blocks run only when media is passed
(or cached): without it the LM is exactly the text-only LM. A prefill with media adds to the cache
  'xattn_k', 'xattn_v': [n_xattn, B, S, Hkv_x, Dh_x]   the media's keys/values, computed once (media are fixed)
  'media_ids': [B, S] int32                             1-based image number of each media slot
  'media_index': [B] int32                              images seen so far (every decoded token sees them too)
A cache without these keys (no injection) keeps the format above.

Memory levers (mmproj/layers/scan.py):
  remat        'none' | 'dots' | 'minimal' | 'full': each block wrapped in nn.remat with that policy (cfg.model.remat).
  scan_layers  True: the blocks run as one nn.scan (one block body in the compiled program, whatever the depth);
               full forward, prefill and decode_step alike (the scan runs over the layer params and the cache's
               k/v [layers, ...] jointly). Not supported with cross_attention (ValueError naming
               model.lm.scan_layers): the gated blocks sit between some of the decoder blocks.

Parameter names follow HF LlamaForCausalLM: embed_tokens, layers_{i}/{input_layernorm, self_attn/{q,k,v,o}_proj,
post_attention_layernorm, mlp/{gate,up,down}_proj}, norm, lm_head. With scan_layers the blocks' params are one
stacked tree instead, layers/{input_layernorm, self_attn/..., ...} with a leading [depth] axis (logical name
'layers'; layer i is leaf[i]); mmproj.convert.stack_layers / unstack_layers convert between the two layouts.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmproj.layers import Attention, RMSNorm, SwiGLU, causal_padding_mask, dense
from mmproj.layers.attention import attention_pairs
from mmproj.layers.rope import check_rope_scaling
from mmproj.layers.scan import check_remat, check_scan, remat_block, scan_blocks
from mmproj.layers.gated_cross_attention import (GatedCrossAttentionBlock, media_attention_mask, media_ids,
                                                 xattn_layer_ids)
from mmproj.layers.partitioning import constrain

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
  """Pre-RMSNorm Llama block.  x [B, T, D] -> ([B, T, D], new (k, v) cache of this layer or None).

  Arguments are positional-or-keyword so that nn.remat / nn.scan can pass them positionally: mask bool [B, T, S],
  positions int [B, T], kv_cache (k, v) each [B, S, Hkv, Dh] or None, cache_index int32 scalar or None. The
  signature (carry, *xs) -> (carry, y) is the one nn.scan wants (y = this layer's new cache). Without a cache the
  mask must be causal (it is the LM's): attention then skips the key blocks above the diagonal.
  """

  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32
  qkv_bias: bool = False
  rope_scaling: Any = None

  @nn.compact
  def __call__(self, x, mask, positions, kv_cache=None, cache_index=None):
    h = RMSNorm(self.norm_eps, self.dtype, name='input_layernorm')(x)
    h, kv_cache = Attention(self.num_heads, self.num_kv_heads, self.head_dim, use_bias=False, use_rope=True,
                            rope_theta=self.rope_theta, rope_scaling=self.rope_scaling, qkv_bias=self.qkv_bias,
                            dtype=self.dtype, name='self_attn')(
                                h, mask=mask, positions=positions, kv_cache=kv_cache, cache_index=cache_index,
                                causal=kv_cache is None)               # without a cache the mask is causal
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
  qkv_bias: bool = False                 # Qwen2: biases on q/k/v_proj
  rope_scaling: Any = None               # None, or {'rope_type': 'linear' | 'llama3', ...} (mmproj/layers/rope.py)
  sliding_window: int | None = None      # Mistral: attend to the last `sliding_window` slots only
  cross_attention: Any = None            # None, or {every, media_mask, GatedCrossAttentionBlock fields}
  scan_layers: bool = False              # one nn.scan over the blocks (params under layers/ with a [depth] axis)
  remat: str = 'none'                    # 'none' | 'dots' | 'minimal' | 'full' (mmproj/layers/scan.py)
  dtype: Dtype = jnp.float32

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.width // self.num_heads

  def setup(self):
    rope_scaling = check_rope_scaling(self.rope_scaling)
    if self.sliding_window is not None and self.sliding_window < 1:
      raise ValueError(f'model.lm.sliding_window={self.sliding_window} must be None or >= 1')
    self.embed_tokens = nn.Embed(
        self.vocab_size, self.width, dtype=self.dtype, param_dtype=jnp.float32,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ('vocab', 'embed')))
    check_remat(self.remat)
    if check_scan(self.scan_layers, 'model.lm.scan_layers') and self.cross_attention is not None:
      raise ValueError('model.lm.scan_layers=True is not supported with gated cross-attention (an injecting '
                       'projector such as gated_xattn puts blocks between the decoder blocks); set it False')
    block = dict(num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.dim_per_head,
                 mlp_dim=self.mlp_dim, rope_theta=self.rope_theta, norm_eps=self.norm_eps, dtype=self.dtype,
                 qkv_bias=self.qkv_bias,
                 rope_scaling=None if rope_scaling is None else tuple(sorted(rope_scaling.items())))
    if self.scan_layers:        # args (mask, positions, kv_cache, cache_index): the cache is sliced per layer
      self.layers = scan_blocks(DecoderBlock, self.depth, remat=self.remat,
                                in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast))(**block)
    else:
      block_cls = remat_block(DecoderBlock, self.remat)
      self.layers = [block_cls(**block) for _ in range(self.depth)]
    if self.cross_attention is not None:
      fields = {k: v for k, v in dict(self.cross_attention).items() if k not in ('every', 'media_mask')}
      self.xattn_layers = {i: GatedCrossAttentionBlock(**fields, dtype=self.dtype)
                           for i in xattn_layer_ids(self.depth, self.cross_attention['every'])}
    self.norm = RMSNorm(self.norm_eps, self.dtype)
    if not self.tie_embeddings:
      self.lm_head = dense(self.vocab_size, ('embed', 'vocab'), use_bias=False, dtype=self.dtype)

  def matmul_flops(self, length: int, head_positions: int, attention: str = 'xla',
                   media_len: int = 0) -> dict[str, Any]:
    """Matmul FLOPs (2 per multiply-add) of one row of `length` tokens, D width, H heads, K kv heads, d head_dim,
    F mlp_dim, V vocab_size, P = the (query, key) pairs the attention kernel scores (mmproj.layers.attention_pairs:
    L^2, fewer with 'query_blocks'):
      per block (`blocks` = depth of them):
        weights    q, o  2 * 2 * L * D * H * d;  k, v  2 * 2 * L * D * K * d;  gate, up, down  3 * 2 * L * D * F
        attention  scores and weighted sum  2 * 2 * P * H * d
        last       down_proj, the block's last matmul (the one remat='full' does not recompute)   2 * L * F * D
      head         the vocabulary projection at `head_positions` of the row (tied or not)   2 * N * D * V
      gated        {LM block i: that gated cross-attention block's figures} over media_len media tokens
    The embedding is a gather: no matmul."""
    d, h, k, dh, f = self.width, self.num_heads, self.num_kv_heads, self.dim_per_head, self.mlp_dim
    pairs = attention_pairs(length, length, causal=True, kernel=attention)
    out = dict(blocks=self.depth, weights=2 * length * (2 * d * h * dh + 2 * d * k * dh + 3 * d * f),
               attention=2 * 2 * pairs * h * dh, last=2 * length * f * d,
               head=2 * head_positions * d * self.vocab_size, gated={})
    if self.cross_attention is not None:
      fields = {k: v for k, v in dict(self.cross_attention).items() if k not in ('every', 'media_mask')}
      block = GatedCrossAttentionBlock(**fields, dtype=self.dtype, parent=None)   # unbound: for its count
      out['gated'] = {i: block.matmul_flops(length, media_len)
                      for i in xattn_layer_ids(self.depth, self.cross_attention['every'])}
    return out

  def embed(self, tokens):
    """tokens int [B, T] -> embeddings [B, T, D] (compute dtype).

    Under the trainer's activation rules the table is first gathered whole along 'embed' (FSDP's all-gather before
    use; vocab stays split over 'tensor'), so the lookup yields batch-sharded rows instead of rows split along the
    model width that XLA would have to replicate and re-split."""
    table = constrain(self.embed_tokens.embedding, 'act_vocab', None)          # [V, D]
    return jnp.take(table, tokens, axis=0).astype(self.dtype)                   # [B, T, D]

  def init_cache(self, batch_size: int, cache_len: int) -> dict:
    """An empty KV cache for this LM (compute dtype); needs no params."""
    if cache_len > self.max_len:
      raise ValueError(f'cache_len={cache_len} exceeds model.lm.max_len={self.max_len}')
    return make_cache(self.depth, batch_size, cache_len, self.num_kv_heads, self.dim_per_head, self.dtype)

  def _media_context(self, batch_size, length, cache, media, media_index):
    """Per gated block (k, v) and the media mask [B, T, S] for this call; None when nothing is injected."""
    has_cached = cache is not None and 'xattn_k' in cache
    if self.cross_attention is None or (media is None and not has_cached):
      return None
    order = sorted(self.xattn_layers)
    if media is not None:                      # full forward or prefill: k/v from the media
      if media_index is None:
        raise ValueError('media needs media_index [B, T] (images at or before each token)')
      b, n_img, per_img, d = media.shape                                      # [B, T_img, M, D]
      flat = media.reshape(b, n_img * per_img, d)                             # [B, S, D]
      kvs = {i: self.xattn_layers[i].media_kv(flat) for i in order}
      ids = jnp.broadcast_to(media_ids(n_img, per_img), (b, n_img * per_img))  # [B, S]
    else:                                      # decoding: the prompt's media k/v from the cache
      kvs = {i: (cache['xattn_k'][j], cache['xattn_v'][j]) for j, i in enumerate(order)}
      ids = cache['media_ids']
      if media_index is None:                  # new tokens see the images the prompt saw
        media_index = jnp.broadcast_to(cache['media_index'][:, None], (batch_size, length))
    mask = media_attention_mask(media_index, ids, self.cross_attention['media_mask'])  # [B, T, S]
    cached = {'xattn_k': jnp.stack([kvs[i][0] for i in order]), 'xattn_v': jnp.stack([kvs[i][1] for i in order]),
              'media_ids': ids, 'media_index': jnp.max(media_index, axis=1).astype(jnp.int32)}
    return kvs, mask, cached

  def _window(self, mask, query_slots, key_slots):
    """Sliding-window restriction of a [B, T, S] mask (query slot t sees key slots > t - sliding_window)."""
    if self.sliding_window is None:
      return mask
    recent = key_slots[None, :] > query_slots[:, None] - self.sliding_window   # [T, S]
    return mask & recent[None]

  def __call__(self, x, positions, input_mask, cache=None, segment_ids=None, media=None, media_index=None,
               return_hidden: bool = False):
    """x [B, T, D] input embeddings, positions int [B, T], input_mask int [B, T] (0 = padding key).

    segment_ids int [B, T] (optional, no cache): shared-prefix packing. Segment 0 (e.g. <bos> + image) is seen
    by every token; a token of segment k > 0 sees segment 0 and earlier tokens of its own segment only, so
    several independent turns about one image train in one row.

    media [B, T_img, M, D] and media_index int [B, T] (only with cross_attention): media tokens of T_img images
    per row and, per token, how many <image> markers are at or before it; see the module docstring. While
    decoding, both may be omitted: the cached media and media_index are used.

    Without a cache: full causal pass, returns (logits [B, T, V] float32, None).
    With a cache (see module docstring): returns (logits [B, T, V] float32, updated cache).
    return_hidden=True returns the last block's output [B, T, D] instead of logits; `head` maps any of its
    positions to logits (a loss over a few positions then needs the vocabulary projection at those only).
    """
    b, t = x.shape[:2]
    x = x.astype(self.dtype)
    xattn = self._media_context(b, t, cache, media, media_index)

    def cross_attend(i, x):
      if xattn is None or i not in self.xattn_layers:
        return x
      kvs, xmask, _ = xattn
      return self.xattn_layers[i](x, mask=xmask, kv=kvs[i])                  # [B, T, D]

    if cache is None:
      if t > self.max_len:
        raise ValueError(f'sequence length {t} exceeds model.lm.max_len={self.max_len}')
      slots = jnp.arange(t)
      mask = causal_padding_mask(slots, slots, input_mask)                    # [B, T, T]
      mask = self._window(mask, slots, slots)
      if segment_ids is not None:
        seg_q, seg_k = segment_ids[:, :, None], segment_ids[:, None, :]
        mask &= (seg_k == 0) | (seg_k == seg_q)                                # [B, T, T]
      if self.scan_layers:
        x, _ = self.layers(x, mask, positions, None, None)                    # [B, T, D]
      else:
        for i, layer in enumerate(self.layers):
          x = cross_attend(i, x)
          x, _ = layer(x, mask, positions)
      new_cache = None
    else:
      index = cache['index']
      key_mask = jax.lax.dynamic_update_slice(cache['mask'], input_mask.astype(jnp.int32), (0, index))  # [B, S]
      mask = causal_padding_mask(index + jnp.arange(t), jnp.arange(key_mask.shape[1]), key_mask)      # [B, T, S]
      mask = self._window(mask, index + jnp.arange(t), jnp.arange(key_mask.shape[1]))
      if self.scan_layers:       # layer i reads and writes cache['k'][i], cache['v'][i]
        x, (k, v) = self.layers(x, mask, positions, (cache['k'], cache['v']), index)  # k, v [layers, B, S, Hkv, Dh]
      else:
        ks, vs = [], []
        for i, layer in enumerate(self.layers):
          x = cross_attend(i, x)
          x, (k, v) = layer(x, mask, positions, (cache['k'][i], cache['v'][i]), index)
          ks.append(k)
          vs.append(v)
        k, v = jnp.stack(ks), jnp.stack(vs)
      new_cache = {'k': k, 'v': v, 'mask': key_mask, 'index': index + t}
      if xattn is not None:
        new_cache.update(xattn[2])
    if return_hidden:
      return x, new_cache                                                      # [B, T, D]
    return self.head(x), new_cache                                             # [B, T, V]

  def head(self, x):
    """Final norm + vocabulary projection: hidden [..., D] (as __call__(return_hidden=True) gives) -> logits
    [..., V] float32."""
    x = self.norm(x)
    if self.tie_embeddings:
      logits = self.embed_tokens.attend(x)
    else:
      logits = self.lm_head(x)
    return logits.astype(jnp.float32)
