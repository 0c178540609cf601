"""Gated cross-attention (GATED XATTN-DENSE) — Flamingo (Alayrac et al. 2022, "Flamingo: a Visual Language Model
for Few-Shot Learning", arXiv:2204.14198). `variant='mllama'` is the same block as Llama 3.2 Vision builds it
(transformers `MllamaCrossAttentionDecoderLayer`: RMSNorms, q/k head norms, GQA, SwiGLU).

Unlike the other projectors this one writes nothing into the text sequence: it maps the encoder's tokens to
*media* tokens, and the LM cross-attends to them from gated blocks inserted before every `every`-th decoder block
(before LM blocks every-1, 2*every-1, ...; params under lm/xattn_layers_{i}, i = the LM block the gated block
precedes). Each image is marked in the text by one <image> token, which keeps its text embedding.

  image(s) [B, T_img, H, W, 3] --encoder--> [B*T_img, N, Dv] --resampler--> media [B, T_img, M, Dt]
  (resampler: 'linear' by default, or any registered projector that does not itself inject, e.g. a Perceiver)

  text x [B, T, D]      media_index [B, T] = cumsum(<image> markers): images at or before each token
    |
    |---> LN -> q ---> softmax(q k^T / sqrt(d) + media mask) v -> o_proj ---> * tanh(alpha_xattn) ---> (+)
    |                  k, v <- media                                             alpha_xattn = 0 at init
    |<------------------------------------------------------------------------------------------------'
    |---> LN -> FFW ---------------------------------------------------------> * tanh(alpha_dense) ---> (+)
    |<--------------------------------------------------------------------------alpha_dense = 0 at init
    v
  LM block i (self-attention + MLP), then the next gated block before LM block i + every ...

      x = x + tanh(alpha_xattn) * xattn(LN(x), media)
      x = x + tanh(alpha_dense) * ffw(LN(x))

Both gates start at 0, so at initialisation the model is exactly the text-only LM (Flamingo keeps the pretrained
LM intact and lets the gates open during training).

Media mask (media_mask), for a text token t with media_index[t] = k images at or before it:
  'latest': t sees only the media tokens of image k (Flamingo: "only attend to the immediately preceding image");
  'all':    t sees the media tokens of images 1..k.
A token before any image (k = 0) sees nothing: its cross-attention output is exactly zero (no NaN; fully masked
softmax rows give zero, see mmproj.layers.dot_product_attention). With variant='mllama' its FFW output is zeroed
as well (Llama 3.2's full_text_row_masked_out_mask). empty_rows='unmasked' reproduces transformers' Mllama
instead, which drops the mask on such rows (the token attends to every media token) and zeroes only the FFW
output; Meta's Llama 3.2 reference and Flamingo zero the attention, which is the default ('zero').

Variants (block internals):
  'flamingo': LayerNorm; q/k/v/o without biases; GELU FFW Linear(D, F) act Linear(F, D), no biases; F = ff_mult*D.
  'mllama':   RMSNorm; RMSNorm over d on every q and k head; GQA; SwiGLU FFW (gate/up/down, no biases).

  tokens in -> out:  N = h*w encoder tokens -> M media tokens per image, M = the resampler's count (linear: M = N);
                     the LM sequence holds 1 <image> marker per image (MultimodalLM.num_image_tokens = 1)
  params:            under 'projector' (param_count): the resampler's; linear: Dv*Dt + Dt
                     under 'lm' (injected_param_count): n_blocks = floor(lm.depth / every) gated blocks, each with
                     D = Dt, H = heads, K = kv_heads (default H), d = head_dim (default D // H),
                     F = ff_dim (default ff_mult * D):
                       flamingo: 4D + 2*D*H*d + 2*D*K*d + 2 + 2*D*F      (2 LayerNorms, q/o, k/v, 2 gates, FFW)
                       mllama:   2D + 2d + 2*D*H*d + 2*D*K*d + 2 + 3*D*F  (2 RMSNorms, q/k norms, ..., SwiGLU)
  spatial locality:  not kept — every text token mixes all the media tokens it may see, and the media carry no
                     position information of their own (a linear resampler keeps one media token per patch, but
                     attention is order-agnostic)
  shapes:            projector: x [B, N, Dv] -> media [B, M, Dt]
                     gated block: x [B, T, D], media [B, S, D] (S = T_img * M, image after image),
                     mask bool [B, T, S] -> [B, T, D];  q_proj [D, H, d] ('embed', 'heads', 'head_dim'),
                     k_proj/v_proj [D, K, d] ('embed', 'kv_heads', 'head_dim'), o_proj [H, d, D]
                     ('heads', 'head_dim', 'embed'), gates [1] ('norm',), FFW [D, F] ('embed', 'mlp') / [F, D]
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mmproj import projectors
from mmproj.layers import ACTIVATIONS, GeluMLP, LayerNorm, RMSNorm, SwiGLU, dot_product_attention
from mmproj.projectors import check_choice, check_int, register

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


# ----------------------------------------------------------------------------------------------- the projector


def _resampler_cfg(spec: Any) -> dict:
  """`resampler` field (a projector name, or a mapping with 'name' and its hyper-parameters) -> projector cfg."""
  if isinstance(spec, str):
    return {'name': spec}
  if hasattr(spec, 'keys') and 'name' in spec:
    return dict(spec)
  raise ValueError(f'model.projector.resampler must be a projector name or a mapping with "name", got {spec!r}')


@register('gated_xattn')
class GatedXAttnProjector(nn.Module):
  """Visual tokens [B, N, Dv] -> media tokens [B, M, Dt] for the LM's gated cross-attention blocks.

  `injects_into_lm = True` tells MultimodalLM not to merge the output into the text sequence: it puts one <image>
  marker per image in the sequence and hands the media to the LM, which builds GatedCrossAttentionBlocks from the
  fields below (`lm_injection`). Only `resampler` shapes this module's own params.
  """

  injects_into_lm = True          # class attribute (not a config field): the model wires the LM injection

  in_dim: int
  out_dim: int
  every: int = 1                  # a gated block before every `every`-th LM block
  heads: int = 4
  kv_heads: int | None = None     # None = heads (GQA when smaller)
  head_dim: int | None = None     # None = out_dim // heads
  ff_mult: int = 4                # FFW width F = ff_mult * out_dim ...
  ff_dim: int | None = None       # ... unless given explicitly
  act: str = 'gelu'               # flamingo FFW activation (mllama: SwiGLU, always silu)
  norm_eps: float = 1e-5          # PyTorch LayerNorm / Mllama rms_norm_eps
  media_mask: str = 'latest'      # 'latest' | 'all'
  variant: str = 'flamingo'       # 'flamingo' | 'mllama'
  empty_rows: str = 'zero'        # 'zero' | 'unmasked' (transformers' Mllama)
  resampler: Any = 'linear'       # visual tokens -> media tokens: a registered, non-injecting projector
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, grid=None, deterministic: bool = True, **extra):     # x [B, N, Dv]
    # The resampler hook: Flamingo uses a Perceiver resampler (M learned latents); any registered projector
    # that maps [B, N, Dv] -> [B, M, Dt] plugs in by name, its params under projector/resampler.
    cfg = _resampler_cfg(self.resampler)
    cls = projectors.get(cfg['name'])
    resampler = cls(in_dim=self.in_dim, out_dim=self.out_dim, dtype=self.dtype, name='resampler',
                    **projectors._hparams(cfg))
    return resampler(x, grid=grid, deterministic=deterministic, **extra)      # [B, M, Dt]

  # -------------------------------------------------------------------------------------------- config

  @classmethod
  def _get(cls, cfg, key):
    return cfg.get(key, _DEFAULTS[key])

  @classmethod
  def check_config(cls, cfg) -> None:
    for key in ('every', 'heads', 'ff_mult', 'kv_heads', 'head_dim', 'ff_dim'):
      check_int(cfg, key, _DEFAULTS[key])
    kv_heads, heads = cls._get(cfg, 'kv_heads'), cls._get(cfg, 'heads')
    if kv_heads is not None and heads % kv_heads:
      raise ValueError(f'model.projector.kv_heads={kv_heads} does not divide model.projector.heads={heads}')
    for key, allowed in (('media_mask', MEDIA_MASKS), ('variant', VARIANTS), ('empty_rows', EMPTY_ROWS),
                         ('act', ACTIVATIONS)):
      check_choice(cfg, key, _DEFAULTS[key], allowed)
    sub = _resampler_cfg(cls._get(cfg, 'resampler'))
    try:
      sub_cls = projectors.get(sub['name'])
      if getattr(sub_cls, 'injects_into_lm', False):
        raise ValueError(f'{sub["name"]!r} injects into the LM itself; use a projector that emits tokens')
      projectors._hparams(sub)
      if hasattr(sub_cls, 'check_config'):
        sub_cls.check_config(sub)
    except ValueError as e:
      raise ValueError(f'model.projector.resampler: {e}') from None

  @classmethod
  def check_injection(cls, cfg, width: int, depth: int) -> None:
    """Checks the fields that depend on the LM (width, depth); ValueError naming the field."""
    every = cls._get(cfg, 'every')
    if every > depth:
      raise ValueError(f'model.projector.every={every} exceeds model.lm.depth={depth}: no gated block would exist')
    if cls._get(cfg, 'head_dim') is None and width % cls._get(cfg, 'heads'):
      raise ValueError(f'model.projector.heads={cls._get(cfg, "heads")} does not divide the LM width {width} '
                       '(set model.projector.head_dim)')

  @classmethod
  def block_fields(cls, cfg, width: int) -> dict:
    """GatedCrossAttentionBlock fields (except dtype) for an LM of width `width`."""
    heads = cls._get(cfg, 'heads')
    variant = cls._get(cfg, 'variant')
    return dict(width=width, num_heads=heads, num_kv_heads=cls._get(cfg, 'kv_heads') or heads,
                head_dim=cls._get(cfg, 'head_dim') or width // heads,
                mlp_dim=cls._get(cfg, 'ff_dim') or cls._get(cfg, 'ff_mult') * width, variant=variant,
                act=cls._get(cfg, 'act'), norm_eps=float(cls._get(cfg, 'norm_eps')),
                empty_rows=cls._get(cfg, 'empty_rows'))

  @classmethod
  def lm_injection(cls, cfg, width: int) -> dict:
    """What the LM needs to build and place its gated blocks: every, media_mask and the block fields."""
    return dict(every=cls._get(cfg, 'every'), media_mask=cls._get(cfg, 'media_mask'), **cls.block_fields(cfg, width))

  @classmethod
  def build_block(cls, cfg, width: int, dtype: Any = jnp.float32) -> GatedCrossAttentionBlock:
    """One GatedCrossAttentionBlock from a projector cfg (the converter's entry point)."""
    projectors.validate(dict(cfg, name='gated_xattn'), in_dim=width, out_dim=width)
    return GatedCrossAttentionBlock(**cls.block_fields(cfg, width), dtype=dtype)

  # -------------------------------------------------------------------------------------------- counts

  @classmethod
  def num_output_tokens(cls, cfg, grid) -> int:
    return projectors.num_output_tokens(_resampler_cfg(cls._get(cfg, 'resampler')), grid)

  @classmethod
  def param_count(cls, cfg, in_dim: int, out_dim: int) -> int:
    """Params under 'projector' (the resampler's); the gated blocks under 'lm' are `injected_param_count`."""
    return projectors.param_count(_resampler_cfg(cls._get(cfg, 'resampler')), in_dim, out_dim)

  @classmethod
  def block_param_count(cls, cfg, width: int) -> int:
    f = cls.block_fields(cfg, width)
    d, h, k, dh, ff = width, f['num_heads'], f['num_kv_heads'], f['head_dim'], f['mlp_dim']
    attn = 2 * d * h * dh + 2 * d * k * dh
    if f['variant'] == 'mllama':
      return 2 * d + 2 * dh + attn + 2 + 3 * d * ff
    return 4 * d + attn + 2 + 2 * d * ff

  @classmethod
  def injected_param_count(cls, cfg, width: int, depth: int) -> int:
    """Params the gated blocks add under 'lm' for an LM of `width` and `depth` blocks."""
    return len(xattn_layer_ids(depth, cls._get(cfg, 'every'))) * cls.block_param_count(cfg, width)


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(GatedXAttnProjector)
             if f.default is not dataclasses.MISSING}
