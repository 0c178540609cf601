"""The procedural 'tones' world: short clips of synthesized sound events, captions, and closed-vocabulary audio QA.

Each record is a pure function of (seed, split, index): `np.random.default_rng([seed, split_id, index])` draws
min_events..max_events (default 1..4) non-overlapping sound events in a clip of data.clip_seconds (default 2 s) at
16 kHz, each with

  - a kind (`KINDS`): sine, square, sawtooth or triangle tone (band-limited additive synthesis, so no aliasing),
    a noise burst (white noise band-passed around the register's frequency), or a chord (2-3 simultaneous sines:
    root + fifth, or root + major third + fifth);
  - a register (`PITCHES` low / middle / high, `PITCH_HZ` apart by a factor of three, about 19 semitones, so a
    log-mel front end tells them apart at a glance), the fundamental (a chord's root, a noise burst's band centre)
    jittered by up to a semitone;
  - a loudness (`LOUDNESS` quiet / loud, `LOUDNESS_RMS` 14 dB apart, jittered by up to 1.5 dB);
  - an onset, named by the third of the clip it falls in (`TIMINGS` early / middle / late), and a duration.
Events fade in and out over `FADE_SECONDS` (no clicks), sit at least `MIN_GAP_SECONDS` apart, and lie on mild white
background noise. The clip is stored as int16 PCM bytes and decoded to float32 in [-1, 1) under 'audio' [S].

  - a caption naming the events in time order: "a loud high square tone , then a quiet low noise burst"
  - question/answer pairs from six families (`FAMILIES`), one of each family that applies:
      count     "how many sounds are there ?"                   one .. six (uniform over min..max_events)
      order     "is the second sound higher than the first ?"  yes / no: two tones (`TONAL`: a noise burst has a
                band, not a pitch) of different registers; 'higher' or 'lower' drawn to make yes and no equally likely
      timbre    "what kind of sound is the first one ?"        sine / square / sawtooth / triangle / noise / chord
      timing    "when does the square tone start ?"            early / middle / late, about a kind that occurs once;
                the answer is drawn first among those the clip offers, which evens out the thirds
      loudness  "how loud is the last sound ?"                 quiet / loud
      pitch     "what pitch is the second sound ?"             low / middle / high (a noise burst's is its band's)
    Sounds are named by ordinal in time order ("first" .. "sixth", or "last" for the final one of two or more).
`chance_levels` gives each family's chance level: the accuracy of always answering its most frequent answer.

`TonesWorld` is a TFDS `GeneratorBasedBuilder` written as array_record (no TensorFlow needed to build or read);
`prepare(cfg.data)` builds it once under `cfg.data.data_dir` and returns (dataset dir, tokenizer).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
import tokenizers
from etils import epath

from mmproj.data import shapes
from mmproj.data import tokenizer as tokenizer_lib
from mmproj.data import worlds

FAMILIES = ('count', 'order', 'timbre', 'timing', 'loudness', 'pitch')
SAMPLE_RATE = 16_000  # Hz: the codebase's audio convention ('audio' float32 [B, S] at 16 kHz)
KINDS = ('sine', 'square', 'sawtooth', 'triangle', 'noise', 'chord')
KIND_NAMES = ('sine tone', 'square tone', 'sawtooth tone', 'triangle tone', 'noise burst', 'chord')  # in captions
TONAL = tuple(k for k in KINDS if k != 'noise')  # kinds with a pitch ('order' compares two of these)
PITCHES = ('low', 'middle', 'high')
PITCH_HZ = (220.0, 660.0, 1980.0)  # register centres, a factor of 3 (19 semitones) apart
LOUDNESS = ('quiet', 'loud')
LOUDNESS_RMS = (0.03, 0.15)  # an event's RMS before fades; loud noise peaks stay well inside [-1, 1)
TIMINGS = ('early', 'middle', 'late')  # the third of the clip an onset falls in
NUMBERS = ('zero', 'one', 'two', 'three', 'four', 'five', 'six')
ORDINALS = ('first', 'second', 'third', 'fourth', 'fifth', 'sixth')
MAX_EVENTS = len(ORDINALS)
SPLITS = {'train': 0, 'test': 1}  # split name -> split_id in the record rng key
# Per-event annotations (indices into KINDS / PITCHES / LOUDNESS / TIMINGS; start/stop: samples, stop exclusive).
EVENT_FIELDS = ('kind', 'pitch', 'loudness', 'timing', 'start', 'stop')

DURATION_SECONDS = (0.15, 0.4)  # an event's duration is uniform in this range
MIN_GAP_SECONDS = 0.08          # silence between events, so that counting them is well posed
MARGIN_SECONDS = 0.05           # silence before the first and after the last event
FADE_SECONDS = 0.01             # raised-cosine fade in and out of every event
PITCH_JITTER_SEMITONES = 1.0
GAIN_JITTER_DB = 1.5
BACKGROUND_RMS = (0.002, 0.004)  # white background noise, uniform per clip (quiet events sit ~20 dB above it)
NOISE_BAND_OCTAVES = 0.35        # standard deviation of a noise burst's Gaussian band in log2 frequency
MAX_HARMONIC_HZ = 7_200.0        # additive synthesis stops below the 8 kHz Nyquist frequency
MAX_CLIP_SECONDS = 30.0
_MAX_PLACEMENT_DRAWS = 1000

_TEMPLATE_WORDS = ('a , then how many sounds are there ? is the sound higher lower than what kind of one when does '
                   'start loud pitch caption yes no last')
WORDS = tuple(sorted(set(_TEMPLATE_WORDS.split()) | {w for name in KIND_NAMES for w in name.split()}
                     | set(KINDS) | set(PITCHES) | set(LOUDNESS) | set(TIMINGS) | set(NUMBERS[1:]) | set(ORDINALS)))
VOCAB_SIZE = tokenizer_lib.NUM_SPECIAL + len(WORDS)  # <= tokenizer_lib.MAX_VOCAB_SIZE = 64
MEDIA = 'audio'               # the batch key of this world's media (mmproj/data/__init__.py)
CAPTION_QUESTION = 'caption'  # a caption example is `<bos> <audio>*M caption <sep> <the caption's words> <eos>`

DEFAULTS = dict(clip_seconds=2.0, num_train=10_000, num_test=1_000, min_events=1, max_events=4, seed=0)


def make_tokenizer() -> tokenizers.Tokenizer:
  """The world's tokenizer: fixed specials, then the sorted `WORDS` (VOCAB_SIZE ids)."""
  return tokenizer_lib.build(WORDS)


def families(data_cfg: Any = None) -> tuple[str, ...]:
  """The question families of the tones world, in report order."""
  del data_cfg
  return FAMILIES


def num_samples(clip_seconds: float) -> int:
  """Samples in a clip of `clip_seconds` at SAMPLE_RATE: the length S of 'audio'."""
  return int(round(clip_seconds * SAMPLE_RATE))


# ----------------------------------------------------------------------------------------------- config


@dataclasses.dataclass
class TonesWorldConfig(tfds.core.BuilderConfig):
  """World parameters; `name` is derived from them, so different settings never share a directory."""
  name: str = ''  # filled in by __post_init__
  clip_seconds: float = DEFAULTS['clip_seconds']
  num_train: int = DEFAULTS['num_train']
  num_test: int = DEFAULTS['num_test']
  min_events: int = DEFAULTS['min_events']
  max_events: int = DEFAULTS['max_events']
  seed: int = DEFAULTS['seed']

  def __post_init__(self):
    validate(self)
    expected = config_name(self)
    if self.name in (None, '', expected):
      object.__setattr__(self, 'name', expected)
    else:
      raise ValueError(f'TonesWorldConfig name {self.name!r} does not match its values ({expected!r})')

  @property
  def num_samples(self) -> int:
    return num_samples(self.clip_seconds)


def config_name(c: Any) -> str:
  # Milliseconds, so that the name holds no '.' whatever the clip length.
  return (f'clip{int(round(c.clip_seconds * 1000))}ms_ev{c.min_events}-{c.max_events}'
          f'_n{c.num_train}-{c.num_test}_seed{c.seed}')


def min_clip_seconds(max_events: int) -> float:
  """The shortest clip that holds max_events events of the longest duration with their gaps and margins."""
  return 2 * MARGIN_SECONDS + max_events * DURATION_SECONDS[1] + (max_events - 1) * MIN_GAP_SECONDS


def validate(c: Any) -> None:
  """ValueError naming the offending `data.*` field."""
  def fail(field, msg):
    raise ValueError(f'data.{field}: {msg}')
  for f in ('num_train', 'num_test', 'min_events', 'max_events', 'seed'):
    v = getattr(c, f)
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
      fail(f, f'must be an int, got {v!r}')
  v = c.clip_seconds
  if not isinstance(v, (int, float, np.integer, np.floating)) or isinstance(v, bool) or not np.isfinite(v):
    fail('clip_seconds', f'must be a finite number of seconds, got {v!r}')
  if not 1 <= c.min_events <= c.max_events:
    fail('min_events', f'need 1 <= min_events <= max_events, got {c.min_events}, {c.max_events}')
  if c.max_events > MAX_EVENTS:
    fail('max_events', f'must be <= {MAX_EVENTS} (ordinals are named up to {ORDINALS[-1]!r}), got {c.max_events}')
  shortest = min_clip_seconds(c.max_events)
  if abs(c.clip_seconds * 1000 - round(c.clip_seconds * 1000)) > 1e-6:
    fail('clip_seconds', f'must be a whole number of milliseconds (it names the build), got {c.clip_seconds!r}')
  if not shortest - 1e-9 <= c.clip_seconds <= MAX_CLIP_SECONDS:  # (1e-9: shortest is a float sum)
    fail('clip_seconds', f'must be in [{shortest:g}, {MAX_CLIP_SECONDS:g}] for max_events={c.max_events} (each event '
         f'up to {DURATION_SECONDS[1]:g} s, {MIN_GAP_SECONDS:g} s apart), got {c.clip_seconds!r}')
  for f in ('num_train', 'num_test'):
    if getattr(c, f) < 1:
      fail(f, f'must be >= 1, got {getattr(c, f)}')
  if not 0 <= c.seed < 2 ** 32:
    fail('seed', f'must be in [0, 2**32), got {c.seed}')


def config_from(data_cfg: Any) -> TonesWorldConfig:
  """cfg.data (ConfigDict, dict or attribute object) -> TonesWorldConfig; checks `data.name == 'tones'`."""
  name = shapes.get_field(data_cfg, 'name', 'tones')
  if name != 'tones':
    raise ValueError(f"data.name: the tones world needs name='tones', got {name!r}")
  values = {k: shapes.get_field(data_cfg, k, v) for k, v in DEFAULTS.items()}
  # Whole numbers given as floats (1e4) are accepted as ints; anything else is left for `validate` to name.
  for k, v in values.items():
    if k != 'clip_seconds' and isinstance(v, (float, np.floating)) and float(v).is_integer():
      values[k] = int(v)
  if isinstance(values['clip_seconds'], (int, np.integer)) and not isinstance(values['clip_seconds'], bool):
    values['clip_seconds'] = float(values['clip_seconds'])
  return TonesWorldConfig(**values)


# ----------------------------------------------------------------------------------------------- synthesis


def _additive(freq: float, phase: float, length: int, kind: str) -> np.ndarray:
  """A band-limited periodic waveform of `kind` at `freq` Hz (harmonics below MAX_HARMONIC_HZ): float64 [length]."""
  k = np.arange(1, int(MAX_HARMONIC_HZ // freq) + 1)                          # [K] harmonic numbers
  if kind == 'square':                       # odd harmonics, 1/k
    k = k[k % 2 == 1]
    amp = 1.0 / k
  elif kind == 'sawtooth':                   # all harmonics, alternating sign, 1/k
    amp = (-1.0) ** (k + 1) / k
  elif kind == 'triangle':                   # odd harmonics, alternating sign, 1/k^2
    k = k[k % 2 == 1]
    amp = (-1.0) ** ((k - 1) // 2) / k ** 2
  else:
    raise ValueError(f'no additive recipe for kind {kind!r}')
  theta = 2 * np.pi * freq * np.arange(length) / SAMPLE_RATE + phase            # [length]
  return amp @ np.sin(k[:, None] * theta[None, :])                             # [K] @ [K, length] -> [length]


def _band_noise(rng: np.random.Generator, centre_hz: float, length: int) -> np.ndarray:
  """White noise shaped by a Gaussian band in log2 frequency around `centre_hz`: float64 [length]."""
  spectrum = np.fft.rfft(rng.standard_normal(length))                          # [length // 2 + 1]
  hz = np.fft.rfftfreq(length, 1 / SAMPLE_RATE)
  octaves = np.log2(np.maximum(hz, 1.0) / centre_hz)
  return np.fft.irfft(spectrum * np.exp(-0.5 * (octaves / NOISE_BAND_OCTAVES) ** 2), n=length)


def synthesize(rng: np.random.Generator, kind: int, pitch: int, loudness: int, length: int) -> np.ndarray:
  """One event: `length` samples of KINDS[kind] in register PITCHES[pitch] at LOUDNESS[loudness], with the
  within-class jitter (fundamental, gain, phase, chord shape) drawn from `rng` and fades at both ends: float64."""
  freq = PITCH_HZ[pitch] * 2 ** (rng.uniform(-1, 1) * PITCH_JITTER_SEMITONES / 12)
  name = KINDS[kind]
  if name == 'noise':
    wave = _band_noise(rng, freq, length)
  elif name in ('sine', 'chord'):
    ratios = [1.0] if name == 'sine' else ([1.0, 1.5] if rng.random() < 0.5 else [1.0, 2 ** (4 / 12), 1.5])
    t = np.arange(length) / SAMPLE_RATE
    wave = sum(np.sin(2 * np.pi * freq * r * t + rng.uniform(0, 2 * np.pi)) for r in ratios)
  else:
    wave = _additive(freq, rng.uniform(0, 2 * np.pi), length, name)
  gain_db = rng.uniform(-1, 1) * GAIN_JITTER_DB
  wave = wave * (LOUDNESS_RMS[loudness] * 10 ** (gain_db / 20) / max(np.sqrt(np.mean(wave ** 2)), 1e-12))
  fade = min(int(FADE_SECONDS * SAMPLE_RATE), length // 2)
  ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(fade) + 0.5) / fade)          # [fade] raised cosine, 0 -> 1
  wave[:fade] *= ramp
  wave[length - fade:] *= ramp[::-1]
  return wave


def _sample_events(rng: np.random.Generator, c: TonesWorldConfig) -> dict[str, np.ndarray]:
  """n events in time order: their classes, and start/stop samples.

  Onsets are placed third by third: each event's third of the clip is drawn uniformly (then sorted), and its
  onset uniformly within the part of that third that leaves room for it and the events after it; a draw with no
  room is drawn again. (Uniform onsets would make 'late' rare: an event must also end inside the clip.)
  """
  n = int(rng.integers(c.min_events, c.max_events + 1))
  kind = rng.integers(0, len(KINDS), n)
  pitch = rng.integers(0, len(PITCHES), n)
  loudness = rng.integers(0, len(LOUDNESS), n)
  clip, third_len = c.clip_seconds, c.clip_seconds / len(TIMINGS)
  for _ in range(_MAX_PLACEMENT_DRAWS):
    thirds = np.sort(rng.integers(0, len(TIMINGS), n))
    duration = rng.uniform(*DURATION_SECONDS, n)                                # [n] seconds
    start_s, earliest = np.zeros(n), MARGIN_SECONDS
    for i in range(n):
      latest = clip - MARGIN_SECONDS - duration[i:].sum() - (n - 1 - i) * MIN_GAP_SECONDS
      lo, hi = max(thirds[i] * third_len, earliest), min((thirds[i] + 1) * third_len, latest)
      if lo >= hi:
        break
      start_s[i] = rng.uniform(lo, hi)
      earliest = start_s[i] + duration[i] + MIN_GAP_SECONDS
    else:
      break
  else:  # a draw fails at most a few dozen times at the tightest settings `validate` allows; a record exists even so
    duration = np.full(n, DURATION_SECONDS[0])
    start_s = MARGIN_SECONDS + np.arange(n) * (DURATION_SECONDS[0] + MIN_GAP_SECONDS)
  start = np.round(start_s * SAMPLE_RATE).astype(np.int64)
  stop = start + np.round(duration * SAMPLE_RATE).astype(np.int64)
  timing = np.minimum(len(TIMINGS) * start // c.num_samples, len(TIMINGS) - 1)
  values = dict(kind=kind, pitch=pitch, loudness=loudness, timing=timing, start=start, stop=stop)
  return {k: np.asarray(values[k], np.int32) for k in EVENT_FIELDS}


def render(rng: np.random.Generator, events: Mapping[str, np.ndarray], clip_seconds: float) -> np.ndarray:
  """The clip: every event synthesized in its span over background noise, quantized to int16 [S]."""
  s = num_samples(clip_seconds)
  clip = rng.standard_normal(s) * rng.uniform(*BACKGROUND_RMS)                  # [S]
  for k, p, z, a, b in zip(events['kind'], events['pitch'], events['loudness'], events['start'], events['stop']):
    clip[a:b] += synthesize(rng, int(k), int(p), int(z), int(b - a))
  return np.clip(np.round(clip * 32768), -32768, 32767).astype(np.int16)


def pcm_to_float(pcm: np.ndarray) -> np.ndarray:
  """int16 PCM [S] -> float32 [S] in [-1, 1)."""
  return np.asarray(pcm, np.int16).astype(np.float32) / 32768


# ----------------------------------------------------------------------------------------------- text


def event_phrase(kind: int, pitch: int, loudness: int) -> str:
  """'a loud high square tone' (a noise burst's register is its band's: 'a quiet low noise burst')."""
  return f'a {LOUDNESS[loudness]} {PITCHES[pitch]} {KIND_NAMES[kind]}'


def caption(events: Mapping[str, np.ndarray]) -> str:
  """The events in time order: 'a loud high square tone , then a quiet low noise burst' (5-6 tokens per event)."""
  return ' , then '.join(event_phrase(int(k), int(p), int(z))
                         for k, p, z in zip(events['kind'], events['pitch'], events['loudness']))


def ordinal(i: int, n: int, rng: np.random.Generator) -> str:
  """The name of event i of n: its ordinal, or (half the time, for the final one of two or more) 'last'."""
  return 'last' if i == n - 1 and n > 1 and rng.random() < 0.5 else ORDINALS[i]


def _questions(rng: np.random.Generator, e: Mapping[str, np.ndarray]) -> list[tuple[str, str, str]]:
  """(family, question, answer) triples for one clip; see the module docstring for the families."""
  n = len(e['kind'])
  kind, pitch = [int(v) for v in e['kind']], [int(v) for v in e['pitch']]
  qa = [('count', 'how many sounds are there ?', NUMBERS[n])]

  # order: two tones of different registers; the answer is drawn first, the wording made to give it.
  tonal = [i for i in range(n) if KINDS[kind[i]] in TONAL]
  pairs = [(a, b) for a in tonal for b in tonal if pitch[a] != pitch[b]]
  if pairs:
    a, b = pairs[rng.integers(len(pairs))]
    want_yes = rng.random() < 0.5
    word = 'higher' if (pitch[b] > pitch[a]) == want_yes else 'lower'
    qa.append(('order', f'is the {ordinal(b, n, rng)} sound {word} than the {ordinal(a, n, rng)} ?',
               'yes' if want_yes else 'no'))

  i = int(rng.integers(n))
  qa.append(('timbre', f'what kind of sound is the {ordinal(i, n, rng)} one ?', KINDS[kind[i]]))

  # timing: a kind that occurs once; the answer (a third) is drawn first among those such events offer.
  unique = [i for i in range(n) if kind.count(kind[i]) == 1]
  if unique:
    thirds = sorted({int(e['timing'][i]) for i in unique})
    third = thirds[rng.integers(len(thirds))]
    pool = [i for i in unique if int(e['timing'][i]) == third]
    i = pool[rng.integers(len(pool))]
    qa.append(('timing', f'when does the {KIND_NAMES[kind[i]]} start ?', TIMINGS[third]))

  i = int(rng.integers(n))
  qa.append(('loudness', f'how loud is the {ordinal(i, n, rng)} sound ?', LOUDNESS[int(e['loudness'][i])]))
  i = int(rng.integers(n))
  qa.append(('pitch', f'what pitch is the {ordinal(i, n, rng)} sound ?', PITCHES[pitch[i]]))
  return qa


# ----------------------------------------------------------------------------------------------- records


def _example(c: TonesWorldConfig, split: str, index: int) -> dict[str, Any]:
  if split not in SPLITS:
    raise ValueError(f'split must be one of {tuple(SPLITS)}, got {split!r}')
  rng = np.random.default_rng([c.seed, SPLITS[split], index])
  events = _sample_events(rng, c)
  qa = _questions(rng, events)
  return {
      'index': index,
      'audio': render(rng, events, c.clip_seconds),                              # int16 [S]
      'caption': caption(events),
      'families': [f for f, _, _ in qa],
      'questions': [q for _, q, _ in qa],
      'answers': [a for _, _, a in qa],
      'events': events,
  }


def generate_example(c: TonesWorldConfig, split: str, index: int) -> dict[str, Any]:
  """Record `index` of `split`: a pure function of (c.seed, split, index), independent of build order. 'audio' is
  float32 [S] exactly as decoded from the stored int16; 'events' maps EVENT_FIELDS to int32 [n]."""
  ex = _example(c, split, index)
  ex['audio'] = pcm_to_float(ex['audio'])
  return ex


def tfds_example(c: TonesWorldConfig, split: str, index: int) -> dict[str, Any]:
  """The record in the builder's feature layout: audio int16 [S], events one int32 [n, len(EVENT_FIELDS)] array."""
  ex = _example(c, split, index)
  ex['events'] = np.stack([ex['events'][k] for k in EVENT_FIELDS], axis=-1)   # [n, 6]
  return ex


# ----------------------------------------------------------------------------------------------- TFDS builder


class TonesWorld(worlds.GeneratedSplits, tfds.core.GeneratorBasedBuilder):
  """TFDS builder for the tones world (array_record; records in index order, disable_shuffling=True)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  code_path = epath.Path(__file__)  # as in shapes.ShapesWorld: TFDS's packaged-builder lookup needs a backport

  def _info(self) -> tfds.core.DatasetInfo:
    return worlds.dataset_info(self, __doc__, 'audio', (self.builder_config.num_samples,), np.int16, 'events',
                               len(EVENT_FIELDS))

  def _make_tokenizer(self) -> tokenizers.Tokenizer:
    return make_tokenizer()

  def _make_example(self, split: str, index: int) -> dict[str, Any]:
    return tfds_example(self.builder_config, split, index)


# ----------------------------------------------------------------------------------------------- prepare / read


def builder(data_cfg: Any) -> TonesWorld:
  """The TFDS builder for cfg.data under data.data_dir (nothing is built)."""
  return worlds.make_builder(TonesWorld, config_from(data_cfg), data_cfg, 'tones')


def is_prepared(data_cfg: Any) -> bool:
  """True when the dataset and its tokenizer.json are complete on disk."""
  return worlds.is_built(builder(data_cfg))


def prepare(data_cfg: Any) -> tuple[str, tokenizers.Tokenizer]:
  """Builds the world once under data.data_dir (worlds.build: locked, resumable after a killed build) and returns
  (dataset dir, tokenizer)."""
  return worlds.build(builder(data_cfg), make_tokenizer)


def media_spec(data_cfg: Any) -> tuple[tuple[int], Any]:
  """(shape, dtype) of one example's waveform: ((num_samples,), float32), 16 kHz."""
  return (config_from(data_cfg).num_samples,), np.float32


def data_source(data_cfg: Any, split: str):
  """Random-access source of decoded records of a prepared split: tfds.data_source over array_record, each
  record parsed by `ParsedSource`."""
  c = config_from(data_cfg)
  return worlds.open_split(TonesWorld, c, data_cfg, split, 'tones', lambda raw: ParsedSource(raw, c.num_samples))


class ParsedSource(worlds.ParsedRecords):
  """A split's records parsed straight from their serialized tf.train.Example (worlds.ParsedRecords): the text
  fields as bytes as under TFDS's decoder, audio float32 [S] in [-1, 1) (TFDS's int16 scaled to float) and events
  int32 [n, len(EVENT_FIELDS)]; a wrong-sized audio or events field raises ValueError naming it."""

  def __init__(self, raw: Any, num_samples: int):
    super().__init__(raw)
    self._num_samples = num_samples

  def _parse(self, fields: Any) -> dict[str, Any]:
    audio = worlds.field_value(fields, 'audio', 'bytes_list')
    if len(audio) != 2 * self._num_samples:
      raise ValueError(f"field 'audio': {len(audio)} bytes, expected {self._num_samples} int16 samples "
                       f'({2 * self._num_samples} bytes)')
    events = worlds.field_values(fields, 'events', 'int64_list')
    if len(events) % len(EVENT_FIELDS):
      raise ValueError(f"field 'events': {len(events)} values, not a multiple of {len(EVENT_FIELDS)} "
                       f'({EVENT_FIELDS})')
    return {
        'audio': pcm_to_float(np.frombuffer(audio, '<i2')),                      # [S] float32
        'events': np.array(events, np.int32).reshape(-1, len(EVENT_FIELDS)),    # [n, 6]
    }


def decode_record(record: Mapping[str, Any]) -> dict[str, Any]:
  """A record from `data_source` with text as str and events as int32 arrays per field (as `generate_example`)."""
  txt = lambda v: v.decode() if isinstance(v, bytes) else str(v)
  audio = np.asarray(record['audio'])
  return {
      'index': int(record['index']),
      'audio': pcm_to_float(audio) if audio.dtype == np.int16 else audio.astype(np.float32, copy=False),
      'caption': txt(record['caption']),
      'questions': [txt(v) for v in record['questions']],
      'answers': [txt(v) for v in record['answers']],
      'families': [txt(v) for v in record['families']],
      'events': {k: np.asarray(record['events'], np.int32).reshape(-1, len(EVENT_FIELDS))[:, j]
                 for j, k in enumerate(EVENT_FIELDS)},
  }


def chance_levels(data_cfg: Any, split: str = 'test') -> dict[str, float]:
  """Per family (and 'overall'): the exact-match accuracy on `split` of always giving the family's most frequent
  answer in that split, what a model that ignores the audio and the question's wording scores at best."""
  return worlds.chance_levels(data_source(data_cfg, split), decode_record, FAMILIES)
