"""Decoder-only language models. `build_lm(cfg_lm, dtype)` maps `cfg.model.lm` to a module."""

from typing import Any

import jax.numpy as jnp

from mmproj.lm.llama import DecoderBlock, Llama, make_cache


def build_lm(cfg: Any, dtype: Any = jnp.float32) -> Llama:
  """cfg.model.lm (ConfigDict / FrozenConfigDict / dict) -> Llama (compute dtype `dtype`)."""
  return Llama(**dict(cfg), dtype=dtype)


__all__ = ['DecoderBlock', 'Llama', 'build_lm', 'make_cache']
