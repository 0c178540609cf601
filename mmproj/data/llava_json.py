"""LLaVA-format training data (LCS-558K stage-1 and LLaVA-665K stage-2 layouts) as TFDS array_record + grain.

Input: a JSON file holding a list of records

    {"id": str, "image": "relative/path.jpg" (optional: text-only records),
     "conversations": [{"from": "human", "value": "<image>\\nWhat is in the picture?"},
                       {"from": "gpt", "value": "A cat."}, ...]}

and the image folder the paths are relative to. `LlavaJson` (a TFDS `GeneratorBasedBuilder`, array_record, no
TensorFlow needed) stores one example per JSON record, in file order:

    index       int32       position of the record in the JSON list
    id          text        the record's "id" (str() of it)
    image       bytes       the image file's raw encoded bytes (b'' for text-only records); decoding, resizing and
                            cropping happen at read time, so the data set stays the size of the image folder
    image_path  text        the record's "image" ('' for text-only records), for error messages
    has_image   bool
    roles       text [n]    the turns' "from"
    values      text [n]    the turns' "value"

The builder config's name is `<json file stem>_<first 16 hex digits of the JSON's sha256>` (+ '_skipbad' with
data.bad_records='skip', which can build a different set), so an edited JSON builds a new data set next to the
old one (images are not hashed: a changed image folder with the same JSON needs a new data_dir).
`prepare(cfg.data)` builds it once under data.data_dir (file-locked, interrupted builds never read as complete)
and returns (dataset dir, tokenizer).

Bad records, by data.bad_records ('error' | 'skip'):
  at build time, a malformed JSON entry (not an object, no "id", no or malformed "conversations", a non-string
      "image", an image path that is not a file): 'error' fails the build naming the entry (index and id), the
      field and the file; 'skip' leaves the entry out of the data set, logs it and counts it (the count and the
      first entries are kept in BAD_ENTRIES_FILE beside the data and logged again by train_loader). Stored
      records keep their JSON position in `index`.
  at read time, a record whose image does not decode (or that cannot be read at all): 'error' raises naming the
      record id, JSON entry, image file and stream position; 'skip' puts a row that trains on nothing in its place
      (and sets the row's `bad_records` to 1), as mmproj.data.sampling describes.
Text longer than a row is not a bad record: data.overflow decides (truncate / leave out of the order / error),
whatever data.bad_records says.

`train_loader` yields batches of B = global_batch_size // process_count rows (L = num_image_tokens + text_len):

    image       uint8   [B, S, S, 3]  S = data.image_size; all zeros for text-only records
    tokens      int32   [B, L]        <bos>, the template's text with '<image>' -> num_image_tokens image ids
                                      (none for text-only records), right-padded with 0
    positions   int32   [B, L]        max(cumsum(input_mask) - 1, 0)
    input_mask  int32   [B, L]
    targets     int32   [B, L]        tokens shifted left by one, 0 at the end
    loss_mask   float32 [B, L]        1 where targets[t] is an assistant token (see mmproj.data.conversation)

Images (PIL, converted to RGB as LLaVA does) by data.image_aspect:
    'pad'     LLaVA-1.5: paste centred on a square of colour int(mean * 255) (LLaVA's `expand2square` colour,
              truncated as LLaVA does, mean = data.image_mean), then the CLIP processor's steps;
    'crop'    the CLIP processor: shortest edge -> S (bicubic), center crop S x S;
    'resize'  the SigLIP processor: bicubic resize to S x S (aspect ratio not kept).
The resize/crop steps are `mmproj.data.preprocess.ImageProcessor.resize_and_crop`; rescaling/normalisation happen
in the model. `resize_image(array, ...)` applies the same steps to a decoded image (inference).

data_cfg fields (ml_collections.ConfigDict, dict or attribute object):
    name          'llava_json' (required to be this value when given)
    json          path of the LLaVA JSON file (required)
    image_dir     folder the "image" paths are relative to (required unless every record is text-only)
    data_dir      where the TFDS data set is built (required)
    tokenizer     a tokenizer.json, or a directory holding one (required)
    template      'plain' (stage 1) | 'vicuna_v1' (stage 2); default 'vicuna_v1'
    text_len      text tokens per row, L = num_image_tokens + text_len; default 1472 (LLaVA-1.5: 2048 - 576)
    image_size    S; default 336
    image_aspect  'pad' | 'crop' | 'resize'; default 'pad'
    image_mean    3 floats, the 'pad' colour; default OPENAI_CLIP_MEAN (LLaVA-1.5's CLIP-L/336 processor)
    overflow      'truncate' | 'skip' | 'error' for rows longer than L; default 'truncate'
    bad_records   'error' | 'skip' for malformed entries and undecodable images (above); default 'error'
    image_token   default '<image>';  bos_token default '<s>';  eos_token default '</s>'
    worker_count  grain worker processes, 0 = in the calling process; default 0
    read_threads  threads reading + decoding records ahead; default 2
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np
import tensorflow_datasets as tfds
import tokenizers
from etils import epath
from PIL import Image

from mmproj.data import conversation
from mmproj.data.file_lock import file_lock
from mmproj.data import preprocess
from mmproj.data import sampling
from mmproj.data import shapes  # get_field; importing it also quiets TFDS's 'custom data configuration' warning

NAME = 'llava_json'
ASPECTS = ('pad', 'crop', 'resize')
SPLITS = ('train',)
DEFAULTS = dict(template='vicuna_v1', text_len=1472, image_size=336, image_aspect='pad',
                image_mean=preprocess.OPENAI_CLIP_MEAN, overflow='truncate', image_token=conversation.IMAGE_TOKEN,
                bos_token=conversation.BOS_TOKEN, eos_token=conversation.EOS_TOKEN, worker_count=0, read_threads=2,
                bad_records='error')
TOKENIZER_FILENAME = 'tokenizer.json'
BAD_ENTRIES_FILE = 'bad_entries.json'  # in the data set directory: JSON entries left out at build ('skip')
_log = logging.getLogger(__name__)


def config_value(data_cfg: Any, key: str) -> Any:
  """data_cfg.key, or its DEFAULTS value when the config leaves it out."""
  return shapes.get_field(data_cfg, key, DEFAULTS.get(key))


def _path_field(data_cfg: Any, key: str) -> str:
  value = config_value(data_cfg, key)
  if not value:
    raise ValueError(f'data.{key}: must be set')
  return shapes.local_dir(f'data.{key}', value)


def _check_name(data_cfg: Any) -> None:
  name = shapes.get_field(data_cfg, 'name', NAME)
  if name != NAME:
    raise ValueError(f'data.name: LLaVA-JSON data needs name={NAME!r}, got {name!r}')


# ----------------------------------------------------------------------------------------------- config


@functools.lru_cache(maxsize=16)
def _sha256(path: str, mtime_ns: int, size: int) -> str:
  del mtime_ns, size  # cache key only: an edited file is hashed again
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      h.update(block)
  return h.hexdigest()


def json_hash(json_path: str) -> str:
  """sha256 hex digest of the JSON file's bytes (cached per path, mtime and size)."""
  st = os.stat(json_path)
  return _sha256(json_path, st.st_mtime_ns, st.st_size)


@dataclasses.dataclass
class LlavaJsonConfig(tfds.core.BuilderConfig):
  """Where the JSON and images are; `name` (set from the JSON's stem and content hash) picks the directory."""
  name: str = ''
  json_path: str = ''
  image_dir: str = ''
  bad_records: str = 'error'


def config_from(data_cfg: Any) -> LlavaJsonConfig:
  """cfg.data -> LlavaJsonConfig (hashes the JSON; FileNotFoundError naming data.json when it is missing)."""
  _check_name(data_cfg)
  json_path = _path_field(data_cfg, 'json')
  if not os.path.isfile(json_path):
    raise FileNotFoundError(f'data.json: {json_path} is not a file')
  image_dir = config_value(data_cfg, 'image_dir')
  image_dir = os.path.abspath(os.path.expanduser(os.fspath(image_dir))) if image_dir else ''
  stem = re.sub(r'[^A-Za-z0-9_]+', '_', os.path.splitext(os.path.basename(json_path))[0])[:48] or 'data'
  bad = sampling.check_bad_records(config_value(data_cfg, 'bad_records'))
  # A 'skip' build may leave entries out: it must never be read by a run that asked for errors.
  suffix = '_skipbad' if bad == 'skip' else ''
  return LlavaJsonConfig(name=f'{stem}_{json_hash(json_path)[:16]}{suffix}', json_path=json_path,
                         image_dir=image_dir, bad_records=bad)


# ----------------------------------------------------------------------------------------------- TFDS builder


def _where(json_path: str, index: int, rec: Any = None) -> str:
  rid = rec.get('id') if isinstance(rec, Mapping) else None
  return (f'record {str(rid)!r} (' if rid is not None else '(') + f'entry {index} of {json_path})'


def tfds_example(rec: Any, index: int, json_path: str, image_dir: str) -> dict[str, Any]:
  """JSON record `index` -> the builder's feature dict (reads the image bytes). ValueError / FileNotFoundError
  naming the record id, JSON entry and file when the record is malformed or its image is missing."""
  where = _where(json_path, index, rec)
  if not isinstance(rec, Mapping):
    raise ValueError(f'{where}: a record must be a JSON object, got {type(rec).__name__}')
  if rec.get('id') is None:
    raise ValueError(f'{where}: the record has no "id"')
  rid = str(rec['id'])
  conv = rec.get('conversations')
  if not isinstance(conv, list) or not conv:
    raise ValueError(f'{where}: the record has no "conversations" (got {conv!r:.80})')
  roles, values = [], []
  for j, turn in enumerate(conv):
    if not isinstance(turn, Mapping) or not isinstance(turn.get('from'), str) or not isinstance(
        turn.get('value'), str):
      raise ValueError(f'{where}: conversations[{j}] must be {{"from": str, "value": str}}, got {turn!r:.80}')
    roles.append(turn['from'])
    values.append(turn['value'])
  image_rel = rec.get('image') or ''
  if not isinstance(image_rel, str):
    raise ValueError(f'{where}: "image" must be one relative path (one image per record), got {image_rel!r:.80}')
  try:
    conversation.rounds(roles, values, record_id=rid, has_image=bool(image_rel))  # template-independent checks
  except ValueError as e:
    raise ValueError(f"{where}: {str(e).removeprefix(f'record {rid!r}: ')}") from None
  data = b''
  if image_rel:
    if not image_dir:
      raise ValueError(f'{where} has image {image_rel!r} but data.image_dir is not set')
    path = os.path.join(image_dir, image_rel)
    if not os.path.isfile(path):
      raise FileNotFoundError(f'{where}: image file {path} not found (or not a file)')
    with open(path, 'rb') as f:
      data = f.read()
  return dict(index=index, id=rid, image=data, image_path=image_rel, has_image=bool(image_rel), roles=roles,
              values=values)


class LlavaJson(tfds.core.GeneratorBasedBuilder):
  """TFDS builder for one LLaVA JSON + image folder (array_record; records in JSON order)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  code_path = epath.Path(__file__)  # see ShapesWorld.code_path

  def _info(self) -> tfds.core.DatasetInfo:
    text = tfds.features.Text
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'index': tfds.features.Scalar(dtype=np.int32),
            'id': text(),
            # Raw file bytes: a scalar string tensor (Text would insist on UTF-8; Image would decode/re-encode).
            'image': tfds.features.Tensor(shape=(), dtype=np.object_),
            'image_path': text(),
            'has_image': tfds.features.Scalar(dtype=np.bool_),
            'roles': tfds.features.Sequence(text()),
            'values': tfds.features.Sequence(text()),
        }),
        disable_shuffling=True,  # records in JSON order (record i is entry i unless 'skip' left entries out)
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    c = self.builder_config
    with open(c.json_path, 'rb') as f:
      try:
        records = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f'data.json: {c.json_path} is not valid JSON: {e}') from None
    if not isinstance(records, list):
      raise ValueError(f'data.json: {c.json_path} must hold a list of records, got {type(records).__name__}')
    if not records:
      raise ValueError(f'data.json: {c.json_path} holds no records')
    bad = []  # (entry, id or None, cause) of the entries left out under bad_records='skip'
    for i, rec in enumerate(records):
      try:
        example = tfds_example(rec, i, c.json_path, c.image_dir)
      except (ValueError, OSError) as e:
        if c.bad_records != 'skip':
          raise
        bad.append((i, str(rec['id']) if isinstance(rec, Mapping) and rec.get('id') is not None else None, str(e)))
        if len(bad) <= sampling.MAX_NAMED:
          _log.warning('leaving JSON entry %d out of the data set (data.bad_records=skip): %s', i, e)
        continue
      yield i, example
    if len(bad) == len(records):
      raise ValueError(f'data.json: every one of the {len(records)} entries of {c.json_path} is malformed '
                       f'(data.bad_records=skip would leave nothing); the first: {bad[0][2]}')
    if bad:
      _log.warning('data.bad_records=skip: left %d of the %d entries of %s out of the data set', len(bad),
                   len(records), c.json_path)
      # Beside the data, in the build's temporary directory: it appears with the data set, atomically.
      with open(os.path.join(self.data_dir, BAD_ENTRIES_FILE), 'w') as f:
        json.dump({'count': len(bad), 'entries': len(records),
                   'first': [dict(entry=i, id=rid, cause=cause) for i, rid, cause in bad[:sampling.MAX_NAMED]]},
                  f, indent=1)


# ----------------------------------------------------------------------------------------------- prepare / read


def builder(data_cfg: Any) -> LlavaJson:
  """The TFDS builder for cfg.data (nothing is built)."""
  return LlavaJson(config=config_from(data_cfg), data_dir=_path_field(data_cfg, 'data_dir'),
                   file_format='array_record')


def is_prepared(data_cfg: Any) -> bool:
  return builder(data_cfg).data_path.exists()


def load_tokenizer(data_cfg: Any) -> tokenizers.Tokenizer:
  """data.tokenizer (a tokenizer.json or a directory holding one), checked for data.image_token/bos_token/
  eos_token (ValueError naming the field)."""
  path = _path_field(data_cfg, 'tokenizer')
  if os.path.isdir(path):
    path = os.path.join(path, TOKENIZER_FILENAME)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'data.tokenizer: {path} not found')
  try:
    tok = tokenizers.Tokenizer.from_file(path)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'data.tokenizer: cannot load {path}: {e}') from None
  special_tokens(data_cfg, tok)
  return tok


def special_tokens(data_cfg: Any, tok: tokenizers.Tokenizer) -> conversation.SpecialTokens:
  return conversation.SpecialTokens.from_tokenizer(
      tok, image_token=config_value(data_cfg, 'image_token'), bos_token=config_value(data_cfg, 'bos_token'),
      eos_token=config_value(data_cfg, 'eos_token'))


def prepare(data_cfg: Any) -> tuple[str, tokenizers.Tokenizer]:
  """Builds the data set on first use under data.data_dir and returns (dataset dir, tokenizer).

  A no-op when already built. TFDS generates into `incomplete.*` and renames the directory at the end, so an
  interrupted build never reads as complete; its leftovers are removed by the next prepare().
  """
  tok = load_tokenizer(data_cfg)  # fail fast, before a long build
  b = builder(data_cfg)
  path = b.data_path  # <data_dir>/llava_json/<stem>_<hash>/<version>
  if not path.exists():
    with file_lock(os.path.join(_path_field(data_cfg, 'data_dir'), f'.{b.name}.{b.builder_config.name}.lock')):
      if not path.exists():
        for stale in path.parent.glob(f'incomplete.*_{path.name}'):  # left by killed builds
          stale.rmtree(missing_ok=True)
        b.download_and_prepare(download_config=tfds.download.DownloadConfig(
            download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
  return os.fspath(path), tok


def data_source(data_cfg: Any, split: str = 'train'):
  """Random-access source of the stored records of a prepared split (tfds.data_source over array_record)."""
  if split not in SPLITS:
    raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
  config = config_from(data_cfg)
  data_dir = _path_field(data_cfg, 'data_dir')
  if not LlavaJson(config=config, data_dir=data_dir, file_format='array_record').data_path.exists():
    raise FileNotFoundError(f'{config.json_path} is not built under {data_dir} (config {config.name}); call '
                            'mmproj.data.llava_json.prepare(cfg.data) first')
  return tfds.data_source(NAME, split=split, data_dir=data_dir, download=False,
                          builder_kwargs={'config': config, 'file_format': 'array_record'})


def _txt(v: Any) -> str:
  return v.decode('utf-8') if isinstance(v, bytes) else str(v)


def decode_record(record: Mapping[str, Any]) -> dict[str, Any]:
  """A record from `data_source` with text as str and the image as raw bytes."""
  return {
      'index': int(record['index']),
      'id': _txt(record['id']),
      'image': bytes(record['image']),
      'image_path': _txt(record['image_path']),
      'has_image': bool(record['has_image']),
      'roles': [_txt(v) for v in record['roles']],
      'values': [_txt(v) for v in record['values']],
  }


# ----------------------------------------------------------------------------------------------- images


@functools.lru_cache(maxsize=None)
def image_processor(aspect: str, size: int) -> preprocess.ImageProcessor:
  """The resize/crop steps of `aspect` at S = size (see module docstring)."""
  if aspect in ('pad', 'crop'):
    return preprocess.ImageProcessor.clip(size=size, crop_size=(size, size))
  if aspect == 'resize':
    return preprocess.ImageProcessor.siglip(size=(size, size))
  raise ValueError(f'data.image_aspect: {aspect!r} is not one of {ASPECTS}')


def pad_color(mean: Sequence[float]) -> tuple[int, int, int]:
  """LLaVA's expand2square background: int(m * 255) per channel (truncated, as LLaVA)."""
  return tuple(int(m * 255) for m in mean)


def _pad_to_square(img: Image.Image, color: tuple[int, int, int]) -> Image.Image:
  w, h = img.size
  if w == h:
    return img
  side = max(w, h)
  out = Image.new(img.mode, (side, side), color)
  out.paste(img, ((side - w) // 2, (side - h) // 2))
  return out


def _resize_pil(img: Image.Image, size: int, aspect: str, mean: Sequence[float] | None) -> np.ndarray:
  proc = image_processor(aspect, size)
  img = img.convert('RGB')  # as LLaVA: grayscale repeated, alpha dropped
  if aspect == 'pad':
    img = _pad_to_square(img, pad_color(preprocess.OPENAI_CLIP_MEAN if mean is None else mean))
  return proc.resize_and_crop(np.asarray(img))  # [S, S, 3]


def resize_image(image: np.ndarray, *, size: int, aspect: str,
                 mean: Sequence[float] | None = None) -> np.ndarray:
  """A decoded uint8 image [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] -> uint8 [size, size, 3], exactly as the
  training loader treats a decoded file (`aspect`: 'pad' | 'crop' | 'resize'; `mean`: the 'pad' colour's
  source, None = OPENAI_CLIP_MEAN)."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f'images must be uint8, got {image.dtype}')
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  if not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (3, 4))):
    raise ValueError(f'an image must be [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], got shape {image.shape}')
  return _resize_pil(Image.fromarray(image), size, aspect, mean)


def load_image(data: bytes, *, size: int, aspect: str, mean: Sequence[float] | None = None,
               where: str = 'image') -> np.ndarray:
  """Encoded image bytes -> uint8 [size, size, 3] (see `resize_image`). ValueError naming `where` when the bytes
  do not decode."""
  try:
    with Image.open(io.BytesIO(data)) as im:
      im.load()
      img = im.convert('RGB')
  except Exception as e:  # pylint: disable=broad-except  (PIL raises several types for bad files)
    raise ValueError(f'{where}: cannot decode the image: {type(e).__name__}: {e}') from None
  return _resize_pil(img, size, aspect, mean)


# ----------------------------------------------------------------------------------------------- loader


def _check_options(data_cfg: Any) -> dict[str, Any]:
  """The row options from cfg.data, validated (ValueError naming the field)."""
  o = {k: config_value(data_cfg, k) for k in ('template', 'text_len', 'image_size', 'image_aspect', 'image_mean',
                                       'overflow', 'bad_records')}
  sampling.check_bad_records(o['bad_records'])
  if o['template'] not in conversation.TEMPLATES:
    raise ValueError(f'data.template: {o["template"]!r} is not one of {conversation.TEMPLATES}')
  if o['overflow'] not in conversation.OVERFLOW_POLICIES:
    raise ValueError(f'data.overflow: {o["overflow"]!r} is not one of {conversation.OVERFLOW_POLICIES}')
  if o['image_aspect'] not in ASPECTS:
    raise ValueError(f'data.image_aspect: {o["image_aspect"]!r} is not one of {ASPECTS}')
  for k in ('text_len', 'image_size'):
    if isinstance(o[k], bool) or not isinstance(o[k], (int, np.integer)) or o[k] < 1:
      raise ValueError(f'data.{k}: must be a positive int, got {o[k]!r}')
    o[k] = int(o[k])
  mean = o['image_mean']
  if (not isinstance(mean, Sequence) or isinstance(mean, str) or len(mean) != 3
      or not all(isinstance(m, (int, float)) and 0 <= m <= 1 for m in mean)):
    raise ValueError(f'data.image_mean: must be 3 floats in [0, 1], got {mean!r}')
  o['image_mean'] = tuple(float(m) for m in mean)
  return o


@dataclasses.dataclass
class LlavaRow(grain.transforms.Map):
  """A stored record -> one training row (layout in the module docstring). With data.overflow='skip' the loader
  draws only records that fit (`_records_that_fit`), so every record it maps makes a row."""
  tok: tokenizers.Tokenizer
  special: conversation.SpecialTokens
  template: str
  num_image_tokens: int
  text_len: int
  overflow: str
  image_size: int
  image_aspect: str
  image_mean: tuple[float, float, float]

  def map(self, element: Mapping[str, Any]) -> dict[str, np.ndarray]:
    rec = decode_record(element)
    rid = rec['id']
    segs = conversation.segments(self.template, rec['roles'], rec['values'], record_id=rid,
                                 has_image=rec['has_image'], image_token=self.special.image,
                                 eos_token=self.special.eos)
    row = conversation.tokenize(self.tok, segs, self.special,
                                num_image_tokens=self.num_image_tokens if rec['has_image'] else 0,
                                text_len=self.text_len + (0 if rec['has_image'] else self.num_image_tokens),
                                overflow=self.overflow, record_id=rid)
    if row is None:  # the length pre-pass kept a record that does not fit: its cache disagrees with the data
      raise sampling.Unskippable(f'record {rid!r} (entry {rec["index"]}) is longer than L = '
                                 f'{self.num_image_tokens + self.text_len} but data.overflow=skip kept it; delete '
                                 'the token_lengths-*.npy files beside the data set')
    s = self.image_size
    if rec['has_image']:
      where = f"record {rid!r} (entry {rec['index']}), image file {rec['image_path']!r}"
      row['image'] = load_image(rec['image'], size=s, aspect=self.image_aspect, mean=self.image_mean, where=where)
    else:
      row['image'] = np.zeros((s, s, 3), np.uint8)
    return row

  def blank_row(self) -> dict[str, np.ndarray]:
    """The stand-in for a bad record (data.bad_records='skip'): all padding (masks 0) and a black image."""
    row = conversation.tokenize(self.tok, [], self.special, num_image_tokens=0,
                                text_len=self.num_image_tokens + self.text_len)
    row = {k: np.zeros_like(v) for k, v in row.items()}
    row['tokens'][:] = self.special.pad_id
    row['targets'][:] = self.special.pad_id
    row['image'] = np.zeros((self.image_size, self.image_size, 3), np.uint8)
    return row


def train_loader(data_cfg: Any, tok: tokenizers.Tokenizer, *, num_image_tokens: int, global_batch_size: int,
                 seed: int, process_index: int | None = None, process_count: int | None = None,
                 worker_count: int | None = None, worker_buffer_size: int = 1, read_threads: int | None = None,
                 split: str = 'train') -> grain.IterDataset:
  """Infinite, shuffled (by `seed`, reshuffled every epoch) training batches for one process; the same contract
  as `mmproj.data.pipeline.train_loader` (batch layout in the module docstring).

  Global batch k holds positions [k*B, (k+1)*B) of one seeded record order (mmproj.data.sampling) and process p of
  P reads rows [p*B/P, (p+1)*B/P) of it, so the global batch at a step does not depend on the process count.
  `iter(loader)` has get_state()/set_state() (and is saved with grain.checkpoint.CheckpointSave inside
  ocp.args.Composite). process_index/count default to jax.process_index()/process_count(); worker_count to
  data.worker_count; read_threads to data.read_threads.
  With data.overflow='skip' the order is over the records that fit in L only: every record's length is computed
  when the loader is built (reading the whole split once; cached beside the data set per tokenizer, template and
  num_image_tokens) and the records left out are logged.
  data.bad_records='skip': a record that cannot be made into a row gets a stand-in row that trains on nothing, and
  every row carries `bad_records` (int32, 1 on stand-ins); JSON entries left out at build time are logged again.
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
  o = _check_options(data_cfg)
  special = special_tokens(data_cfg, tok)
  if worker_count is None:
    worker_count = int(config_value(data_cfg, 'worker_count') or 0)
  if read_threads is None:
    read_threads = int(config_value(data_cfg, 'read_threads'))
  if worker_count > 0:
    from absl import flags  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags; outside absl.app use defaults
      flags.FLAGS.mark_as_parsed()

  source = data_source(data_cfg, split)
  if process_index == 0:
    _log_bad_entries(data_cfg)
  records = None
  if o['overflow'] == 'skip':
    records = _records_that_fit(data_cfg, tok, source, num_image_tokens=num_image_tokens,
                                seq_len=num_image_tokens + o['text_len'], split=split, log=process_index == 0)
  row = LlavaRow(tok, special, o['template'], num_image_tokens, o['text_len'], o['overflow'], o['image_size'],
                 o['image_aspect'], o['image_mean'])
  return sampling.train_dataset(source, row, global_batch_size=global_batch_size, seed=int(seed),
                                process_index=process_index, process_count=process_count, records=records,
                                read_threads=read_threads, worker_count=worker_count,
                                worker_buffer_size=worker_buffer_size, split=split,
                                bad_records=o['bad_records'])


def bad_entries(data_cfg: Any) -> dict[str, Any]:
  """The JSON entries a data.bad_records='skip' build left out: {'count', 'entries' (in the JSON), 'first':
  [{'entry', 'id', 'cause'}, ...]}; count 0 when none were (or the build was not 'skip')."""
  path = os.path.join(os.fspath(builder(data_cfg).data_path), BAD_ENTRIES_FILE)
  if not os.path.isfile(path):
    return {'count': 0, 'entries': None, 'first': []}
  with open(path) as f:
    return json.load(f)


def _log_bad_entries(data_cfg: Any) -> None:
  bad = bad_entries(data_cfg)
  if bad['count']:
    _log.warning('data.bad_records=skip: %d of the %d entries of %s were left out when the data set was built '
                 '(the first: %s)', bad['count'], bad['entries'], _path_field(data_cfg, 'json'),
                 '; '.join(f"entry {b['entry']}: {b['cause']}" for b in bad['first'][:3]))


_MAX_SKIPS_LOGGED = 100


def _records_that_fit(data_cfg: Any, tok: tokenizers.Tokenizer, source, *, num_image_tokens: int, seq_len: int,
                      split: str, log: bool = True) -> np.ndarray:
  """int64 [K]: the indices of the records whose untruncated row fits in seq_len (data.overflow='skip'); logs the
  others when `log` (the first process only, in a multi-process run). Lengths come from `token_lengths`, cached
  as .npy in the data set directory (keyed by the tokenizer, the template, the special tokens and
  num_image_tokens; not cached when that directory is read-only)."""
  key = hashlib.sha256('\n'.join(map(str, (tok.to_str(), config_value(data_cfg, 'template'), special_tokens(data_cfg, tok),
                                            num_image_tokens, split))).encode()).hexdigest()[:16]
  cache = os.path.join(os.fspath(builder(data_cfg).data_path), f'token_lengths-{split}-{key}.npy')
  lengths = None
  if os.path.isfile(cache):
    try:
      lengths = np.load(cache, allow_pickle=False)
    except (OSError, ValueError):  # unreadable: computed again below
      lengths = None
    if lengths is not None and lengths.shape != (len(source),):
      lengths = None
  if lengths is None:
    lengths = token_lengths(data_cfg, tok, num_image_tokens=num_image_tokens, split=split)
    try:
      tmp = f'{cache}.{os.getpid()}.tmp.npy'
      np.save(tmp, lengths)
      os.replace(tmp, cache)  # atomic: processes building the same cache at once all write the same array
    except OSError as e:
      _log.info('not caching token lengths in %s: %s', cache, e)
  too_long = np.flatnonzero(lengths > seq_len)
  for i in too_long[:_MAX_SKIPS_LOGGED if log else 0]:
    rec = source[int(i)]
    _log.warning('skipping record %r (entry %d): %d tokens > L = %d (data.overflow=skip)', _txt(rec['id']),
                 int(rec['index']), int(lengths[i]), seq_len)
  if len(too_long) and log:
    _log.warning('data.overflow=skip: %d of the %d %s records are longer than L = %d and are not trained on%s',
                 len(too_long), len(lengths), split, seq_len,
                 f' (the first {_MAX_SKIPS_LOGGED} are named above)' if len(too_long) > _MAX_SKIPS_LOGGED else '')
  if len(too_long) == len(lengths):
    raise ValueError(f'every record is longer than L = {seq_len} (data.overflow=skip would never yield a row); '
                     'raise data.text_len')
  return np.flatnonzero(lengths <= seq_len)


def token_lengths(data_cfg: Any, tok: tokenizers.Tokenizer, *, num_image_tokens: int,
                  split: str = 'train') -> np.ndarray:
  """int32 [N]: every record's untruncated row length (<bos> + image block + text) under cfg.data's template,
  in record order; e.g. to choose data.text_len or count what overflow='skip' would drop. Reads all records.
  A record that cannot be read or tokenized is a bad record: an error naming it, or with data.bad_records='skip'
  length -1 (it stays in the training order, where it gets a stand-in row and is counted)."""
  o = _check_options(data_cfg)
  special = special_tokens(data_cfg, tok)
  source = data_source(data_cfg, split)
  out = np.zeros(len(source), np.int32)
  for i in range(len(source)):
    raw = None
    try:
      raw = source[i]
      rec = decode_record(raw)
      segs = conversation.segments(o['template'], rec['roles'], rec['values'], record_id=rec['id'],
                                   has_image=rec['has_image'], image_token=special.image, eos_token=special.eos)
      ids, _, _ = conversation.encode_segments(tok, segs, special,
                                               num_image_tokens=num_image_tokens if rec['has_image'] else 0,
                                               record_id=rec['id'])
    except Exception as e:  # pylint: disable=broad-except  (judged by data.bad_records)
      if o['bad_records'] != 'skip':
        raise ValueError(f'bad {sampling.record_name(split, i, raw)}: {sampling.fault(e)} '
                         '(data.bad_records=error; set it to skip to train past bad records)') from e
      out[i] = -1
      continue
    out[i] = len(ids)
  return out
