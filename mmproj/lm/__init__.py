"""Decoder-only language models. `build_lm(cfg_lm, dtype)` maps `cfg.model.lm` to a module."""

from typing import Any

import jax.numpy as jnp

from mmproj.lm.llama import DecoderBlock, Llama, make_cache


def build_lm(cfg: Any, dtype: Any = jnp.float32, cross_attention: Any = None) -> Llama:
  """cfg.model.lm (ConfigDict / FrozenConfigDict / dict) -> Llama (compute dtype `dtype`).

  cross_attention: None, or the gated cross-attention blocks an injecting projector asks for
  (e.g. GatedXAttnProjector.lm_injection(cfg.model.projector, width)); see mmproj/lm/llama.py.
  """
  kwargs = dict(cfg)
  if kwargs.get('remat') is None:             # None: not set for this tower (the module's default)
    kwargs.pop('remat', None)
  return Llama(**kwargs, cross_attention=cross_attention, dtype=dtype)


__all__ = ['DecoderBlock', 'Llama', 'build_lm', 'make_cache']
