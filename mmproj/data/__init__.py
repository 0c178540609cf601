"""Data: the procedural worlds ('shapes' images, 'tones' audio, 'motion' video; mmproj/data/worlds.py) and
LLaVA-format JSON + image folders (TFDS array_record builders), their tokenizers, and the grain pipelines. The
trainer reaches them only through `prepare` and `train_loader`, which dispatch on cfg.data.name."""
from __future__ import annotations

from typing import Any

from mmproj.data import worlds
from mmproj.data.worlds import WORLDS, world

DATASETS = WORLDS + ('llava_json',)


def _module(data_cfg: Any):
  name = worlds.name_of(data_cfg)
  if name in WORLDS:
    return world(data_cfg)
  if name == 'llava_json':
    from mmproj.data import llava_json
    return llava_json
  raise ValueError(f'unknown data.name {name!r}; known: {list(DATASETS)}')


def prepare(data_cfg: Any):
  """Builds the dataset once (under data.data_dir) -> (dataset dir, tokenizers.Tokenizer); the draw task's
  tokenizer is the world's with its words and signal tokens appended (mmproj/data/draw.py)."""
  directory, tok = _module(data_cfg).prepare(data_cfg)
  if _is_draw(data_cfg):
    from mmproj.data import draw
    draw.check(data_cfg)
    tok = draw.extend_tokenizer(tok, data_cfg)
  return directory, tok


def _is_draw(data_cfg: Any) -> bool:
  get = data_cfg.get if hasattr(data_cfg, 'get') else lambda k, d=None: getattr(data_cfg, k, d)
  return get('task', None) == 'draw'



def train_loader(data_cfg: Any, tok, **kwargs):
  """The infinite, shuffled, per-process training loader (see mmproj.data.pipeline.train_loader for the
  contract; LLaVA data: mmproj.data.llava_json.train_loader)."""
  module = _module(data_cfg)
  if _is_draw(data_cfg):
    from mmproj.data import draw
    return draw.train_loader(data_cfg, tok, **kwargs)
  if module.__name__.rsplit('.', 1)[-1] in WORLDS:
    from mmproj.data import pipeline
    return pipeline.train_loader(data_cfg, tok, **kwargs)
  return module.train_loader(data_cfg, tok, **kwargs)
