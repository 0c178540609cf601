"""Modality encoders. `build_encoder(cfg_encoder, dtype)` maps `cfg.model.encoder` to a module by its name:
'vit' (images, mmproj/encoders/vit.py) or 'whisper' (16 kHz audio, mmproj/encoders/whisper.py)."""

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mmproj.encoders.vit import ViT
from mmproj.encoders.whisper import WhisperEncoder

ENCODERS = {'vit': ViT, 'whisper': WhisperEncoder}


def build_encoder(cfg: Any, dtype: Any = jnp.float32) -> nn.Module:
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


__all__ = ['ENCODERS', 'ViT', 'WhisperEncoder', 'build_encoder', 'encoder_fields']
