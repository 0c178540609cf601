"""Grain input pipeline for the procedural worlds (shapes / scenes images, tones audio, motion video:
mmproj/data/worlds.py): training batches, QA / caption eval batches, decoding.

Sequence layout (L = num_image_tokens + data.text_len; M = num_image_tokens, 0 for the blind baseline):

    <bos> <image>*M  question words ... ? <sep>  answer words <eos> <pad> ...
    caption example: question = 'caption', answer = the caption
    training rows may hold several turns (data.turns): <bos> <image>*M q1 <sep> a1 <eos> q2 <sep> a2 <eos> ...

`data.text_len` budgets everything except the image block: <bos> + question + <sep> + answer + <eos>.
Training rows are right-padded; 'targets' are 'tokens' shifted left by one (<pad> at the end) and 'loss_mask'
is 1 exactly where the target is an answer token or the closing <eos>. Eval QA rows hold only the prompt
(`<bos> <image>*M question <sep>`), left-padded so every prompt ends at the last column.

Batches are numpy dicts (per process, B rows):
  the world's media under its key (`world.MEDIA`): image uint8 [B, H, W, 3] | audio float32 [B, S] |
  video uint8 [B, F, H, W, 3]; tokens, positions, input_mask int32 [B, L]; positions = max(cumsum(mask) - 1, 0)
  train/caption eval: targets int32 [B, L], loss_mask float32 [B, L];  eval: valid bool [B]
  QA eval: answer, family (str arrays [B])
  train with data.bad_records='skip': bad_records int32 [B] (1 on a stand-in row for a bad record)

Faults. Text longer than data.text_len (a record's caption or question + answer) is always a ValueError naming
the split, record, field and data.text_len (`sampling.Unskippable`): the world's records are generated, so it
means text_len is too small, not that a record is corrupt. Any other failure to read a record or make its row
(a record the source cannot deserialize, a missing field, a word the tokenizer lacks) is a bad record, handled
by data.bad_records: 'error' (default) raises naming the split, record and cause; 'skip' puts a row that trains
on nothing in its place in training (mmproj.data.sampling) and leaves the example out of the eval batches,
counted and logged.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import numpy as np
import tokenizers

from mmproj.data import sampling
from mmproj.data import shapes
from mmproj.data import tokenizer as tokenizer_lib
from mmproj.data import worlds

_log = logging.getLogger(__name__)


# The shapes-world rows' fields a data config may leave out (the world's own: shapes.DEFAULTS).
DEFAULTS = dict(text_len=40, worker_count=0, read_threads=1, caption_prob=0.1, turns=1, isolate_turns=True,
                bad_records='error')


def _cfg(data_cfg: Any, key: str) -> Any:
  return shapes.get_field(data_cfg, key, DEFAULTS[key])


def text_length(data_cfg: Any) -> int:
  text_len = int(_cfg(data_cfg, 'text_len'))
  if text_len < 4:
    raise ValueError(f'data.text_len: must be >= 4 (<bos> <sep> <eos> + 1 word), got {text_len}')
  return text_len


@functools.lru_cache(maxsize=1 << 16)
def _encode_cached(tok: tokenizers.Tokenizer, text: str) -> tuple[int, ...]:
  # The shapes world's questions, answers and captions repeat across records: encoding each string once is
  # the largest saving in the loader (tokenizing was its top cost in the pipeline benchmark's profile).
  return tuple(tokenizer_lib.encode(tok, text))


def _encode(tok: tokenizers.Tokenizer, text: str, where: str) -> tuple[int, ...]:
  try:
    return _encode_cached(tok, text)
  except ValueError as e:
    raise ValueError(f'{where}: {e}') from None


def _check_len(n_text: int, text_len: int, where: str) -> None:
  if n_text > text_len:  # a setting too small for the world, not a bad record: never skipped
    raise sampling.Unskippable(f'{where} is too long: {n_text} tokens (<bos> + question + <sep> + answer + <eos>) '
                     f'> data.text_len={text_len}')


def _positions(input_mask: np.ndarray) -> np.ndarray:
  return np.maximum(np.cumsum(input_mask, axis=-1) - 1, 0).astype(np.int32)


def train_row(tok: tokenizers.Tokenizer, question: str, answer: str, *, num_image_tokens: int, text_len: int,
              where: str = 'text') -> dict[str, np.ndarray]:
  """One right-padded single-turn training row; see `conversation_row`."""
  return conversation_row(tok, [(question, answer, where)], num_image_tokens=num_image_tokens, text_len=text_len)


def conversation_row(tok: tokenizers.Tokenizer, turns: Sequence[tuple[str, str, str]], *, num_image_tokens: int,
                     text_len: int, isolate_turns: bool = False) -> dict[str, np.ndarray]:
  """A right-padded training row holding one or more (question, answer, where) turns about one image:

      <bos> <image>*M  q1 <sep> a1 <eos>  q2 <sep> a2 <eos> ... <pad>

  tokens/positions/input_mask/targets/segment_ids [L] int32, loss_mask [L] float32 (1 where the target is an
  answer token or the <eos> closing it). segment_ids: 0 on <bos> + image (and padding), k on turn k.
  isolate_turns: every turn's positions restart right after the image, and (through segment_ids) it sees only
  the image prefix and itself — each turn is then exactly a single-turn example, and one row trains several.
  Otherwise later turns see earlier ones, as in a LLaVA conversation. `where` names the record and field in
  errors (over-long text, unknown words).
  """
  # Built as Python lists and converted once: a row is ~100 tokens, where numpy's per-call cost dominates (this
  # function was the loader's largest self time in the pipeline benchmark's profile).
  prefix = 1 + num_image_tokens
  ids = [tokenizer_lib.BOS_ID] + [tokenizer_lib.IMAGE_ID] * num_image_tokens
  loss_mask = [0.0] * prefix      # 1 where the target (the next token) is an answer token or its turn's <eos>
  segment_ids = [0] * prefix
  turn_positions = []             # with isolate_turns: positions restart after the image in every turn
  for k, (question, answer, where) in enumerate(turns, start=1):
    q, a = _encode(tok, question, where), _encode(tok, answer, where)
    _check_len(len(ids) - num_image_tokens + len(q) + len(a) + 2, text_len, where)
    n = len(q) + len(a) + 2
    ids += q
    ids.append(tokenizer_lib.SEP_ID)   # its target is the first answer token
    ids += a
    ids.append(tokenizer_lib.EOS_ID)
    loss_mask += [0.0] * len(q) + [1.0] * (len(a) + 1) + [0.0]
    segment_ids += [k] * n
    turn_positions.append(n)
  seq_len = num_image_tokens + text_len
  pad = seq_len - len(ids)
  tokens = ids + [tokenizer_lib.PAD_ID] * pad                                   # [L]
  if isolate_turns:
    positions = list(range(prefix))
    for n in turn_positions:
      positions += range(prefix, prefix + n)
  else:
    positions = list(range(len(ids)))
  positions += [max(len(ids) - 1, 0)] * pad                                    # padding: the last real position
  return dict(tokens=np.array(tokens, np.int32), positions=np.array(positions, np.int32),
              input_mask=np.array([1] * len(ids) + [0] * pad, np.int32),
              targets=np.array(tokens[1:] + [tokenizer_lib.PAD_ID], np.int32),
              loss_mask=np.array(loss_mask + [0.0] * pad, np.float32),
              segment_ids=np.array(segment_ids + [0] * pad, np.int32))


def _turn_length(tok: tokenizers.Tokenizer, question: str, answer: str) -> int:
  return len(_encode_cached(tok, question)) + len(_encode_cached(tok, answer)) + 2  # + <sep> + <eos>


def prompt_row(tok: tokenizers.Tokenizer, question: str, *, num_image_tokens: int, text_len: int,
               answer_len: int = 1, where: str = 'text') -> dict[str, np.ndarray]:
  """One left-padded prompt row `<bos> <image>*M question <sep>`: tokens/positions/input_mask [L] int32.

  The prompt must leave room for `answer_len` answer tokens + <eos> within text_len, as in training.
  """
  q = _encode(tok, question, where)
  _check_len(len(q) + answer_len + 3, text_len, where)
  ids = [tokenizer_lib.BOS_ID] + [tokenizer_lib.IMAGE_ID] * num_image_tokens + list(q) + [tokenizer_lib.SEP_ID]
  seq_len = num_image_tokens + text_len
  tokens = np.full(seq_len, tokenizer_lib.PAD_ID, np.int32)  # [L]
  tokens[seq_len - len(ids):] = ids
  input_mask = (np.arange(seq_len) >= seq_len - len(ids)).astype(np.int32)  # [L]
  return dict(tokens=tokens, positions=_positions(input_mask), input_mask=input_mask)


def as_text(v: Any) -> str:
  return v.decode() if isinstance(v, bytes) else str(v)


@dataclasses.dataclass
class SampleText(grain.transforms.RandomMap):
  """Per record and epoch: a training row of up to `turns` turns about the image, LLaVA-style.

  The first turn is the caption with probability caption_prob; the others are QA pairs drawn without
  replacement by picking a question family uniformly among those left, then a pair of that family, so families
  with two pairs per image are not over-sampled. Turns are added while they fit in text_len. With turns=1 every
  row is a single caption or QA pair, exactly the format of evaluation prompts.
  """
  tok: tokenizers.Tokenizer
  num_image_tokens: int
  text_len: int
  caption_prob: float
  split: str = 'train'
  turns: int = 1
  isolate_turns: bool = True
  media: tuple[str, tuple[int, ...], Any] = ('image', (shapes.DEFAULTS['image_size'],) * 2 + (3,), np.uint8)
  families: tuple[str, ...] = shapes.FAMILIES
  caption_question: str = shapes.CAPTION_QUESTION

  def blank_row(self) -> dict[str, np.ndarray]:
    """The stand-in for a bad record (data.bad_records='skip'): all padding (masks 0) and zero media (a black
    image, silence, black frames)."""
    row = conversation_row(self.tok, [], num_image_tokens=self.num_image_tokens, text_len=self.text_len)
    row = {k: np.zeros_like(v) for k, v in row.items()}  # PAD_ID is 0
    key, shape, dtype = self.media
    row[key] = np.zeros(shape, dtype)
    return row

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    index = int(element['index'])
    where = f'{self.split} record {index}, field '
    families = [as_text(f) for f in element['families']]
    chosen = []
    if not families or rng.random() < self.caption_prob:
      chosen.append((self.caption_question, as_text(element['caption']), where + "'caption'"))
    pairs_of = {}                                   # family -> indices of its pairs not drawn yet, ascending
    for j, family in enumerate(families):
      pairs_of.setdefault(family, []).append(j)
    present = sorted(pairs_of, key=self.families.index)
    budget = self.text_len - 1 - sum(_turn_length(self.tok, q, a) for q, a, _ in chosen)  # - <bos>
    questions, answers = element['questions'], element['answers']
    while present and len(chosen) < self.turns:
      family = present[rng.integers(len(present))]
      choices = pairs_of[family]
      j = choices.pop(rng.integers(len(choices)))
      if not choices:
        present.remove(family)
      question, answer = as_text(questions[j]), as_text(answers[j])
      cost = _turn_length(self.tok, question, answer)
      if chosen and cost > budget:
        break
      budget -= cost
      chosen.append((question, answer, where + f"'questions[{j}]' + 'answers[{j}]'"))
    row = conversation_row(self.tok, chosen, num_image_tokens=self.num_image_tokens, text_len=self.text_len,
                           isolate_turns=self.isolate_turns)
    key, shape, dtype = self.media
    row[key] = np.asarray(element[key], dtype)  # [H, W, 3] | [S] | [F, H, W, 3]
    if row[key].shape != shape:
      raise ValueError(f"{where}'{key}': shape {row[key].shape}, expected {shape}")
    return row


def train_loader(data_cfg: Any, tok: tokenizers.Tokenizer, *, num_image_tokens: int, global_batch_size: int,
                 seed: int, process_index: int | None = None, process_count: int | None = None,
                 worker_count: int | None = None, worker_buffer_size: int = 1, read_threads: int | None = None,
                 split: str = 'train', row_maker: Any = None) -> grain.IterDataset:
  """Infinite, shuffled (by `seed`, reshuffled every epoch) training batches for one process.

  The order is global (mmproj.data.sampling): global batch k holds stream positions [k*B, (k+1)*B) of one seeded
  record order, B = global_batch_size, and process p of P reads only rows [p*B/P, (p+1)*B/P) of it, so the global
  batch at a step is the same whatever the process count. Each row's text is drawn with a generator seeded by
  (seed, stream position). `iter(loader)` has get_state() / set_state() and is saved with
  grain.checkpoint.CheckpointSave / CheckpointRestore inside ocp.args.Composite. process_index/count default to
  jax.process_index()/process_count(); worker_count to data.worker_count (0 = batches built by threads of the
  calling process; > 0 = grain worker processes); read_threads to data.read_threads or 1 (threads building batches
  ahead of the consumer; building a row is Python-bound, so more threads only contend for the GIL: one thread made
  more rows/s than two on 2 cores, BENCHMARKS.md).
  data.bad_records: 'error' (default) | 'skip' (module docstring; 'skip' adds the int32 field bad_records).
  row_maker: the record -> row transform (a grain RandomMap with blank_row()); default the QA / caption rows
  (SampleText) described above (the draw task's: mmproj/data/draw.py).
  """
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  sampling.check_process(process_index, process_count, global_batch_size)
  if not 0 <= int(seed) < 2 ** 32:
    raise ValueError(f'seed={seed}: the data order needs a non-negative 32-bit seed')
  if num_image_tokens < 0:
    raise ValueError(f'num_image_tokens={num_image_tokens} must be >= 0')
  if worker_count is None:
    worker_count = int(_cfg(data_cfg, 'worker_count') or 0)
  if read_threads is None:
    read_threads = int(_cfg(data_cfg, 'read_threads'))
  caption_prob = float(_cfg(data_cfg, 'caption_prob'))
  if not 0.0 <= caption_prob <= 1.0:
    raise ValueError(f'data.caption_prob: must be in [0, 1], got {caption_prob}')

  turns = int(_cfg(data_cfg, 'turns'))
  if turns < 1:
    raise ValueError(f'data.turns: must be >= 1, got {turns}')

  if worker_count > 0:
    from absl import flags  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags; outside absl.app use defaults
      flags.FLAGS.mark_as_parsed()

  bad_records = sampling.check_bad_records(_cfg(data_cfg, 'bad_records'))
  world = worlds.world(data_cfg)
  source = world.data_source(data_cfg, split)
  row = row_maker or SampleText(tok, num_image_tokens, text_length(data_cfg), caption_prob, split, turns,
                                bool(_cfg(data_cfg, 'isolate_turns')), media_spec(data_cfg), world.families(data_cfg),
                                world.CAPTION_QUESTION)
  return sampling.train_dataset(source, row, global_batch_size=global_batch_size, seed=int(seed),
                                process_index=process_index, process_count=process_count, read_threads=read_threads,
                                worker_count=worker_count, worker_buffer_size=worker_buffer_size, split=split,
                                bad_records=bad_records)


def media_spec(data_cfg: Any) -> tuple[str, tuple[int, ...], Any]:
  """(batch key, shape of one row's media, dtype) of cfg.data's world: ('image', (H, W, 3), uint8) |
  ('audio', (S,), float32) | ('video', (F, H, W, 3), uint8)."""
  world = worlds.world(data_cfg)
  shape, dtype = world.media_spec(data_cfg)
  return world.MEDIA, tuple(int(n) for n in shape), dtype


def stack_rows(rows: Iterator[dict[str, Any]], batch_size: int, blank: dict[str, Any]) -> Iterator[dict[str, Any]]:
  """Stacks rows into batches of `batch_size`; the last is topped up with copies of its first row marked
  valid=False and with the values in `blank` (so filler rows are well-formed model inputs)."""
  if batch_size <= 0:
    raise ValueError(f'batch_size={batch_size} must be positive')
  buf = []
  for row in rows:
    buf.append(row)
    if len(buf) == batch_size:
      yield _stack(buf)
      buf = []
  if buf:
    fill = {**buf[0], **blank, 'valid': False}
    yield _stack(buf + [fill] * (batch_size - len(buf)))


def _stack(rows: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


class _EvalFaults:
  """Bad eval records / examples under data.bad_records: 'error' raises naming them, 'skip' counts and logs them
  (the first few by name) and the caller leaves them out."""

  def __init__(self, data_cfg: Any, split: str):
    self.skip = sampling.check_bad_records(_cfg(data_cfg, 'bad_records')) == 'skip'
    self.split = split
    self.count = 0

  def bad(self, what: str, e: Exception) -> None:
    if isinstance(e, (sampling.Unskippable, MemoryError)):
      raise e
    if not self.skip:
      raise ValueError(f'bad {what}: {sampling.fault(e)} (data.bad_records=error; set it to skip to leave bad '
                       'examples out of the eval)') from e
    self.count += 1
    if self.count <= sampling.MAX_NAMED:
      _log.warning('leaving bad %s out of the eval (data.bad_records=skip): %s', what, sampling.fault(e))

  def summary(self, total: str) -> None:
    if self.count:
      _log.warning('data.bad_records=skip: %d bad %s left out of the %s eval', self.count, total, self.split)


def qa_eval_batches(data_cfg: Any, tok: tokenizers.Tokenizer, *, num_image_tokens: int, batch_size: int,
                    split: str = 'test', max_examples: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Every QA pair of `split` exactly once (records in order, pairs in stored order), or the first
  `max_examples` pairs, as left-padded prompt batches with 'answer', 'family' (str [B]) and 'valid' (bool [B]).
  Filler rows of the last batch repeat its first prompt with answer = family = '' and valid = False.
  data.bad_records='skip': a record that cannot be read, or a pair that cannot be made into a prompt, is left out
  (counted, logged; max_examples counts the pairs kept)."""
  text_len = text_length(data_cfg)
  world = worlds.world(data_cfg)
  source = world.data_source(data_cfg, split)
  faults = _EvalFaults(data_cfg, split)

  def rows():
    n = 0
    for i in range(len(source)):
      try:
        rec = world.decode_record(source[i])
        pairs = list(zip(rec['questions'], rec['answers'], rec['families'], strict=True))
      except Exception as e:  # pylint: disable=broad-except  (judged by data.bad_records)
        faults.bad(f'{split} record {i}', e)
        continue
      for j, (q, a, f) in enumerate(pairs):
        if max_examples is not None and n >= max_examples:
          return
        where = f"{split} record {rec['index']}, field 'questions[{j}]' + 'answers[{j}]'"
        try:
          row = prompt_row(tok, q, num_image_tokens=num_image_tokens, text_len=text_len,
                           answer_len=len(_encode(tok, a, where)), where=where)
        except Exception as e:  # pylint: disable=broad-except  (the message names the field)
          faults.bad(f'{split} record {i}', e)
          continue
        yield dict({world.MEDIA: rec[world.MEDIA]}, **row, answer=np.str_(a), family=np.str_(f), valid=True)
        n += 1

  try:
    yield from stack_rows(rows(), batch_size, blank=dict(answer=np.str_(''), family=np.str_('')))
  finally:
    faults.summary('records or QA pairs')


def caption_eval_batches(data_cfg: Any, tok: tokenizers.Tokenizer, *, num_image_tokens: int, batch_size: int,
                         split: str = 'test', max_examples: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Every record of `split` once (or the first `max_examples`) as a teacher-forced caption row in the training
  layout (tokens, positions, input_mask, targets, loss_mask, image) + 'valid' (bool [B]); filler rows of the last
  batch have valid=False and loss_mask=0. data.bad_records='skip': a record that cannot be read or made into a
  row is left out (counted, logged; max_examples counts the records kept)."""
  text_len = text_length(data_cfg)
  world = worlds.world(data_cfg)
  source = world.data_source(data_cfg, split)
  n = len(source) if max_examples is None else min(len(source), max_examples)
  faults = _EvalFaults(data_cfg, split)

  def rows():
    kept = 0
    for i in range(len(source)):
      if kept >= n:
        break
      try:
        rec = world.decode_record(source[i])
        row = train_row(tok, world.CAPTION_QUESTION, rec['caption'], num_image_tokens=num_image_tokens,
                        text_len=text_len, where=f"{split} record {rec['index']}, field 'caption'")
      except Exception as e:  # pylint: disable=broad-except  (judged by data.bad_records)
        faults.bad(f'{split} record {i}', e)
        continue
      kept += 1
      yield dict({world.MEDIA: rec[world.MEDIA]}, **row, valid=True)

  seq_len = num_image_tokens + text_len
  try:
    yield from stack_rows(rows(), batch_size, blank=dict(loss_mask=np.zeros(seq_len, np.float32)))
  finally:
    faults.summary('records')


def decode(tok: tokenizers.Tokenizer, ids: Sequence[int] | np.ndarray) -> str:
  """Words of `ids` up to the first <eos>, specials dropped, joined by single spaces. Ids outside the
  tokenizer's vocabulary (the model's vocab may be larger) decode as '<unk>' so they cannot vanish silently."""
  words = []
  for i in np.asarray(ids).reshape(-1).tolist():
    if i == tokenizer_lib.EOS_ID:
      break
    if 0 <= i < tokenizer_lib.NUM_SPECIAL:
      continue
    w = tok.id_to_token(i) if i >= 0 else None
    words.append(tokenizer_lib.UNK if w is None else w)
  return ' '.join(words)
