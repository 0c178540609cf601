"""Gated cross-attention (GATED XATTN-DENSE) — Flamingo (Alayrac et al. 2022, "Flamingo: a Visual Language Model
for Few-Shot Learning", arXiv:2204.14198). `variant='mllama'` builds the blocks as Llama 3.2 Vision does
(transformers `MllamaCrossAttentionDecoderLayer`).

Unlike the other projectors this one writes nothing into the text sequence: it maps the encoder's tokens to
*media* tokens, and the LM cross-attends to them from gated blocks inserted before every `every`-th decoder block
(before LM blocks every-1, 2*every-1, ...; params under lm/xattn_layers_{i}, i = the LM block the gated block
precedes). Each image is marked in the text by one <image> token, which keeps its text embedding. The block, its
gates (0 at init: the model starts as the text-only LM) and the media masks are
mmproj/layers/gated_cross_attention.py; this module holds the projector, which asks the LM for those blocks
(`lm_injection`).

  image(s) [B, T_img, H, W, 3] --encoder--> [B*T_img, N, Dv] --resampler--> media [B, T_img, M, Dt]
  (resampler: 'linear' by default, or any registered projector that does not itself inject, e.g. a Perceiver)
  text x [B, T, D] --LM block i-1--> gated block(x, media; media_index = cumsum(<image> markers)) --LM block i--> ...

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
  shapes:            projector: x [B, N, Dv] -> media [B, M, Dt]; gated block: x [B, T, D], media [B, S, D]
                     (S = T_img * M), mask bool [B, T, S] -> [B, T, D]
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mmproj.layers import ACTIVATIONS
from mmproj.layers.gated_cross_attention import (EMPTY_ROWS, MEDIA_MASKS, VARIANTS, GatedCrossAttentionBlock,
                                                 xattn_layer_ids)
from mmproj.projectors import registry
from mmproj.projectors.registry import check_choice, check_int, register


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
    cls = registry.get(cfg['name'])
    resampler = cls(in_dim=self.in_dim, out_dim=self.out_dim, dtype=self.dtype, name='resampler',
                    **registry._hparams(cfg))
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
      sub_cls = registry.get(sub['name'])
      if getattr(sub_cls, 'injects_into_lm', False):
        raise ValueError(f'{sub["name"]!r} injects into the LM itself; use a projector that emits tokens')
      registry._hparams(sub)
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
    registry.validate(dict(cfg, name='gated_xattn'), in_dim=width, out_dim=width)
    return GatedCrossAttentionBlock(**cls.block_fields(cfg, width), dtype=dtype)

  # -------------------------------------------------------------------------------------------- counts

  @classmethod
  def num_output_tokens(cls, cfg, grid) -> int:
    return registry.num_output_tokens(_resampler_cfg(cls._get(cfg, 'resampler')), grid)

  @classmethod
  def param_count(cls, cfg, in_dim: int, out_dim: int) -> int:
    """Params under 'projector' (the resampler's); the gated blocks under 'lm' are `injected_param_count`."""
    return registry.param_count(_resampler_cfg(cls._get(cfg, 'resampler')), in_dim, out_dim)

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
