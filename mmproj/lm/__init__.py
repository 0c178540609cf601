"""Decoder-only language models. `build_lm(cfg_lm, dtype)` maps `cfg.model.lm` to a module."""

import dataclasses
from typing import Any

import jax.numpy as jnp

from mmproj.lm.llama import DecoderBlock, Llama, make_cache


def build_lm(cfg: Any, dtype: Any = jnp.float32, cross_attention: Any = None) -> Llama:
  """cfg.model.lm (ConfigDict / FrozenConfigDict / dict) -> Llama (compute dtype `dtype`).

  cross_attention: None, or the gated cross-attention blocks an injecting projector asks for
  (e.g. `projectors.build(cfg.model.projector, ...).lm_injection()` of a gated_xattn projector, whose out_dim is
  the LM width); see mmproj/lm/llama.py.
  """
  kwargs = dict(cfg)
  if kwargs.get('remat') is None:             # None: not set for this tower (the module's default)
    kwargs.pop('remat', None)
  return Llama(**kwargs, cross_attention=cross_attention, dtype=dtype)


def lm_fields(cfg: Any) -> dict[str, Any]:
  """Every field of the Llama cfg.model.lm builds, its defaults filled in and head_dim resolved (None -> width //
  num_heads): what code outside the module (converters, exporters) reads instead of re-defaulting the config."""
  lm = build_lm(cfg)
  fields = {f.name: getattr(lm, f.name) for f in dataclasses.fields(lm)
            if f.name not in ('parent', 'name', 'dtype', 'cross_attention')}   # not cfg.model.lm's
  return {**fields, 'head_dim': lm.dim_per_head}


__all__ = ['DecoderBlock', 'Llama', 'build_lm', 'lm_fields', 'make_cache']
