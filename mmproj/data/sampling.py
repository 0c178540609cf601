"""The training order: one seeded global stream of records, cut into global batches, each process reading its rows.

    position g = 0, 1, 2, ...            (infinite)
    epoch e = g // N, record = order_e[g % N]   order_e: a permutation of the N records, seeded by (seed, e)
    global batch k = positions [k*B, (k+1)*B)
    process p of P reads rows [p*B/P, (p+1)*B/P) of every global batch, and only those

so the records of global batch k, and their row order, do not depend on how many processes there are: 1 process
reading all B rows and 4 processes reading B/4 rows each feed the same global batch to the step. A random row
transform (grain RandomMap) gets a generator seeded by (seed, g), so a row's text does not depend on the process
count either. The per-epoch permutation is grain's `MapDataset.shuffle` (a different permutation per epoch when
repeated), computed per index: nothing of size N is materialised.

`train_dataset` returns a grain IterDataset; `iter(ds)` has get_state()/set_state() ({'next_index': local
batches consumed, = the global step} without worker processes) and is checkpointed with
grain.checkpoint.CheckpointSave / CheckpointRestore inside ocp.args.Composite.

Bad records (data.bad_records): reading a record from the source and making its row happen together, per
position. A record that fails there (an undecodable image, a missing field, a record the source cannot
deserialize, ...) is a bad record:
    'error' (default)  ValueError naming the split, the record (index, and id where the record has one), the
                       stream position and the cause; the original exception is chained.
    'skip'             the row at that position is the transform's `blank_row()`: padding only (input_mask and
                       loss_mask all 0), so it trains on nothing and the batch keeps its shapes. Every row then
                       carries `bad_records` (int32, 1 for a stand-in, 0 otherwise): the trainer sums it. Skips
                       are logged (the first MAX_NAMED by name) and counted per process; MAX_BAD_RUN bad rows
                       in a row raise (the data, not a few records, is broken).
No position is dropped, so which positions are bad depends on the records only: the stream stays the same
whatever the process count, and resumes from the same state. Text longer than a row is not a bad record: it is
data.overflow's business where the loader has one (llava_json), and otherwise an error; transforms raise
`Unskippable` for it, which data.bad_records='skip' never hides.
"""
from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

Transform = grain.transforms.Map | grain.transforms.RandomMap
BAD_RECORD_POLICIES = ('error', 'skip')
MAX_BAD_RUN = 100  # bad rows in a row (one process) that mean the whole stream is broken, not a few records
MAX_NAMED = 100  # bad records named in the log per process; later ones are only counted
_log = logging.getLogger(__name__)


class Unskippable(ValueError):
  """A row fault that data.bad_records='skip' does not hide: text longer than the row (data.overflow='error',
  or the shapes world's data.text_len). Its message names the record and the setting at fault."""


def check_bad_records(policy: Any) -> str:
  """data.bad_records, validated (ValueError naming the field)."""
  if policy not in BAD_RECORD_POLICIES:
    raise ValueError(f'data.bad_records: {policy!r} is not one of {BAD_RECORD_POLICIES}')
  return policy


def fault(e: BaseException) -> str:
  """Why a record could not be read or made into a row, in a few words."""
  if isinstance(e, KeyError):  # str(KeyError) is only the quoted key
    return f'missing field {e.args[0]!r}' if e.args else 'missing field'
  return str(e) if type(e) is ValueError else f'{type(e).__name__}: {e}'


def record_name(split: str, record: int, raw: Any = None) -> str:
  """'train record 7' or, when the raw record has an id, "train record 7 (id 'abc')"."""
  rid = raw.get('id') if isinstance(raw, Mapping) else None
  if isinstance(rid, bytes):
    rid = rid.decode('utf-8', 'replace')
  return f'{split} record {record}' + ('' if rid is None else f' (id {str(rid)!r})')


def check_process(process_index: int, process_count: int, global_batch_size: int) -> None:
  """ValueError naming the argument when the process slot or batch size is impossible."""
  if process_count < 1:
    raise ValueError(f'process_count={process_count} must be >= 1')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} not in [0, process_count={process_count})')
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f'global_batch_size={global_batch_size} must be a positive multiple of '
                     f'process_count={process_count}')


def global_position(row: int, *, global_batch_size: int, process_index: int, process_count: int) -> int:
  """The global stream position of local row `row` (0, 1, ...) of process `process_index`."""
  per_process = global_batch_size // process_count
  batch, within = divmod(row, per_process)
  return batch * global_batch_size + process_index * per_process + within


def order_seed(seed: int) -> int:
  """The 32-bit seed of the record order. grain's shuffle permutes epoch e with seed + e, so seeds 0 and 1 would
  share epochs shifted by one; hashing the seed first makes nearby seeds' orders unrelated."""
  return int(np.random.SeedSequence(int(seed)).generate_state(1)[0])


def record_order(num: int, seed: int) -> grain.MapDataset:
  """Position -> record ordinal (infinite): a permutation of range(num) per epoch, seeded by (seed, epoch)."""
  return grain.MapDataset.range(num).shuffle(seed=order_seed(seed)).repeat()


def row_rng(seed: int, position: int) -> np.random.Generator:
  """The generator a random row transform gets at global position `position` (independent of the process)."""
  return np.random.Generator(np.random.Philox(key=[int(seed), int(position)]))


class _ProcessRows(grain.MapDataset):
  """Local row i of one process -> (global position, record index). `order` maps positions to record ordinals
  (an infinite MapDataset); `records` maps ordinals to indices of the source (None: the identity). The record
  itself is read by _ApplyTransform, so a read failure is handled as a bad record."""

  def __init__(self, order: grain.MapDataset, records: Sequence[int] | None, *, global_batch_size: int,
               process_index: int, process_count: int):
    super().__init__(order)
    self._records = records
    self._where = dict(global_batch_size=global_batch_size, process_index=process_index,
                       process_count=process_count)

  def __len__(self) -> int:
    return sys.maxsize

  def __str__(self) -> str:
    return f'ProcessRows({self._where})'

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    position = global_position(int(index), **self._where)
    ordinal = int(self._parent[position])
    return position, ordinal if self._records is None else int(self._records[ordinal])


class _ApplyTransform(grain.transforms.Map):
  """(position, record index) -> the row `transform` makes of source[record]; a RandomMap draws from
  row_rng(seed, position). Bad records as data.bad_records says (module docstring)."""

  def __init__(self, transform: Transform, seed: int, source: Any, *, split: str = 'train',
               bad_records: str = 'error', max_bad_run: int = MAX_BAD_RUN):
    self.transform = transform
    self.seed = seed
    self.source = source
    self.split = split
    self.skip = check_bad_records(bad_records) == 'skip'
    self.max_bad_run = int(max_bad_run)
    self.blank = None
    if self.skip:
      blank = getattr(transform, 'blank_row', None)
      if blank is None:
        raise ValueError(f'data.bad_records=skip: {type(transform).__name__} has no blank_row() to stand in '
                         'for a bad record')
      self.blank = dict(blank())
    self.count = 0  # bad records met by this process (a worker process counts its own)
    self._run = 0  # bad rows since the last good one
    self._lock = threading.Lock()  # read threads share the counters

  def __getstate__(self):  # grain worker processes get a copy: locks do not pickle
    state = dict(self.__dict__)
    del state['_lock']
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def _make_row(self, record: int, position: int) -> tuple[Any, Any, Exception | None]:
    """-> (raw record or None, row or None, the exception that made the record bad or None)."""
    raw = None
    try:
      raw = self.source[record]
      if isinstance(self.transform, grain.transforms.RandomMap):
        return raw, self.transform.random_map(raw, row_rng(self.seed, position)), None
      return raw, self.transform.map(raw), None
    except Unskippable as e:
      e.add_note(f'at {record_name(self.split, record, raw)}, stream position {position}')
      raise
    except MemoryError:
      raise
    except Exception as e:  # pylint: disable=broad-except  (any failure on a record makes it a bad record)
      return raw, None, e

  def map(self, element):
    position, record = element
    raw, row, error = self._make_row(record, position)
    if error is not None:
      return self._bad(position, record, raw, error)
    if row is None or (isinstance(row, dict) and not row):
      raise ValueError(f'{type(self.transform).__name__} returned no row for stream position {position}: '
                       'training transforms must map every record to a row (no filtering)')
    if self.skip:
      if row.keys() != self.blank.keys():  # batches must always have the same fields
        raise ValueError(f'{type(self.transform).__name__}.blank_row() has fields {sorted(self.blank)}, its '
                         f'rows {sorted(row)}')
      row = {**row, 'bad_records': np.int32(0)}
    self._run = 0  # a plain store: atomic under the GIL
    return row

  def _bad(self, position: int, record: int, raw: Any, e: Exception) -> dict[str, Any]:
    what = f'{record_name(self.split, record, raw)} at stream position {position}'
    if not self.skip:
      raise ValueError(f'bad {what}: {fault(e)} (data.bad_records=error; set it to skip to train past bad '
                       'records)') from e
    with self._lock:
      self.count += 1
      self._run += 1
      count, run = self.count, self._run
    if run >= self.max_bad_run:
      raise ValueError(f'{run} bad records in a row in the {self.split} split (data.bad_records=skip): the data '
                       f'looks broken, not a few records; the last: {what}: {fault(e)}') from e
    if count <= MAX_NAMED:
      _log.warning('skipping bad %s (data.bad_records=skip; its row trains on nothing): %s; %d bad so far in '
                   'this process', what, fault(e), count)
      if count == MAX_NAMED:
        _log.warning('further bad %s records are counted (the batches\' bad_records field) but not named',
                     self.split)
    elif count % 1000 == 0:
      _log.warning('%d bad %s records so far in this process (data.bad_records=skip)', count, self.split)
    return {**self.blank, 'bad_records': np.int32(1)}


def train_dataset(source: Any, transform: Transform, *, global_batch_size: int, seed: int, process_index: int,
                  process_count: int, records: Sequence[int] | None = None, read_threads: int = 2,
                  worker_count: int = 0, worker_buffer_size: int = 1, split: str = 'train',
                  bad_records: str = 'error', max_bad_run: int = MAX_BAD_RUN) -> grain.IterDataset:
  """Infinite batches of global_batch_size // process_count rows for one process (see the module docstring).

  source: random-access records (len + getitem); records: the indices of `source` the stream draws from
  (default all of them; e.g. the records that fit, for data.overflow='skip'); transform: record -> row dict.
  read_threads: threads building batches ahead of the consumer; worker_count > 0: that many grain worker
  processes build them instead (grain `mp_prefetch`; the order stays the same, the iterator state then holds one
  entry per worker, so a run resumes with the same data.worker_count). `split` names the data in errors.
  bad_records: data.bad_records, 'error' | 'skip' (module docstring; 'skip' needs `transform.blank_row()` and adds
  the int32 field `bad_records` to every row); max_bad_run: that many bad rows in a row raise under 'skip'.
  """
  check_process(process_index, process_count, global_batch_size)
  if not 0 <= int(seed) < 2 ** 32:
    raise ValueError(f'seed={seed}: the data order needs a non-negative 32-bit seed')
  num = len(source) if records is None else len(records)
  if num == 0:
    raise ValueError(f'the {split} split has no records to train on')
  if global_batch_size > num:
    raise ValueError(f'global_batch_size={global_batch_size} is larger than the {num} records of the {split} '
                     'split: a batch would hold a record twice')
  if worker_count < 0:
    raise ValueError(f'data.worker_count={worker_count} must be >= 0')
  if max_bad_run < 1:
    raise ValueError(f'max_bad_run={max_bad_run} must be >= 1')
  apply = _ApplyTransform(transform, int(seed), source, split=split, bad_records=bad_records,
                          max_bad_run=max_bad_run)
  rows = _ProcessRows(record_order(num, seed), records, global_batch_size=global_batch_size,
                      process_index=process_index, process_count=process_count)  # reshuffled every epoch
  batches = rows.map(apply).batch(global_batch_size // process_count, drop_remainder=True)
  threads = max(int(read_threads), 0)
  ds = batches.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * max(threads, 1)))
  if worker_count > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(worker_count),
                                                     per_worker_buffer_size=int(worker_buffer_size)))
  return ds
