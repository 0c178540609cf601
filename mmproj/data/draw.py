"""The draw task: rows that ask the LM for a picture, for a model with an output side (mmproj/model.py,
model.output; NExT-GPT, GILL). cfg.data.task = 'draw' on the shapes / scenes world (scenes: its captions name
every object's cell, so a caption describes the whole picture).

    <bos> draw large red circle top left <sep> [IMG0] [IMG1] .. [IMGk-1] <eos> <pad> ...

The loss mask covers the signal tokens and the <eos> (the LM learns to answer a request with them); the row
also carries what the output loss compares against:
    gen_text  int32 [Lc]        the caption in the layout of the generator's own text encoder
                                (mmproj.generators.caption_tokens; the 'align' target)
    gen_image uint8 [S, S, 3]   the record's image (the 'generate' target)
No <image> placeholders: the picture is the answer, never the input.

The tokenizer is the world's with the word 'draw' and the K signal tokens appended after its last id
(tokenizer.extend), so a pretrained LM's rows keep their meaning and [IMGk] = the world's vocabulary + 1 + k.

Eval batches (`eval_batches`) hold each test record's prompt (`<bos> draw <caption> <sep>`, left-padded), its
caption, gen_text and gen_image, and its objects (for the recogniser, mmproj/eval/recognise.py).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import grain
import numpy as np
import tokenizers

from mmproj import generators
from mmproj.data import pipeline
from mmproj.data import shapes
from mmproj.data import tokenizer as tokenizer_lib
from mmproj.data import worlds

TASK = 'draw'
DRAW_WORD = 'draw'
DEFAULTS = dict(signal_tokens=4, gen_text_len=12)   # data.signal_tokens (K), data.gen_text_len (Lc)


def signal_token_names(k: int) -> tuple[str, ...]:
  return tuple(f'[IMG{i}]' for i in range(k))


def is_draw(data_cfg: Any) -> bool:
  return shapes.get_field(data_cfg, 'task', None) == TASK


def _field(data_cfg: Any, key: str) -> int:
  value = shapes.get_field(data_cfg, key, DEFAULTS[key])
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
    raise ValueError(f'data.{key}={value!r} must be an int >= 1')
  return int(value)


def check(data_cfg: Any) -> None:
  """The draw task's data fields; ValueError naming them."""
  if worlds.name_of(data_cfg) != 'shapes':
    raise ValueError(f"data.task='draw' draws the shapes / scenes world, but data.name={worlds.name_of(data_cfg)!r}")
  for key in DEFAULTS:
    _field(data_cfg, key)


def extend_tokenizer(tok: tokenizers.Tokenizer, data_cfg: Any) -> tokenizers.Tokenizer:
  """The world's tokenizer + 'draw' + [IMG0]..[IMGk-1], appended after its ids."""
  return tokenizer_lib.extend(tok, words=(DRAW_WORD,), specials=signal_token_names(_field(data_cfg, 'signal_tokens')),
                              max_vocab_size=1 << 20)   # the trainer checks it against model.lm.vocab_size


def signal_token_id(tok: tokenizers.Tokenizer) -> int:
  """The id of [IMG0] in a draw tokenizer."""
  first = tok.token_to_id(signal_token_names(1)[0])
  if first is None:
    raise ValueError('the tokenizer has no signal tokens ([IMG0], ...): it is not a draw-task tokenizer')
  return first


def prompt(caption: str) -> str:
  return f'{DRAW_WORD} {caption}'


@dataclasses.dataclass
class DrawRow(grain.transforms.RandomMap):
  """Record -> one draw row (module docstring). Deterministic: the record fixes the row."""
  tok: tokenizers.Tokenizer
  text_len: int
  signal_tokens: int
  gen_text_len: int
  image_shape: tuple[int, ...]
  split: str = 'train'

  def gen_text(self, caption: str, where: str) -> np.ndarray:
    try:
      return generators.caption_tokens(self.tok, [caption], self.gen_text_len)[0]     # [Lc]
    except ValueError as e:
      raise ValueError(f'{where}: {e} (data.gen_text_len={self.gen_text_len})') from None

  def blank_row(self) -> dict[str, np.ndarray]:
    row = pipeline.conversation_row(self.tok, [], num_image_tokens=0, text_len=self.text_len)
    row = {k: np.zeros_like(v) for k, v in row.items()}
    row.update(gen_text=np.zeros(self.gen_text_len, np.int32), gen_image=np.zeros(self.image_shape, np.uint8))
    return row

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    del rng
    where = f"{self.split} record {int(element['index'])}, field 'caption'"
    caption = pipeline.as_text(element['caption'])
    answer = ' '.join(signal_token_names(self.signal_tokens))
    row = pipeline.conversation_row(self.tok, [(prompt(caption), answer, where)], num_image_tokens=0,
                                    text_len=self.text_len)
    row['gen_text'] = self.gen_text(caption, where)
    row['gen_image'] = np.asarray(element['image'], np.uint8)
    if row['gen_image'].shape != self.image_shape:
      raise ValueError(f"{self.split} record {int(element['index'])}, field 'image': shape {row['gen_image'].shape}, "
                       f'expected {self.image_shape}')
    return row


def _row_maker(data_cfg: Any, tok: tokenizers.Tokenizer, split: str) -> DrawRow:
  check(data_cfg)
  shape, _ = shapes.media_spec(data_cfg)
  return DrawRow(tok, pipeline.text_length(data_cfg), _field(data_cfg, 'signal_tokens'),
                 _field(data_cfg, 'gen_text_len'), tuple(shape), split)


def train_loader(data_cfg: Any, tok: tokenizers.Tokenizer, **kwargs) -> grain.IterDataset:
  """pipeline.train_loader's contract with draw rows (num_image_tokens must be 0: the LM sees no image)."""
  if kwargs.get('num_image_tokens', 0):
    raise ValueError(f"data.task='draw' rows hold no image, but the model has {kwargs['num_image_tokens']} image "
                     'tokens per row: set model.use_image=False')
  return pipeline.train_loader(data_cfg, tok, row_maker=_row_maker(data_cfg, tok, kwargs.get('split', 'train')),
                               **kwargs)


def eval_batches(data_cfg: Any, tok: tokenizers.Tokenizer, *, batch_size: int, split: str = 'test',
                 max_examples: int | None = None) -> Iterator[dict[str, Any]]:
  """Every record of `split` once (or the first max_examples): the left-padded prompt (tokens, positions,
  input_mask), caption (str), gen_text, gen_image, objects (an object array of the record's objects dicts) and
  valid [B]; the last batch is topped up with copies of its first row marked valid=False."""
  maker = _row_maker(data_cfg, tok, split)
  source = shapes.data_source(data_cfg, split)
  n = len(source) if max_examples is None else min(len(source), int(max_examples))

  def rows():
    for i in range(n):
      rec = shapes.decode_record(source[i])
      where = f"{split} record {rec['index']}, field 'caption'"
      row = pipeline.prompt_row(tok, prompt(rec['caption']), num_image_tokens=0, text_len=maker.text_len,
                                answer_len=maker.signal_tokens, where=where)
      objects = np.empty((), object)
      objects[()] = rec['objects']
      yield dict(row, caption=np.str_(rec['caption']), gen_text=maker.gen_text(rec['caption'], where),
                 gen_image=rec['image'], objects=objects, valid=True)

  yield from pipeline.stack_rows(rows(), batch_size, blank={})
