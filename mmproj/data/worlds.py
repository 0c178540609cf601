"""The procedural worlds by data.name: 'shapes' (images; also the 'scenes' variant), 'tones' (audio clips) and
'motion' (video clips). Each world's module gives the pipeline (mmproj/data/pipeline.py) what it reads: MEDIA (the
batch key of its media: 'image' | 'audio' | 'video'), media_spec(data_cfg) -> (shape of one example's media,
dtype), CAPTION_QUESTION, families, data_source, decode_record, chance_levels and prepare.

Below the registry, what the worlds share to build and read their TFDS datasets: each world's module passes in what
differs (its builder class and config, its name, its tokenizer, its record parser and decoder, its families). This
module imports no world module and no TFDS at import time (mmproj/data/__init__.py and pipeline.py import it)."""
from __future__ import annotations

import abc
import collections
import functools
import importlib
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from mmproj.data import tokenizer as tokenizer_lib
from mmproj.data.file_lock import file_lock

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


# ----------------------------------------------------------------------------------------------- build / read


SPLITS = ('train', 'test')  # every world's splits (each module's SPLITS maps them to the record rng key)


def get_field(data_cfg: Any, key: str, default: Any) -> Any:
  """data_cfg.key for a ConfigDict, dict or attribute object; `default` when absent."""
  if isinstance(data_cfg, Mapping):
    return data_cfg.get(key, default)
  return getattr(data_cfg, key, default) if hasattr(data_cfg, key) else default


def local_dir(field: str, value: Any) -> str:
  """A data directory as an absolute local path. A URL (gs://...) is refused, naming the field: array_record
  writes and reads its files through local file descriptors (workdirs may be URLs: mmproj/train/paths.py)."""
  value = os.fspath(value)
  if '://' in value:
    raise ValueError(f'{field}={value!r}: the data dir must be a local path (or a gcsfuse mount of the bucket): '
                     'array_record writes and reads its files through local file descriptors')
  return os.path.abspath(os.path.expanduser(value))


def data_root(data_cfg: Any, name: str) -> str:
  """data.data_dir, where world `name` is built, as an absolute local path; ValueError naming the field when unset."""
  data_dir = get_field(data_cfg, 'data_dir', None)
  if not data_dir:
    raise ValueError(f'data.data_dir: must be set (where the {name} world is built)')
  return local_dir('data.data_dir', data_dir)


def dataset_info(b: Any, description: str, media: str, media_shape: tuple[int, ...], media_dtype: Any,
                 annotations: str, num_fields: int) -> Any:
  """The DatasetInfo of a world's builder `b`: features index, `media` (a Tensor of media_shape / media_dtype
  stored as raw bytes), caption, questions, answers, families (text) and `annotations` (one int32 row of
  num_fields columns per object or event: one feature decodes much faster than a feature per column). Records are
  in index order (disable_shuffling): record i of a split is the world's generate_example(split, i)."""
  import tensorflow_datasets as tfds
  f = tfds.features
  return tfds.core.DatasetInfo(
      builder=b,
      description=description,
      features=f.FeaturesDict({
          'index': f.Scalar(dtype=np.int32),
          media: f.Tensor(shape=media_shape, dtype=media_dtype, encoding=f.Encoding.BYTES),
          'caption': f.Text(),
          'questions': f.Sequence(f.Text()),
          'answers': f.Sequence(f.Text()),
          'families': f.Sequence(f.Text()),
          annotations: f.Tensor(shape=(None, num_fields), dtype=np.int32),
      }),
      disable_shuffling=True,
  )


class GeneratedSplits:
  """Split generation shared by the worlds' TFDS builders (a base listed before tfds.core.GeneratorBasedBuilder):
  the train and test splits of builder_config.num_train / num_test records, record i of a split being the
  subclass's `_make_example(split, i)`, with the world's tokenizer (`_make_tokenizer()`) written into the data."""

  def _split_generators(self, dl_manager):
    del dl_manager
    # self.data_dir is the build's temporary directory here, so the tokenizer is renamed into place atomically
    # together with the data.
    tokenizer_lib.save(self._make_tokenizer(), os.path.join(self.data_dir, tokenizer_lib.FILENAME))
    c = self.builder_config
    return {'train': self._generate_examples('train', c.num_train),
            'test': self._generate_examples('test', c.num_test)}

  def _generate_examples(self, split: str, num: int):
    for i in range(num):
      yield i, self._make_example(split, i)


def make_builder(builder_cls: type, config: Any, data_cfg: Any, name: str):
  """World `name`'s TFDS builder (array_record) for `config` under data.data_dir (nothing is built)."""
  return builder_cls(config=config, data_dir=data_root(data_cfg, name), file_format='array_record')


def is_built(b: Any) -> bool:
  """True when builder `b`'s dataset and its tokenizer.json are complete on disk."""
  return b.data_path.exists() and (b.data_path / tokenizer_lib.FILENAME).exists()


def build(b: Any, make_tokenizer: Callable[[], Any]) -> tuple[str, Any]:
  """Builds builder `b`'s dataset once and returns (dataset dir, tokenizer); a no-op when already built.

  One process builds while the others wait on a lock file next to the data. TFDS generates into `incomplete.*`
  and renames the directory at the end, so an interrupted build never reads as complete; its leftovers are removed
  by the next build. The builder writes tokenizer.json into the data; `make_tokenizer` also fills it in for a
  dataset built without one."""
  import tensorflow_datasets as tfds
  path = b.data_path  # <data_dir>/<builder name>/<config name>/<version>
  tok_path = path / tokenizer_lib.FILENAME
  if not (path.exists() and tok_path.exists()):
    with file_lock(os.path.join(path.parents[2], f'.{b.name}.{b.builder_config.name}.lock')):
      if not path.exists():
        for stale in path.parent.glob(f'incomplete.*_{path.name}'):  # left by killed builds
          stale.rmtree(missing_ok=True)
        b.download_and_prepare(download_config=tfds.download.DownloadConfig(
            download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
      if not tok_path.exists():
        tokenizer_lib.save(make_tokenizer(), tok_path)
  return os.fspath(path), tokenizer_lib.load(tok_path)


def open_split(builder_cls: type, config: Any, data_cfg: Any, split: str, name: str,
               parse: Callable[[Any], Any]) -> Any:
  """Random-access source of a built split of world `name` (module mmproj.data.<name>): tfds.data_source over
  array_record, its serialized records wrapped by `parse` (the module's ParsedSource). ValueError for an unknown
  split, FileNotFoundError naming the world's prepare when it is not built."""
  if split not in SPLITS:
    raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
  root = data_root(data_cfg, name)
  if not is_built(make_builder(builder_cls, config, data_cfg, name)):
    raise FileNotFoundError(f'{name} world {config.name} is not built under {root}; '
                            f'call mmproj.data.{name}.prepare(cfg.data) first')
  import tensorflow_datasets as tfds
  source = tfds.data_source(builder_cls.name, split=split, data_dir=root, download=False,
                            builder_kwargs={'config': config, 'file_format': 'array_record'})
  raw = getattr(source, 'data_source', None)   # the serialized records under TFDS's decoder
  return parse(raw) if raw is not None else source


@functools.lru_cache(maxsize=None)
def _example_proto() -> type:
  """tf.train.Example from TFDS's copy of the proto (no TensorFlow needed), imported on first use."""
  from tensorflow_datasets.proto import tf_example_pb2
  return tf_example_pb2.Example


def field_values(fields: Any, key: str, kind: str) -> Any:
  """The values ('bytes_list' | 'int64_list': `kind`) of feature `key` of a parsed tf.train.Example's
  features.feature map; KeyError naming a missing feature."""
  if key not in fields:                 # (indexing a proto map would insert an empty entry)
    raise KeyError(key)
  return getattr(fields[key], kind).value


def field_value(fields: Any, key: str, kind: str) -> Any:
  """The single value of feature `key`; ValueError naming it when it holds another number of values."""
  v = field_values(fields, key, kind)
  if len(v) != 1:
    raise ValueError(f'field {key!r}: {len(v)} values, expected 1')
  return v[0]


class ParsedRecords(abc.ABC):
  """What the worlds' ParsedSource classes share: a split's records parsed straight from their serialized
  tf.train.Example by protobuf's own parser (several times faster than TFDS's generic decoder, the largest item of
  the training loader's profile) into what TFDS's decoder returns: index int, caption bytes, questions / answers /
  families lists of bytes, and the world's media and annotations from the subclass's `_parse(fields)`.

  A record that does not parse raises protobuf's DecodeError, a missing field KeyError naming it, a malformed one
  ValueError naming it: the loader's bad-record handling (data.bad_records) sees the same faults as under TFDS's
  decoder. Subclasses hold only picklable state (grain's worker processes pickle the dataset)."""

  def __init__(self, raw: Any):
    self._raw = raw   # the split's serialized records (TFDS's array_record source)

  def __len__(self) -> int:
    return len(self._raw)

  def __repr__(self) -> str:
    return f'ParsedSource({self._raw!r})'

  def __getitem__(self, index: int) -> dict[str, Any]:
    fields = _example_proto().FromString(self._raw[index]).features.feature
    return {
        **self._parse(fields),
        'index': int(field_value(fields, 'index', 'int64_list')),
        'caption': field_value(fields, 'caption', 'bytes_list'),
        'questions': list(field_values(fields, 'questions', 'bytes_list')),
        'answers': list(field_values(fields, 'answers', 'bytes_list')),
        'families': list(field_values(fields, 'families', 'bytes_list')),
    }

  @abc.abstractmethod
  def _parse(self, fields: Any) -> dict[str, Any]:
    """The world's own fields of a record (its media, its annotation array) from the features.feature map."""


def chance_levels(source: Any, decode: Callable[[Any], Mapping[str, Any]], families: Sequence[str]
                  ) -> dict[str, float]:
  """Per family of `families` (and 'overall'): the exact-match accuracy over `source`'s records (each read by the
  world's `decode`) of always giving the family's most frequent answer, what a model that ignores the media and
  the question's wording scores at best. NaN for a family no record asks."""
  answers: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  for i in range(len(source)):
    rec = decode(source[i])
    for family, answer in zip(rec['families'], rec['answers']):
      answers[family][answer] += 1
  hits = {f: c.most_common(1)[0][1] for f, c in answers.items()}
  total = {f: sum(c.values()) for f, c in answers.items()}
  out = {'overall': sum(hits.values()) / max(sum(total.values()), 1)}
  out.update({f: hits[f] / total[f] if f in total else float('nan') for f in families})
  return out
