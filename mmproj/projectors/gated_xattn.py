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
  fields below (`lm_injection()`; out_dim is the LM width). Only `resampler` shapes this module's own params.
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
    return self._resampler(name='resampler')(x, grid=grid, deterministic=deterministic, **extra)  # [B, M, Dt]

  @nn.nowrap
  def _resampler(self, **kwargs) -> nn.Module:
    """The resampler projector (in_dim -> out_dim, built through the registry); kwargs (name, parent) go to it."""
    return registry.instantiate(_resampler_cfg(self.resampler), self.in_dim, self.out_dim, self.dtype, **kwargs)

  # -------------------------------------------------------------------------------------------- config

  @nn.nowrap
  def check(self) -> None:
    for key in ('every', 'heads', 'ff_mult'):
      check_int(key, getattr(self, key))
    for key in ('kv_heads', 'head_dim', 'ff_dim'):
      check_int(key, getattr(self, key), optional=True)
    if self.kv_heads is not None and self.heads % self.kv_heads:
      raise ValueError(f'model.projector.kv_heads={self.kv_heads} does not divide model.projector.heads={self.heads}')
    for key, allowed in (('media_mask', MEDIA_MASKS), ('variant', VARIANTS), ('empty_rows', EMPTY_ROWS),
                         ('act', ACTIVATIONS)):
      check_choice(key, getattr(self, key), allowed)
    sub = _resampler_cfg(self.resampler)   # outside the try: a malformed spec's message names the field already
    try:
      resampler = self._resampler(parent=None)
      if getattr(resampler, 'injects_into_lm', False):
        raise ValueError(f'{sub["name"]!r} injects into the LM itself; use a projector that emits tokens')
      resampler.check()
    except ValueError as e:
      raise ValueError(f'model.projector.resampler: {e}') from None

  @nn.nowrap
  def check_injection(self, depth: int) -> None:
    """Checks the fields that depend on the LM (its width out_dim, its depth); ValueError naming the field."""
    if self.every > depth:
      raise ValueError(f'model.projector.every={self.every} exceeds model.lm.depth={depth}: no gated block would '
                       'exist')
    if self.head_dim is None and self.out_dim % self.heads:
      raise ValueError(f'model.projector.heads={self.heads} does not divide the LM width {self.out_dim} '
                       '(set model.projector.head_dim)')

  @nn.nowrap
  def block_fields(self) -> dict:
    """GatedCrossAttentionBlock fields (except dtype) for the LM of width out_dim."""
    width, heads = self.out_dim, self.heads
    return dict(width=width, num_heads=heads, num_kv_heads=self.kv_heads or heads,
                head_dim=self.head_dim or width // heads, mlp_dim=self.ff_dim or self.ff_mult * width,
                variant=self.variant, act=self.act, norm_eps=float(self.norm_eps), empty_rows=self.empty_rows)

  @nn.nowrap
  def lm_injection(self) -> dict:
    """What the LM needs to build and place its gated blocks: every, media_mask and the block fields."""
    return dict(every=self.every, media_mask=self.media_mask, **self.block_fields())

  @nn.nowrap
  def build_block(self) -> GatedCrossAttentionBlock:
    """One unbound GatedCrossAttentionBlock (compute in dtype) for the LM of width out_dim: the converter's entry
    point (mmproj/convert/mllama.py)."""
    return GatedCrossAttentionBlock(**self.block_fields(), dtype=self.dtype, parent=None)

  # -------------------------------------------------------------------------------------------- counts

  @nn.nowrap
  def num_output_tokens(self, grid) -> int:
    return self._resampler(parent=None).num_output_tokens(grid)

  @nn.nowrap
  def param_count(self) -> int:
    """Params under 'projector' (the resampler's); the gated blocks under 'lm' are `injected_param_count`."""
    return self._resampler(parent=None).param_count()

  @nn.nowrap
  def block_param_count(self) -> int:
    f = self.block_fields()
    d, h, k, dh, ff = f['width'], f['num_heads'], f['num_kv_heads'], f['head_dim'], f['mlp_dim']
    attn = 2 * d * h * dh + 2 * d * k * dh
    if f['variant'] == 'mllama':
      return 2 * d + 2 * dh + attn + 2 + 3 * d * ff
    return 4 * d + attn + 2 + 2 * d * ff

  @nn.nowrap
  def injected_param_count(self, depth: int) -> int:
    """Params the gated blocks add under 'lm' for an LM of `depth` blocks (and width out_dim)."""
    return len(xattn_layer_ids(depth, self.every)) * self.block_param_count()
