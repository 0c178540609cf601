"""Data: the procedural 'shapes' world, its video counterpart 'motion', and LLaVA-format JSON + image folders (TFDS
array_record builders), their tokenizers, and the grain pipelines. The trainer reaches them only through `prepare`
and `train_loader`, which dispatch on cfg.data.name."""
from __future__ import annotations

from typing import Any

DATASETS = ('shapes', 'llava_json', 'motion')


def _module(data_cfg: Any):
  name = data_cfg.get('name', 'shapes') if hasattr(data_cfg, 'get') else 'shapes'
  if name == 'shapes':
    from mmproj.data import shapes
    return shapes
  if name == 'llava_json':
    from mmproj.data import llava_json
    return llava_json
  if name == 'motion':
    from mmproj.data import motion
    return motion
  raise ValueError(f'unknown data.name {name!r}; known: {list(DATASETS)}')


def prepare(data_cfg: Any):
  """Builds the dataset once (under data.data_dir) -> (dataset dir, tokenizers.Tokenizer)."""
  return _module(data_cfg).prepare(data_cfg)


def train_loader(data_cfg: Any, tok, **kwargs):
  """The infinite, shuffled, per-process training loader (see mmproj.data.pipeline.train_loader for the
  contract; LLaVA data: mmproj.data.llava_json.train_loader)."""
  module = _module(data_cfg)
  if module.__name__.endswith('shapes'):
    from mmproj.data import pipeline
    return pipeline.train_loader(data_cfg, tok, **kwargs)
  if module.__name__.endswith('motion'):
    raise ValueError("data.name='motion': no training loader yet (the grain pipeline batches images, and the "
                     "motion world's records hold a 'video')")
  return module.train_loader(data_cfg, tok, **kwargs)
