"""Conversation templates for LLaVA-format records, with the loss only on assistant turns.

A LLaVA record's conversation is a list of turns {"from": "human" | "gpt", "value": str}. `segments(template,
roles, values)` renders it as a list of (text, is_target) pieces whose concatenation is the exact training text
and whose `is_target` pieces are what the model is trained to produce:

  'plain' (LLaVA stage-1 pretraining, LLaVA's `preprocess_plain`): the human text is dropped, no system prompt;
      [('<image>', False), (caption + '\\n', True)]   with caption = the first gpt value.
  'vicuna_v1' (LLaVA-1.5 stage 2, `conv_vicuna_v1`: separator style TWO, sep ' ', sep2 '</s>'):
      SYSTEM + ' ' + 'USER: ' + h1 + ' ' + 'ASSISTANT:' | ' ' + g1 + '</s>' | 'USER: ' + h2 + ' ASSISTANT:' | ...
      i.e. "{SYSTEM} USER: {h1} ASSISTANT: {g1}</s>USER: {h2} ASSISTANT: {g2}</s>" (no space after '</s>', as
      LLaVA's get_prompt), targets: ' ' + each gpt value + '</s>' (the eos token of the tokenizer in use).

Image tag: as LLaVA's `preprocess_multimodal`, a turn holding '<image>' has the tag removed and is stripped; for a
record with an image, the first human turn then starts with '<image>\\n' (one image block per row; it is added
there even when the record's text has no tag; with a tokenizer whose image token is named differently,
data.image_token, that name is put there instead: the JSON tag is always LLaVA's '<image>'). A record without an
image must not mention '<image>'. Roles: 'human'/'user' and 'gpt'/'assistant'; a leading assistant turn is
dropped (as LLaVA does), then turns must alternate human, gpt, ... and end with a gpt turn.

`tokenize(tok, segments, ...)` turns segments into one fixed-length row (L = num_image_tokens + text_len):

  tokens      int32 [L]  <bos>, then each segment's ids ('<image>' -> num_image_tokens image-token ids, the
                         eos string -> the eos id), right-padded with PAD_ID (0; LLaVA pads Llama with <unk> = 0)
  positions   int32 [L]  max(cumsum(input_mask) - 1, 0)
  input_mask  int32 [L]  1 on real tokens
  targets     int32 [L]  tokens shifted left by one, PAD_ID at the end
  loss_mask   float32 [L] 1 where targets[t] is a token of an is_target segment (assistant text and its '</s>')

Each segment is tokenized on its own (`add_special_tokens=False`), never the joined text: a token can then never
straddle a prompt/answer boundary, so the loss mask is exactly the answer tokens with no re-alignment heuristics
(LLaVA re-tokenizes each round and subtracts fudge constants). Segments start where a SentencePiece-style
tokenizer would start a word anyway (answers carry their leading space; Metaspace with prepend_scheme
'first'/'always' does not double it), so the ids should match a whole-text tokenization except where a merge
would cross a boundary. The image tag and the eos string are matched as literal strings and mapped to their ids, so
they need not be added tokens of the tokenizer.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import tokenizers

from mmproj.data import sampling

TEMPLATES = ('plain', 'vicuna_v1')
IMAGE_TAG = '<image>'  # the tag in LLaVA JSON text (LLaVA's DEFAULT_IMAGE_TOKEN), whatever the tokenizer calls it
OVERFLOW_POLICIES = ('truncate', 'skip', 'error')
IMAGE_TOKEN, BOS_TOKEN, EOS_TOKEN = '<image>', '<s>', '</s>'
PAD_ID = 0
VICUNA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's questions.")
VICUNA_ROLES = ('USER', 'ASSISTANT')
ROLE_ALIASES = {'human': 'human', 'user': 'human', 'gpt': 'gpt', 'assistant': 'gpt'}

Segment = tuple[str, bool]  # (text, is_target)


def _rid(record_id: Any) -> str:
  return f'record {record_id!r}'


def rounds(roles: Sequence[str], values: Sequence[str], *, record_id: Any = '?', has_image: bool = True,
           image_token: str = IMAGE_TOKEN) -> list[tuple[str, str]]:
  """A record's turns -> [(human text, gpt text), ...] with the image placed as LLaVA does (see module
  docstring): every IMAGE_TAG is removed from the text and `image_token` (the tokenizer's image token string)
  starts the first human turn. ValueError naming the record id and turn on a malformed conversation."""
  roles, values = list(roles), list(values)
  if len(roles) != len(values):
    raise ValueError(f'{_rid(record_id)}: {len(roles)} roles but {len(values)} values')
  if not roles:
    raise ValueError(f'{_rid(record_id)}: empty conversations')
  kinds = []
  for j, (r, v) in enumerate(zip(roles, values)):
    if r not in ROLE_ALIASES:
      raise ValueError(f'{_rid(record_id)}: turn {j} has role {r!r}, expected one of {sorted(ROLE_ALIASES)}')
    if not isinstance(v, str):
      raise ValueError(f'{_rid(record_id)}: turn {j} value is {type(v).__name__}, expected a string')
    kinds.append(ROLE_ALIASES[r])
  start = 1 if kinds[0] == 'gpt' else 0  # LLaVA drops a conversation's leading assistant turn
  kinds, values = kinds[start:], values[start:]
  for j, k in enumerate(kinds):
    if k != ('human', 'gpt')[j % 2]:
      raise ValueError(f'{_rid(record_id)}: turn {j + start} is {k!r} but turns must alternate human, gpt, ...')
  if not kinds or len(kinds) % 2:
    raise ValueError(f'{_rid(record_id)}: the conversation must end with a gpt turn '
                     f'({len(roles)} turns, roles {list(roles)})')
  tagged = [j for j, v in enumerate(values) if IMAGE_TAG in v]
  if tagged and not has_image:
    raise ValueError(f'{_rid(record_id)}: turn {tagged[0] + start} has {IMAGE_TAG!r} but the record has no '
                     'image')
  values = [v.replace(IMAGE_TAG, '').strip() if j in tagged else v for j, v in enumerate(values)]
  if has_image:
    values[0] = f'{image_token}\n{values[0]}'.strip()
  return [(values[i], values[i + 1]) for i in range(0, len(values), 2)]


def segments(template: str, roles: Sequence[str], values: Sequence[str], *, record_id: Any = '?',
             has_image: bool = True, image_token: str = IMAGE_TOKEN, eos_token: str = EOS_TOKEN) -> list[Segment]:
  """A record's conversation -> [(text, is_target), ...] for `template` (see module docstring)."""
  rs = rounds(roles, values, record_id=record_id, has_image=has_image, image_token=image_token)
  if template == 'plain':
    # LLaVA's preprocess_plain: the human turn is replaced by the bare image tag, one caption, sep '\n'.
    out = [(image_token, False)] if has_image else []
    return out + [(rs[0][1] + '\n', True)]
  if template == 'vicuna_v1':
    user, assistant = VICUNA_ROLES
    out = []
    prefix = VICUNA_SYSTEM + ' '
    for human, gpt in rs:
      out.append((f'{prefix}{user}: {human} {assistant}:', False))
      out.append((f' {gpt}{eos_token}', True))
      prefix = ''
    return out
  raise ValueError(f'data.template: {template!r} is not one of {TEMPLATES}')


def render(segs: Sequence[Segment]) -> str:
  """The training text of `segments(...)` (the concatenation)."""
  return ''.join(t for t, _ in segs)


def prompt_text(template: str, question: str, *, has_image: bool = True, image_token: str = IMAGE_TOKEN) -> str:
  """Generation prompt for one question (the model continues after it; <bos> is added by tokenization).

  vicuna_v1: SYSTEM + ' USER: <image>\\n{question} ASSISTANT:'; plain: '<image>' (stage 1 only captions, the
  question is ignored). has_image=False leaves out the image tag.
  """
  tag = image_token if has_image else ''
  if template == 'plain':
    return tag
  if template == 'vicuna_v1':
    human = f'{tag}\n{question}' if has_image else question
    return f'{VICUNA_SYSTEM} {VICUNA_ROLES[0]}: {human} {VICUNA_ROLES[1]}:'
  raise ValueError(f'data.template: {template!r} is not one of {TEMPLATES}')


# ------------------------------------------------------------------------------------------------ tokenization


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
  """The special strings and their ids in one tokenizer (see `from_tokenizer`)."""
  image: str
  image_id: int
  bos: str
  bos_id: int
  eos: str
  eos_id: int
  pad_id: int = PAD_ID

  @classmethod
  def from_tokenizer(cls, tok: tokenizers.Tokenizer, *, image_token: str = IMAGE_TOKEN, bos_token: str = BOS_TOKEN,
                     eos_token: str = EOS_TOKEN, field_prefix: str = 'data.') -> SpecialTokens:
    """Looks the tokens up; ValueError naming the config field (data.image_token, ...) of a missing one."""
    ids = {}
    for field, token in (('image_token', image_token), ('bos_token', bos_token), ('eos_token', eos_token)):
      if not isinstance(token, str) or not token:
        raise ValueError(f'{field_prefix}{field}: must be a non-empty string, got {token!r}')
      ids[field] = tok.token_to_id(token)
      if ids[field] is None:
        raise ValueError(f'{field_prefix}{field}: the tokenizer has no token {token!r}')
    if image_token == eos_token:
      raise ValueError(f'{field_prefix}image_token and {field_prefix}eos_token are both {image_token!r}')
    return cls(image_token, ids['image_token'], bos_token, ids['bos_token'], eos_token, ids['eos_token'])

  @functools.cached_property
  def _splitter(self) -> re.Pattern:
    return re.compile('(' + '|'.join(re.escape(t) for t in sorted({self.image, self.eos}, key=len,
                                                                    reverse=True)) + ')')


def encode_segments(tok: tokenizers.Tokenizer, segs: Sequence[Segment], special: SpecialTokens, *,
                    num_image_tokens: int, record_id: Any = '?') -> tuple[list[int], list[bool], int | None]:
  """Segments -> (ids, is_target per id, end of the image block or None), <bos> first, unpadded.

  Each segment is split on the image tag and the eos string (mapped to num_image_tokens image ids / the eos
  id); the text in between is encoded on its own without special tokens.
  """
  ids, is_target, image_end = [special.bos_id], [False], None
  for text, target in segs:
    for piece in special._splitter.split(text):  # pylint: disable=protected-access
      if not piece:
        continue
      if piece == special.image:
        if image_end is not None:
          raise ValueError(f'{_rid(record_id)}: more than one {special.image!r} (one image block per row)')
        new = [special.image_id] * num_image_tokens
        image_end = len(ids) + num_image_tokens
      elif piece == special.eos:
        new = [special.eos_id]
      else:
        new = tok.encode(piece, add_special_tokens=False).ids
      ids += new
      is_target += [bool(target)] * len(new)
  return ids, is_target, image_end


def positions_of(input_mask: np.ndarray) -> np.ndarray:
  """max(cumsum(input_mask) - 1, 0) as int32."""
  return np.maximum(np.cumsum(input_mask, axis=-1) - 1, 0).astype(np.int32)


def tokenize(tok: tokenizers.Tokenizer, segs: Sequence[Segment], special: SpecialTokens, *, num_image_tokens: int,
             text_len: int, overflow: str = 'truncate', record_id: Any = '?') -> dict[str, np.ndarray] | None:
  """Segments -> one right-padded row (layout in the module docstring), or None when the record is longer than
  L = num_image_tokens + text_len and overflow == 'skip'.

  overflow: 'truncate' cuts at L (ValueError if the image block itself does not fit); 'skip' returns None;
  'error' raises ValueError naming the record id and its length. Both errors are `sampling.Unskippable`: a row
  that is too long is data.overflow's business, never hidden by data.bad_records='skip'.
  """
  if overflow not in OVERFLOW_POLICIES:
    raise ValueError(f'data.overflow: {overflow!r} is not one of {OVERFLOW_POLICIES}')
  seq_len = num_image_tokens + text_len
  ids, is_target, image_end = encode_segments(tok, segs, special, num_image_tokens=num_image_tokens,
                                              record_id=record_id)
  if len(ids) > seq_len:
    if overflow == 'error':
      raise sampling.Unskippable(f'{_rid(record_id)} is {len(ids)} tokens long > L = {seq_len} (num_image_tokens='
                       f'{num_image_tokens} + data.text_len={text_len}); set data.overflow to truncate or skip')
    if overflow == 'skip':
      return None
    if image_end is not None and image_end > seq_len:
      raise sampling.Unskippable(f'{_rid(record_id)}: its image block ends at token {image_end} > L = {seq_len} '
                       f'(num_image_tokens={num_image_tokens} + data.text_len={text_len}); truncating would cut '
                       'the image')
    ids, is_target = ids[:seq_len], is_target[:seq_len]
  n = len(ids)
  tokens = np.full(seq_len, special.pad_id, np.int32)  # [L]
  tokens[:n] = ids
  input_mask = (np.arange(seq_len) < n).astype(np.int32)  # [L]
  targets = np.append(tokens[1:], special.pad_id).astype(np.int32)  # [L]
  loss_mask = np.zeros(seq_len, np.float32)  # [L]
  loss_mask[:n - 1] = np.asarray(is_target[1:], np.float32)
  return dict(tokens=tokens, positions=positions_of(input_mask), input_mask=input_mask, targets=targets,
              loss_mask=loss_mask)
