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
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

Transform = grain.transforms.Map | grain.transforms.RandomMap


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


def row_rng(seed: int, position: int) -> np.random.Generator:
  """The generator a random row transform gets at global position `position` (independent of the process)."""
  return np.random.Generator(np.random.Philox(key=[int(seed), int(position)]))


class _ProcessRows(grain.MapDataset):
  """Local row i of one process -> (global position, record). `order` maps positions to record ordinals
  (an infinite MapDataset); `records` maps ordinals to indices of `source` (None: the identity)."""

  def __init__(self, order: grain.MapDataset, source: Any, records: Sequence[int] | None, *,
               global_batch_size: int, process_index: int, process_count: int):
    super().__init__(order)
    self._source = source
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
    record = ordinal if self._records is None else int(self._records[ordinal])
    return position, self._source[record]


class _ApplyTransform(grain.transforms.Map):
  """(position, record) -> the row `transform` makes of the record; a RandomMap draws from row_rng(seed, position)."""

  def __init__(self, transform: Transform, seed: int):
    self.transform = transform
    self.seed = seed

  def map(self, element):
    position, record = element
    if isinstance(self.transform, grain.transforms.RandomMap):
      row = self.transform.random_map(record, row_rng(self.seed, position))
    else:
      row = self.transform.map(record)
    if row is None or (isinstance(row, dict) and not row):
      raise ValueError(f'{type(self.transform).__name__} returned no row for stream position {position}: '
                       'training transforms must map every record to a row (no filtering)')
    return row


def train_dataset(source: Any, transform: Transform, *, global_batch_size: int, seed: int, process_index: int,
                  process_count: int, records: Sequence[int] | None = None, read_threads: int = 2,
                  worker_count: int = 0, worker_buffer_size: int = 1, split: str = 'train') -> grain.IterDataset:
  """Infinite batches of global_batch_size // process_count rows for one process (see the module docstring).

  source: random-access records (len + getitem); records: the indices of `source` the stream draws from
  (default all of them; e.g. the records that fit, for data.overflow='skip'); transform: record -> row dict.
  read_threads: threads building batches ahead of the consumer; worker_count > 0: that many grain worker
  processes build them instead (grain `mp_prefetch`; the order stays the same, the iterator state then holds one
  entry per worker, so a run resumes with the same data.worker_count). `split` names the data in errors.
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
  order = grain.MapDataset.range(num).shuffle(seed=order_seed(seed)).repeat()  # reshuffled every epoch
  rows = _ProcessRows(order, source, records, global_batch_size=global_batch_size, process_index=process_index,
                      process_count=process_count)
  batches = rows.map(_ApplyTransform(transform, int(seed))).batch(global_batch_size // process_count,
                                                                  drop_remainder=True)
  threads = max(int(read_threads), 0)
  ds = batches.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * max(threads, 1)))
  if worker_count > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(worker_count),
                                                     per_worker_buffer_size=int(worker_buffer_size)))
  return ds
