"""Modality encoders. `build_encoder(cfg_encoder, dtype)` maps `cfg.model.encoder` to a module."""

import dataclasses
from typing import Any

import jax.numpy as jnp

from mmproj.encoders.vit import ViT

ENCODERS = {'vit': ViT}


def build_encoder(cfg: Any, dtype: Any = jnp.float32) -> ViT:
  """cfg.model.encoder (ConfigDict / FrozenConfigDict / dict) -> encoder module (compute dtype `dtype`)."""
  kwargs = dict(cfg)
  name = kwargs.pop('name', 'vit')
  if kwargs.get('remat') is None:             # None: not set for this tower (the module's default)
    kwargs.pop('remat', None)
  for key in ('image_mean', 'image_std'):     # ConfigDict lists -> tuples (module attributes must be hashable)
    if kwargs.get(key) is not None:
      kwargs[key] = tuple(float(v) for v in kwargs[key])
  if name not in ENCODERS:
    raise ValueError(f'unknown model.encoder.name {name!r}; known: {sorted(ENCODERS)}')
  return ENCODERS[name](**kwargs, dtype=dtype)


def encoder_fields(cfg: Any) -> dict[str, Any]:
  """Every field of the encoder cfg.model.encoder builds (its name included), the module's defaults filled in:
  what code outside the module (converters, exporters) reads instead of re-defaulting the config."""
  encoder = build_encoder(cfg)
  fields = {f.name: getattr(encoder, f.name) for f in dataclasses.fields(encoder)
            if f.name not in ('parent', 'name', 'dtype')}                      # not cfg.model.encoder's
  return {'name': dict(cfg).get('name', 'vit'), **fields}


__all__ = ['ENCODERS', 'ViT', 'build_encoder', 'encoder_fields']
