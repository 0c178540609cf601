"""Data: the procedural worlds ('shapes' images, 'tones' audio, 'motion' video) and LLaVA-format JSON + image
folders (TFDS array_record builders), their tokenizers, and the grain pipelines. The trainer reaches them only
through `prepare` and `train_loader`, which dispatch on cfg.data.name.

A procedural world's module (`world(cfg.data)`) gives the pipeline (mmproj/data/pipeline.py) what it reads:
MEDIA (the batch key of its media: 'image' | 'audio' | 'video'), media_spec(data_cfg) -> (shape of one example's
media, dtype), CAPTION_QUESTION, families, data_source, decode_record, chance_levels, prepare."""
from __future__ import annotations

from typing import Any

DATASETS = ('shapes', 'tones', 'motion', 'llava_json')
WORLDS = ('shapes', 'tones', 'motion')   # the procedural worlds, read through mmproj.data.pipeline


def _module(data_cfg: Any):
  name = data_cfg.get('name', 'shapes') if hasattr(data_cfg, 'get') else 'shapes'
  if name == 'shapes':
    from mmproj.data import shapes
    return shapes
  if name == 'tones':
    from mmproj.data import tones
    return tones
  if name == 'llava_json':
    from mmproj.data import llava_json
    return llava_json
  if name == 'motion':
    from mmproj.data import motion
    return motion
  raise ValueError(f'unknown data.name {name!r}; known: {list(DATASETS)}')


def world(data_cfg: Any):
  """The module of cfg.data's procedural world; ValueError naming data.name for other datasets."""
  module = _module(data_cfg)
  if module.__name__.rsplit('.', 1)[-1] not in WORLDS:
    raise ValueError(f'data.name {data_cfg.get("name")!r} is not a procedural world; worlds: {list(WORLDS)}')
  return module


def prepare(data_cfg: Any):
  """Builds the dataset once (under data.data_dir) -> (dataset dir, tokenizers.Tokenizer)."""
  return _module(data_cfg).prepare(data_cfg)


def train_loader(data_cfg: Any, tok, **kwargs):
  """The infinite, shuffled, per-process training loader (see mmproj.data.pipeline.train_loader for the
  contract; LLaVA data: mmproj.data.llava_json.train_loader)."""
  module = _module(data_cfg)
  if module.__name__.rsplit('.', 1)[-1] in WORLDS:
    from mmproj.data import pipeline
    return pipeline.train_loader(data_cfg, tok, **kwargs)
  return module.train_loader(data_cfg, tok, **kwargs)
