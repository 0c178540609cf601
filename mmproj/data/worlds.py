"""The procedural worlds by data.name: 'shapes' (images; also the 'scenes' variant), 'tones' (audio clips) and
'motion' (video clips). Each world's module gives the pipeline (mmproj/data/pipeline.py) what it reads: MEDIA (the
batch key of its media: 'image' | 'audio' | 'video'), media_spec(data_cfg) -> (shape of one example's media,
dtype), CAPTION_QUESTION, families, data_source, decode_record, chance_levels and prepare."""
from __future__ import annotations

import importlib
from typing import Any

WORLDS = ('shapes', 'tones', 'motion')


def name_of(data_cfg: Any) -> str:
  """data.name of a ConfigDict / dict ('shapes' when absent)."""
  return data_cfg.get('name', 'shapes') if hasattr(data_cfg, 'get') else 'shapes'


def world(data_cfg: Any):
  """The module of cfg.data's procedural world; ValueError naming data.name for any other dataset."""
  name = name_of(data_cfg)
  if name not in WORLDS:
    raise ValueError(f'data.name {name!r} is not a procedural world; worlds: {list(WORLDS)}')
  return importlib.import_module(f'mmproj.data.{name}')
