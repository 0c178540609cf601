"""Flamingo's gated cross-attention block (GATED XATTN-DENSE; Alayrac et al. 2022, arXiv:2204.14198) and the
media masks it attends under. `variant='mllama'` is the block as Llama 3.2 Vision builds it (transformers
`MllamaCrossAttentionDecoderLayer`: RMSNorms, q/k head norms, GQA, SwiGLU).

The LM places one before every `every`-th decoder block when it is given `cross_attention` (an injecting projector
such as gated_xattn asks for them, mmproj/projectors/gated_xattn.py); text tokens attend to media tokens:

  text x [B, T, D]      media_index [B, T] = cumsum(<image> markers): images at or before each token
    |
    |---> LN -> q ---> softmax(q k^T / sqrt(d) + media mask) v -> o_proj ---> * tanh(alpha_xattn) ---> (+)
    |                  k, v <- media                                             alpha_xattn = 0 at init
    |<------------------------------------------------------------------------------------------------'
    |---> LN -> FFW ---------------------------------------------------------> * tanh(alpha_dense) ---> (+)
    |<--------------------------------------------------------------------------alpha_dense = 0 at init
    v
  the next LM block

      x = x + tanh(alpha_xattn) * xattn(LN(x), media)
      x = x + tanh(alpha_dense) * ffw(LN(x))

Both gates start at 0, so at initialisation the model is exactly the text-only LM.

Media mask (media_mask), for a text token t with media_index[t] = k images at or before it:
  'latest': t sees only the media tokens of image k (Flamingo: "only attend to the immediately preceding image");
  'all':    t sees the media tokens of images 1..k.
A token before any image (k = 0) sees nothing: its cross-attention output is exactly zero (no NaN). With
variant='mllama' its FFW output is zeroed as well (Llama 3.2's full_text_row_masked_out_mask). empty_rows='unmasked'
reproduces transformers' Mllama instead, which drops the mask on such rows (the token attends to every media
token) and zeroes only the FFW output; Meta's Llama 3.2 reference and Flamingo zero the attention ('zero').

Variants (block internals):
  'flamingo': LayerNorm; q/k/v/o without biases; GELU FFW Linear(D, F) act Linear(F, D), no biases.
  'mllama':   RMSNorm; RMSNorm over d on every q and k head; GQA; SwiGLU FFW (gate/up/down, no biases).

Shapes: x [B, T, D], media [B, S, D] (S = T_img * M, image after image), mask bool [B, T, S] -> [B, T, D];
q_proj [D, H, d] ('embed', 'heads', 'head_dim'), k_proj/v_proj [D, K, d] ('embed', 'kv_heads', 'head_dim'),
o_proj [H, d, D] ('heads', 'head_dim', 'embed'), gates [1] ('norm',), FFW [D, F] ('embed', 'mlp') / [F, D].
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mmproj.layers.attention import dot_product_attention
from mmproj.layers.mlp import GeluMLP, SwiGLU
from mmproj.layers.norms import LayerNorm, RMSNorm

Dtype = Any

VARIANTS = ('flamingo', 'mllama')
MEDIA_MASKS = ('latest', 'all')
EMPTY_ROWS = ('zero', 'unmasked')


# ----------------------------------------------------------------------------------------------- media mask


def media_index(tokens, image_token_id: int, input_mask=None):
  """Images at or before each token: cumsum of the <image> markers (padding not counted). -> int32 [B, T]."""
  is_image = tokens == image_token_id                                         # [B, T]
  if input_mask is not None:
    is_image &= jnp.asarray(input_mask).astype(bool)
  return jnp.cumsum(is_image.astype(jnp.int32), axis=1)                       # [B, T]


def media_ids(num_images: int, tokens_per_image: int):
  """1-based image number of each media token of a row laid out image after image. -> int32 [S]."""
  return jnp.repeat(jnp.arange(1, num_images + 1, dtype=jnp.int32), tokens_per_image)  # [S]


def media_attention_mask(index, ids, mode: str = 'latest'):
  """Which media tokens each text token may attend to.

  index int [B, T]: media_index of each text token (0 = no image yet). ids int [S] or [B, S]: image number of
  each media token (0 = a padding slot, never visible). mode 'latest' (only image index[t]) or 'all' (images
  1..index[t]). -> bool [B, T, S]; a row of a token before any image is all False.
  """
  if mode not in MEDIA_MASKS:
    raise ValueError(f'media_mask={mode!r} is not one of {MEDIA_MASKS}')
  ids = jnp.asarray(ids)
  ids = ids[None, None, :] if ids.ndim == 1 else ids[:, None, :]              # [B|1, 1, S]
  index = jnp.asarray(index)[:, :, None]                                      # [B, T, 1]
  visible = (ids == index) if mode == 'latest' else (ids <= index)            # [B, T, S]
  return visible & (ids > 0)


def xattn_layer_ids(depth: int, every: int) -> list[int]:
  """LM blocks that get a gated block in front of them: the every-th, 2*every-th, ... (0-based every-1, ...)."""
  return [i for i in range(depth) if (i + 1) % every == 0]


# ----------------------------------------------------------------------------------------------- the block


def _proj(features, axis, names, dtype):
  return nn.DenseGeneral(features=features, axis=axis, use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                         kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), names))


class MaskedCrossAttention(nn.Module):
  """Text queries attend to media keys/values (GQA; optional RMSNorm on q and k heads, as Mllama).

  `kv(media)` and `__call__(x, kv, mask)` are separate so a decoder computes the media's k/v once and caches them.
  """

  out_dim: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  qk_norm: bool = False
  norm_eps: float = 1e-5
  dtype: Dtype = jnp.float32

  def setup(self):
    h, k, d = self.num_heads, self.num_kv_heads, self.head_dim
    self.q_proj = _proj((h, d), -1, ('embed', 'heads', 'head_dim'), self.dtype)
    self.k_proj = _proj((k, d), -1, ('embed', 'kv_heads', 'head_dim'), self.dtype)
    self.v_proj = _proj((k, d), -1, ('embed', 'kv_heads', 'head_dim'), self.dtype)
    self.o_proj = _proj(self.out_dim, (-2, -1), ('heads', 'head_dim', 'embed'), self.dtype)
    if self.qk_norm:
      self.q_norm = RMSNorm(self.norm_eps, self.dtype)
      self.k_norm = RMSNorm(self.norm_eps, self.dtype)

  def kv(self, media):
    """media [B, S, D] -> (k, v), each [B, S, K, d] (k head-normed for Mllama)."""
    k = self.k_proj(media)                                                    # [B, S, K, d]
    if self.qk_norm:
      k = self.k_norm(k)
    return k, self.v_proj(media)                                              # [B, S, K, d] x 2

  def __call__(self, x, kv, mask):
    """x [B, T, D] (normed text), kv from `kv`, mask bool [B, T, S] -> [B, T, D]."""
    q = self.q_proj(x)                                                        # [B, T, H, d]
    if self.qk_norm:
      q = self.q_norm(q)
    k, v = kv
    out = dot_product_attention(q, k.astype(self.dtype), v.astype(self.dtype), mask)  # [B, T, H, d]
    return self.o_proj(out)                                                   # [B, T, D]


class GatedCrossAttentionBlock(nn.Module):
  """Flamingo's GATED XATTN-DENSE: x [B, T, D] attends to media [B, S, D] through two tanh gates (0 at init).

      y = block.apply({'params': p}, x, media=media, mask=mask)     # mask bool [B, T, S] (None: all visible)

  `grid` and `deterministic` are accepted (and ignored) so converted blocks share the projector call signature.
  Param names follow transformers MllamaCrossAttentionDecoderLayer: input_layernorm, cross_attn/{q,k,v,o}_proj
  (+ q_norm, k_norm), attn_gate, post_attention_layernorm, mlp, mlp_gate.
  """

  width: int                     # D, the LM width (text and media tokens)
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  variant: str = 'flamingo'
  act: str = 'gelu'              # flamingo FFW activation (mllama: SwiGLU's silu)
  norm_eps: float = 1e-5
  empty_rows: str = 'zero'       # see the module docstring
  dtype: Dtype = jnp.float32

  def setup(self):
    mllama = self.variant == 'mllama'
    norm = (lambda: RMSNorm(self.norm_eps, self.dtype)) if mllama else (lambda: LayerNorm(self.norm_eps, self.dtype))
    gate = nn.with_logical_partitioning(nn.initializers.zeros, ('norm',))
    self.input_layernorm = norm()
    self.cross_attn = MaskedCrossAttention(self.width, self.num_heads, self.num_kv_heads, self.head_dim, qk_norm=mllama,
                                           norm_eps=self.norm_eps, dtype=self.dtype)
    self.attn_gate = self.param('attn_gate', gate, (1,), jnp.float32)        # alpha_xattn
    self.post_attention_layernorm = norm()
    if mllama:
      self.mlp = SwiGLU(self.mlp_dim, dtype=self.dtype)
    else:
      self.mlp = GeluMLP(self.mlp_dim, act=self.act, use_bias=False, dtype=self.dtype)
    self.mlp_gate = self.param('mlp_gate', gate, (1,), jnp.float32)          # alpha_dense

  def matmul_flops(self, length: int, media_len: int) -> dict[str, int]:
    """Matmul FLOPs of one row of `length` text tokens attending to `media_len` media tokens (D width, H heads, K
    kv heads, d head_dim, F mlp_dim): 'text' q, o and the FFW (2 * 2 * L * D * H * d + 2 (3 for SwiGLU) *
    2 * L * D * F), 'media' k, v (2 * 2 * S * D * K * d), 'attention' scores and weighted sum (2 * 2 * L * S * H
    * d)."""
    d, h, k, dh, f = self.width, self.num_heads, self.num_kv_heads, self.head_dim, self.mlp_dim
    ffw = (3 if self.variant == 'mllama' else 2) * 2 * length * d * f
    return dict(text=2 * 2 * length * d * h * dh + ffw, media=2 * 2 * media_len * d * k * dh,
                attention=2 * 2 * length * media_len * h * dh)

  def media_kv(self, media):
    """media [B, S, D] -> the cross-attention's (k, v), each [B, S, K, d]: fixed while decoding, so cacheable."""
    return self.cross_attn.kv(media.astype(self.dtype))

  def __call__(self, x, media=None, *, mask=None, kv=None, grid=None, deterministic: bool = True):
    """x [B, T, D]; media [B, S, D] or its precomputed kv; mask bool [B, T, S] (True = may attend) -> [B, T, D]."""
    del grid, deterministic  # no spatial structure, no dropout
    if self.variant not in VARIANTS:
      raise ValueError(f'variant={self.variant!r} is not one of {VARIANTS}')
    if self.empty_rows not in EMPTY_ROWS:
      raise ValueError(f'empty_rows={self.empty_rows!r} is not one of {EMPTY_ROWS}')
    if kv is None:
      if media is None:
        raise ValueError('GatedCrossAttentionBlock needs media [B, S, D] or its kv')
      kv = self.media_kv(media)
    b, t = x.shape[:2]
    if mask is None:
      mask = jnp.ones((b, t, kv[0].shape[1]), bool)
    has_media = jnp.any(mask, axis=-1, keepdims=True)                         # [B, T, 1]
    if self.empty_rows == 'unmasked':   # transformers' Mllama: a row with no visible media sees all of them
      mask = mask | ~has_media                                                # [B, T, S]
    x = x.astype(self.dtype)

    h = self.cross_attn(self.input_layernorm(x), kv, mask)                    # [B, T, D]; empty rows: 0
    x = x + jnp.tanh(self.attn_gate).astype(self.dtype) * h                   # [B, T, D]

    h = self.mlp(self.post_attention_layernorm(x))                            # [B, T, D]
    if self.variant == 'mllama':        # full_text_row_masked_out_mask: no media seen -> no FFW update
      h = h * has_media.astype(self.dtype)
    return x + jnp.tanh(self.mlp_gate).astype(self.dtype) * h                 # [B, T, D]
