"""Word-level tokenizer for closed-vocabulary worlds (the procedural 'shapes' world).

A `tokenizers.Tokenizer` with a WordLevel model and a Whitespace pre-tokenizer. The special tokens have fixed
ids shared by the whole codebase (the model config hard-codes `image_token_id = 3`):

    <pad>=0  <bos>=1  <eos>=2  <image>=3  <sep>=4  <unk>=5

followed by the world's words in sorted order, so ids are a pure function of the word set.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable

import tokenizers
from tokenizers import models, pre_tokenizers

PAD, BOS, EOS, IMAGE, SEP, UNK = '<pad>', '<bos>', '<eos>', '<image>', '<sep>', '<unk>'
SPECIAL_TOKENS = (PAD, BOS, EOS, IMAGE, SEP, UNK)
PAD_ID, BOS_ID, EOS_ID, IMAGE_ID, SEP_ID, UNK_ID = range(len(SPECIAL_TOKENS))
NUM_SPECIAL = len(SPECIAL_TOKENS)
MAX_VOCAB_SIZE = 64  # cfg.model.lm.vocab_size of the shapes-world models; build() refuses to exceed it.
FILENAME = 'tokenizer.json'


def build(words: Iterable[str], max_vocab_size: int = MAX_VOCAB_SIZE) -> tokenizers.Tokenizer:
  """Builds the tokenizer: specials at their fixed ids, then `sorted(set(words))`.

  Every word must be a single Whitespace pre-token (`\\w+` or a run of punctuation), otherwise it could never
  be produced by encoding and would silently waste an id.
  """
  words = sorted(set(words))
  for w in words:
    if w in SPECIAL_TOKENS:
      raise ValueError(f'word {w!r} collides with a special token')
    if [p for p, _ in pre_tokenizers.Whitespace().pre_tokenize_str(w)] != [w]:
      raise ValueError(f'word {w!r} is not a single whitespace pre-token')
  vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + tuple(words))}
  if len(vocab) > max_vocab_size:
    raise ValueError(f'vocabulary has {len(vocab)} tokens > max_vocab_size={max_vocab_size} '
                     '(model.lm.vocab_size)')
  tok = tokenizers.Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  # Registered as special so that decode(skip_special_tokens=True) drops them; ids stay as in `vocab`.
  tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
  _check_special_ids(tok)
  return tok


def extend(tok: tokenizers.Tokenizer, *, words: Iterable[str] = (), specials: Iterable[str] = (),
           max_vocab_size: int = MAX_VOCAB_SIZE) -> tokenizers.Tokenizer:
  """`tok` with `words` (ordinary words) and then `specials` (added tokens matched before pre-tokenization and
  dropped by decode(skip_special_tokens=True), e.g. signal tokens such as [IMG0]) appended after its last id, so
  that every id `tok` had keeps its meaning: a pretrained LM's embedding rows stay valid and the new rows are
  the ones a run trains. A word or special `tok` already has is an error, as is exceeding max_vocab_size."""
  vocab = dict(tok.get_vocab(with_added_tokens=True))
  words, specials = list(words), list(specials)
  for w in words + specials:
    if w in vocab or (words + specials).count(w) > 1:
      raise ValueError(f'token {w!r} is already in the vocabulary (or given twice)')
  for w in words:
    if [p for p, _ in pre_tokenizers.Whitespace().pre_tokenize_str(w)] != [w]:
      raise ValueError(f'word {w!r} is not a single whitespace pre-token')
  size = len(vocab) + len(words) + len(specials)
  if size > max_vocab_size:
    raise ValueError(f'vocabulary grows to {size} tokens > max_vocab_size={max_vocab_size} (model.lm.vocab_size)')
  added = [t.content for _, t in sorted(tok.get_added_tokens_decoder().items())]   # the specials tok has, by id
  for w in words + specials:
    vocab[w] = len(vocab)
  out = tokenizers.Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
  out.pre_tokenizer = pre_tokenizers.Whitespace()
  # Added tokens keep the ids the WordLevel vocabulary gives them.
  out.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in added + specials])
  _check_special_ids(out)
  for w in words + specials:
    if out.token_to_id(w) != vocab[w]:
      raise ValueError(f'token {w!r} got id {out.token_to_id(w)}, expected {vocab[w]}')
  return out


def save(tok: tokenizers.Tokenizer, path: str | os.PathLike) -> None:
  """Writes `tok` as JSON to `path` atomically (temp file + rename), so readers never see a partial file."""
  path = os.fspath(path)
  d = os.path.dirname(path) or '.'
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=d, prefix='.tokenizer-', suffix='.json')
  os.close(fd)
  try:
    tok.save(tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def load(path: str | os.PathLike) -> tokenizers.Tokenizer:
  """Loads a tokenizer saved by `save` (a file, or a directory holding `tokenizer.json`)."""
  path = os.fspath(path)
  if os.path.isdir(path):
    path = os.path.join(path, FILENAME)
  tok = tokenizers.Tokenizer.from_file(path)
  _check_special_ids(tok)
  return tok


def vocab_size(tok: tokenizers.Tokenizer) -> int:
  """Number of ids the tokenizer uses (specials included); must be <= model.lm.vocab_size."""
  return tok.get_vocab_size(with_added_tokens=True)


def encode(tok: tokenizers.Tokenizer, text: str) -> list[int]:
  """Ids of `text` without any added specials. Raises ValueError on out-of-vocabulary words."""
  enc = tok.encode(text, add_special_tokens=False)
  if UNK_ID in enc.ids:
    bad = [t for t, i in zip(enc.tokens, enc.ids) if i == UNK_ID]
    raise ValueError(f'out-of-vocabulary words {bad} in {text!r}')
  return enc.ids


def _check_special_ids(tok: tokenizers.Tokenizer) -> None:
  for i, t in enumerate(SPECIAL_TOKENS):
    if tok.token_to_id(t) != i:
      raise ValueError(f'tokenizer maps {t} to {tok.token_to_id(t)}, expected fixed id {i}')
