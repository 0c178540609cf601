"""The procedural 'motion' world: the shapes world in motion, as short video clips with captions and closed-vocabulary
VQA about what happens over time.

Each record is a pure function of (seed, split, index): `np.random.default_rng([seed, split_id, index])` draws
1..max_objects (default 3) objects on a `grid x grid` board, each with a shape and a colour of its own (no two
objects of a clip share either, so "red circle", "the circle" and the red pixels all name one object) and a size,
gives each object at most one event, and renders data.num_frames frames (default 8) of data.image_size px with the
shapes world's renderer (mmproj.data.shapes.render). The events:

  move        the object slides 1..data.max_move cells left / right / up / down, a fraction of the way every frame
              (default one cell: the board's edges already let one frame's position hint where an object can go,
              and longer moves, which need more room, hint more)
  appear      the object is drawn from frame k on
  disappear   the object is drawn up to frame k - 1
  change      the object is drawn in another colour (one no object of the clip starts with) from frame k on

Time is cut into S = min(max_objects, max(2, (num_frames - 1) // 2)) slots of L = (num_frames - 1) // S frames after
frame 0 (two frames or more per slot, so moves pass through in-between positions, unless the clip is too short for
two such slots). Every event takes a slot of its own (so a clip has at most S events; k is its slot's first frame,
and a move is under way from frame k and done at the slot's last frame); the slots are dealt to the events at
random, so every kind of event is as likely to come first, and the first and last frames show the clip before and
after every event. An object's cells over the clip (a mover's whole path) are no other object's, so objects never
overlap.

Written per clip:
  - a caption telling the events in time order: "the red circle moves left , then a blue square appears"
  - question/answer pairs from five families (`FAMILIES`), about one or two of each family that applies:
      direction  "which way does the red circle move ?"       left / right / up / down / nowhere; asked about an
                 object drawn in one colour from start to end (one that moves or stays), a still one about a fifth
                 of the time, so the five answers are near-balanced
      order      "does the red circle move before the blue square appears ?"   yes / no (one of each per clip with
                 two or more events)
      moved      "which object moves ?"                        "red circle" (when exactly one object moves)
      count      "how many objects are there at the start ?" / "... at the end ?"   zero .. four
      change     "what color does the square become ?"         a colour (named by its shape: its first colour
                 would rule an answer out)
    Objects are named "colour shape" by the colour they start (or appear) with.
`chance_levels` gives each family's chance level: the accuracy of always answering its most frequent answer.

`MotionWorld` is a TFDS `GeneratorBasedBuilder` written as array_record (no TensorFlow needed to build or read);
the clip is stored as uint8 [F, H, W, 3] bytes under 'video'. `prepare(cfg.data)` builds it once under
`cfg.data.data_dir` and returns (dataset dir, tokenizer).
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
from mmproj.data.shapes import COLORS, NUMBERS, SHAPES, SIZES, SPLITS
from mmproj.data.worlds import get_field

FAMILIES = ('direction', 'order', 'moved', 'count', 'change')
EVENTS = ('none', 'move', 'appear', 'disappear', 'change')
# Chance of each event per object, before the clip's events are capped at its slot count (and at least one kept).
EVENT_PROBS = (0.15, 0.4, 0.15, 0.15, 0.15)
DIRECTIONS = ('left', 'right', 'up', 'down')
STEPS = ((0, -1), (0, 1), (-1, 0), (1, 0))  # (row, col) step per direction
NOWHERE = 'nowhere'
STILL_SHARE = 0.2  # how often a direction question asks about a still object when the clip has a moving one too
# Per-object annotations: start cell (row0, col0), end cell (row1, col1; the start cell unless it moves), colour
# after the event (color1; the colour unless it changes), the event (index into EVENTS) and its slot (-1: none).
OBJECT_FIELDS = ('shape', 'color', 'size', 'row0', 'col0', 'row1', 'col1', 'color1', 'event', 'slot')
MAX_OBJECTS = len(SHAPES)  # shapes are unique within a clip
MIN_FRAMES, MAX_FRAMES = 4, 16
MIN_GRID, MAX_GRID = 2, shapes.SCENE_MAX_GRID
MEDIA = 'video'               # the batch key of this world's media (mmproj/data/__init__.py)
CAPTION_QUESTION = shapes.CAPTION_QUESTION  # a caption example is `<bos> <video>*M caption <sep> <caption> <eos>`
_MAX_LAYOUT_TRIES = 1000

_TEMPLATE_WORDS = ('the a , then moves appears disappears becomes which way does move appear disappear become '
                   'before ? yes no object how many objects are there at start end what color caption')
WORDS = tuple(sorted(set(_TEMPLATE_WORDS.split()) | set(COLORS) | set(SHAPES) | set(DIRECTIONS) | {NOWHERE}
                     | set(NUMBERS[:MAX_OBJECTS + 1])))
VOCAB_SIZE = tokenizer_lib.NUM_SPECIAL + len(WORDS)  # <= model.lm.vocab_size = 64

DEFAULTS = dict(image_size=32, grid=3, num_frames=8, num_train=10_000, num_test=1_000, max_objects=3, max_move=1,
                seed=0)


def make_tokenizer() -> tokenizers.Tokenizer:
  """The world's tokenizer: fixed specials, then the sorted `WORDS` (VOCAB_SIZE ids)."""
  return tokenizer_lib.build(WORDS)


def families(data_cfg: Any) -> tuple[str, ...]:
  """The question families, in report order."""
  del data_cfg
  return FAMILIES


# ----------------------------------------------------------------------------------------------- config


@dataclasses.dataclass
class MotionWorldConfig(tfds.core.BuilderConfig):
  """World parameters; `name` is derived from them, so different settings never share a directory."""
  name: str = ''  # filled in by __post_init__
  image_size: int = DEFAULTS['image_size']
  grid: int = DEFAULTS['grid']
  num_frames: int = DEFAULTS['num_frames']
  num_train: int = DEFAULTS['num_train']
  num_test: int = DEFAULTS['num_test']
  max_objects: int = DEFAULTS['max_objects']
  max_move: int = DEFAULTS['max_move']  # a move covers 1..max_move cells
  seed: int = DEFAULTS['seed']

  def __post_init__(self):
    expected = config_name(self)
    if self.name in (None, '', expected):
      object.__setattr__(self, 'name', expected)
    else:
      raise ValueError(f'MotionWorldConfig name {self.name!r} does not match its values ({expected!r})')
    validate(self)


def config_name(c: Any) -> str:
  return (f'img{c.image_size}_grid{c.grid}_frames{c.num_frames}_obj1-{c.max_objects}'
          f'_move{c.max_move}_n{c.num_train}-{c.num_test}_seed{c.seed}')


def validate(c: Any) -> None:
  """ValueError naming the offending `data.*` field."""
  def fail(field, msg):
    raise ValueError(f'data.{field}: {msg}')
  for f in ('image_size', 'grid', 'num_frames', 'num_train', 'num_test', 'max_objects', 'max_move', 'seed'):
    if not isinstance(getattr(c, f), (int, np.integer)) or isinstance(getattr(c, f), bool):
      fail(f, f'must be an int, got {getattr(c, f)!r}')
  if not MIN_GRID <= c.grid <= MAX_GRID:
    fail('grid', f'must be in [{MIN_GRID}, {MAX_GRID}] (objects need a cell to move to), got {c.grid}')
  if c.image_size < 8 * c.grid:
    fail('image_size', f'{c.image_size} gives cells under 8 px on a {c.grid}x{c.grid} grid')
  if not MIN_FRAMES <= c.num_frames <= MAX_FRAMES:
    fail('num_frames', f'must be in [{MIN_FRAMES}, {MAX_FRAMES}], got {c.num_frames}')
  # Every object may move, and a move takes two cells at least: the board must hold max_objects such paths.
  limit = min(MAX_OBJECTS, c.grid * c.grid // 2)
  if not 1 <= c.max_objects <= limit:
    fail('max_objects', f'must be in [1, min({MAX_OBJECTS} shapes, grid*grid // 2)] = [1, {limit}], '
         f'got {c.max_objects}')
  if not 1 <= c.max_move < c.grid:
    fail('max_move', f'must be in [1, grid - 1] = [1, {c.grid - 1}] (cells a move covers), got {c.max_move}')
  for f in ('num_train', 'num_test'):
    if getattr(c, f) < 1:
      fail(f, f'must be >= 1, got {getattr(c, f)}')
  if not 0 <= c.seed < 2 ** 32:
    fail('seed', f'must be in [0, 2**32), got {c.seed}')


def config_from(data_cfg: Any) -> MotionWorldConfig:
  """cfg.data (ConfigDict, dict or attribute object) -> MotionWorldConfig; checks `data.name == 'motion'`."""
  name = get_field(data_cfg, 'name', 'motion')
  if name != 'motion':
    raise ValueError(f"data.name: the motion world needs name='motion', got {name!r}")
  return MotionWorldConfig(**{k: type(v)(get_field(data_cfg, k, v)) for k, v in DEFAULTS.items()})


def timing(c: Any) -> tuple[int, int]:
  """(number of slots S, frames per slot L): slot s covers frames 1 + s*L .. (s+1)*L."""
  num_slots = min(c.max_objects, max(2, (c.num_frames - 1) // 2))
  return num_slots, (c.num_frames - 1) // num_slots


# ----------------------------------------------------------------------------------------------- records


def _sample_events(rng: np.random.Generator, n: int, num_slots: int) -> tuple[np.ndarray, np.ndarray]:
  """Each object's event (index into EVENTS) and slot (-1 for none): at most num_slots events, at least one."""
  event = rng.choice(len(EVENTS), size=n, p=EVENT_PROBS)
  active = np.flatnonzero(event != 0)
  if len(active) > num_slots:  # drop the surplus at random
    event[rng.choice(active, size=len(active) - num_slots, replace=False)] = 0
  elif not len(active):        # a clip without events would have nothing to tell
    p = np.array(EVENT_PROBS[1:]) / sum(EVENT_PROBS[1:])
    event[rng.integers(n)] = 1 + rng.choice(len(EVENTS) - 1, p=p)
  active = np.flatnonzero(event != 0)
  slot = np.full(n, -1)
  slot[active] = rng.permutation(num_slots)[:len(active)]  # dealt at random: no kind of event comes first more often
  return event, slot


def _sample_layout(rng: np.random.Generator, grid: int, max_move: int, moving: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Start cells, directions and distances; no two objects' cells (a mover's whole path) overlap.

  Movers are placed first, each at a uniformly drawn start cell from which its path stays on the board and off the
  cells taken so far; a dead end redraws the whole layout (directions and distances too). Every step commutes with
  the board's rotations and mirrorings, so the directions stay uniform."""
  n = len(moving)
  order = np.concatenate([np.flatnonzero(moving), np.flatnonzero(~moving)])
  rows, cols = np.arange(grid)[:, None], np.arange(grid)[None, :]
  for _ in range(_MAX_LAYOUT_TRIES):
    direction = np.where(moving, rng.integers(0, len(DIRECTIONS), n), -1)
    distance = np.where(moving, rng.integers(1, max_move + 1, n), 0)
    taken = np.zeros((grid, grid), bool)
    start = np.zeros((n, 2), np.int64)
    for i in order:
      dr, dc = STEPS[direction[i]] if moving[i] else (0, 0)
      ok = ~taken
      for step in range(1, distance[i] + 1):  # every cell of the path on the board and free
        r, k = rows + step * dr, cols + step * dc
        inside = (r >= 0) & (r < grid) & (k >= 0) & (k < grid)
        ok &= inside & ~taken[np.clip(r, 0, grid - 1), np.clip(k, 0, grid - 1)]
      free = np.flatnonzero(ok)
      if not len(free):
        break
      cell = free[rng.integers(len(free))]
      start[i] = divmod(cell, grid)
      for step in range(distance[i] + 1):
        taken[start[i][0] + step * dr, start[i][1] + step * dc] = True
    else:
      return start, direction, distance
  raise RuntimeError(f'no layout for {n} objects ({int(moving.sum())} moving) on a {grid}x{grid} board after '
                     f'{_MAX_LAYOUT_TRIES} tries')


def _sample_objects(rng: np.random.Generator, c: MotionWorldConfig) -> dict[str, np.ndarray]:
  n = int(rng.integers(1, c.max_objects + 1))
  shape = rng.choice(len(SHAPES), size=n, replace=False)
  color = rng.choice(len(COLORS), size=n, replace=False)
  size = rng.integers(0, len(SIZES), n)
  num_slots, _ = timing(c)
  event, slot = _sample_events(rng, n, num_slots)
  color1 = color.copy()
  changing = np.flatnonzero(event == EVENTS.index('change'))
  unused = np.setdiff1d(np.arange(len(COLORS)), color)
  color1[changing] = rng.choice(unused, size=len(changing), replace=len(changing) > len(unused))
  start, direction, distance = _sample_layout(rng, c.grid, c.max_move, event == EVENTS.index('move'))
  moving = direction >= 0
  step = np.array(STEPS)[np.where(moving, direction, 0)] * (distance * moving)[:, None]  # [n, 2] cells moved
  values = dict(shape=shape, color=color, size=size, row0=start[:, 0], col0=start[:, 1], row1=start[:, 0] + step[:, 0],
                col1=start[:, 1] + step[:, 1], color1=color1, event=event, slot=slot)
  return {k: np.asarray(values[k], np.int32) for k in OBJECT_FIELDS}


def direction_of(o: Mapping[str, np.ndarray], i: int) -> str:
  """Object i's direction word ('nowhere' unless it moves)."""
  dr, dc = int(np.sign(o['row1'][i] - o['row0'][i])), int(np.sign(o['col1'][i] - o['col0'][i]))
  return NOWHERE if (dr, dc) == (0, 0) else DIRECTIONS[STEPS.index((dr, dc))]


def event_frame(o: Mapping[str, np.ndarray], i: int, slot_frames: int) -> int:
  """The first frame that shows object i's event (-1 when it has none)."""
  return -1 if o['slot'][i] < 0 else 1 + int(o['slot'][i]) * slot_frames


def frame_state(o: Mapping[str, np.ndarray], t: int, c: MotionWorldConfig) -> dict[str, np.ndarray]:
  """The objects drawn at frame t: arrays 'shape', 'color', 'size', 'x', 'y' (centre pixel) for shapes.render."""
  _, slot_frames = timing(c)
  cell = c.image_size / c.grid
  event = o['event']
  start = 1 + o['slot'] * slot_frames                                   # [n] first frame of each event's slot
  # A move is a fraction (t - start + 1) / L of the way at frame t: under way from `start`, done at the slot's end.
  progress = np.clip((t - start + 1) / slot_frames, 0.0, 1.0) * (event == EVENTS.index('move'))
  row = o['row0'] + progress * (o['row1'] - o['row0'])
  col = o['col0'] + progress * (o['col1'] - o['col0'])
  visible = ~(((event == EVENTS.index('appear')) & (t < start)) | ((event == EVENTS.index('disappear')) & (t >= start)))
  color = np.where((event == EVENTS.index('change')) & (t >= start), o['color1'], o['color'])
  return {'shape': o['shape'][visible], 'color': color[visible], 'size': o['size'][visible],
          'x': ((col[visible] + 0.5) * cell).astype(np.int64), 'y': ((row[visible] + 0.5) * cell).astype(np.int64)}


def render_video(o: Mapping[str, np.ndarray], c: MotionWorldConfig) -> np.ndarray:
  """uint8 [F, S, S, 3]: every frame drawn by the shapes world's renderer."""
  return np.stack([shapes.render(frame_state(o, t, c), c.image_size, c.grid) for t in range(c.num_frames)])


def _name(o: Mapping[str, np.ndarray], i: int) -> str:
  return f"{COLORS[o['color'][i]]} {SHAPES[o['shape'][i]]}"


def _clause(o: Mapping[str, np.ndarray], i: int, third_person: bool) -> str:
  """'the red circle moves' (third_person) or 'the red circle move' (after 'does'); change events say the colour."""
  kind = EVENTS[o['event'][i]]
  verb = {'move': 'move', 'appear': 'appear', 'disappear': 'disappear', 'change': 'become'}[kind]
  verb += 's' if third_person else ''
  tail = f" {COLORS[o['color1'][i]]}" if kind == 'change' else ''
  return f'the {_name(o, i)} {verb}{tail}'


def caption(o: Mapping[str, np.ndarray]) -> str:
  """The events in time order: 'the red circle moves left , then a blue square appears'."""
  parts = []
  for i in sorted(np.flatnonzero(o['slot'] >= 0), key=lambda i: o['slot'][i]):
    kind = EVENTS[o['event'][i]]
    if kind == 'move':
      parts.append(f'the {_name(o, i)} moves {direction_of(o, i)}')
    elif kind == 'appear':
      parts.append(f'a {_name(o, i)} appears')
    else:
      parts.append(_clause(o, i, third_person=True))
  return ' , then '.join(parts)


def _questions(rng: np.random.Generator, o: Mapping[str, np.ndarray]) -> list[tuple[str, str, str]]:
  """(family, question, answer) triples for one clip; see the module docstring for the families."""
  event = [EVENTS[e] for e in o['event']]
  n = len(event)
  qa = []

  # direction: an object drawn in one colour throughout (it moves or stays); a still one about a fifth of the time.
  movers = [i for i in range(n) if event[i] == 'move']
  stills = [i for i in range(n) if event[i] == 'none']
  if movers or stills:
    pool = stills if stills and (not movers or rng.random() < STILL_SHARE) else movers
    i = pool[rng.integers(len(pool))]
    qa.append(('direction', f'which way does the {_name(o, i)} move ?', direction_of(o, i)))

  # order: one yes and one no, from the pairs of events (every event has a slot of its own).
  timed = [i for i in range(n) if event[i] != 'none']
  if len(timed) >= 2:
    pairs = {True: [], False: []}
    for a in timed:
      for b in timed:
        if a != b:
          pairs[bool(o['slot'][a] < o['slot'][b])].append((a, b))
    for want in ([True, False] if rng.random() < 0.5 else [False, True]):
      a, b = pairs[want][rng.integers(len(pairs[want]))]
      qa.append(('order', f'does {_clause(o, a, False)} before {_clause(o, b, True)} ?', 'yes' if want else 'no'))

  # moved: the one object that moves.
  if len(movers) == 1:
    qa.append(('moved', 'which object moves ?', _name(o, movers[0])))

  # count: objects drawn in the first and in the last frame.
  at_start = sum(e != 'appear' for e in event)
  at_end = sum(e != 'disappear' for e in event)
  qa.append(('count', 'how many objects are there at the start ?', NUMBERS[at_start]))
  qa.append(('count', 'how many objects are there at the end ?', NUMBERS[at_end]))

  # change: the colour an object turns (named by its shape alone).
  changers = [i for i in range(n) if event[i] == 'change']
  if changers:
    i = changers[rng.integers(len(changers))]
    qa.append(('change', f"what color does the {SHAPES[o['shape'][i]]} become ?", COLORS[o['color1'][i]]))
  return qa


def generate_example(c: MotionWorldConfig, split: str, index: int) -> dict[str, Any]:
  """Record `index` of `split`: a pure function of (c.seed, split, index), independent of build order."""
  rng = np.random.default_rng([c.seed, SPLITS[split], index])
  objects = _sample_objects(rng, c)
  qa = _questions(rng, objects)
  return {
      'index': index,
      'video': render_video(objects, c),
      'caption': caption(objects),
      'families': [f for f, _, _ in qa],
      'questions': [q for _, q, _ in qa],
      'answers': [a for _, _, a in qa],
      'objects': objects,
  }


def tfds_example(c: MotionWorldConfig, split: str, index: int) -> dict[str, Any]:
  """`generate_example` in the builder's feature layout (objects as one int32 [n, len(OBJECT_FIELDS)] array)."""
  ex = generate_example(c, split, index)
  ex['objects'] = np.stack([ex['objects'][k] for k in OBJECT_FIELDS], axis=-1)  # [n, 10]
  return ex


# ----------------------------------------------------------------------------------------------- TFDS builder


class MotionWorld(worlds.GeneratedSplits, tfds.core.GeneratorBasedBuilder):
  """TFDS builder for the motion world (array_record; records in index order, disable_shuffling=True)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  code_path = epath.Path(__file__)  # as ShapesWorld: TFDS 4.9.10 cannot resolve it for packaged builders
  # No BUILDER_CONFIGS: every instance gets an explicit MotionWorldConfig (see `builder`), named by its values.

  def _info(self) -> tfds.core.DatasetInfo:
    c = self.builder_config
    return worlds.dataset_info(self, __doc__, 'video', (c.num_frames, c.image_size, c.image_size, 3), np.uint8,
                               'objects', len(OBJECT_FIELDS))

  def _make_tokenizer(self) -> tokenizers.Tokenizer:
    return make_tokenizer()

  def _make_example(self, split: str, index: int) -> dict[str, Any]:
    return tfds_example(self.builder_config, split, index)


# ----------------------------------------------------------------------------------------------- prepare / read


def builder(data_cfg: Any) -> MotionWorld:
  """The TFDS builder for cfg.data under data.data_dir (nothing is built)."""
  return worlds.make_builder(MotionWorld, config_from(data_cfg), data_cfg, 'motion')


def is_prepared(data_cfg: Any) -> bool:
  """True when the dataset and its tokenizer.json are complete on disk."""
  return worlds.is_built(builder(data_cfg))


def prepare(data_cfg: Any) -> tuple[str, tokenizers.Tokenizer]:
  """Builds the world once under data.data_dir (worlds.build: locked, resumable after a killed build) and returns
  (dataset dir, tokenizer)."""
  return worlds.build(builder(data_cfg), make_tokenizer)


def media_spec(data_cfg: Any) -> tuple[tuple[int, int, int, int], Any]:
  """(shape, dtype) of one example's clip: ((num_frames, image_size, image_size, 3), uint8)."""
  c = config_from(data_cfg)
  return (c.num_frames, c.image_size, c.image_size, 3), np.uint8


def data_source(data_cfg: Any, split: str):
  """Random-access source of decoded records of a prepared split: tfds.data_source over array_record, each
  record parsed by `ParsedSource` (the values TFDS's decoder gives)."""
  c = config_from(data_cfg)
  return worlds.open_split(MotionWorld, c, data_cfg, split, 'motion',
                           lambda raw: ParsedSource(raw, (c.num_frames, c.image_size, c.image_size, 3)))


class ParsedSource(worlds.ParsedRecords):
  """A split's records parsed as TFDS's decoder would for MotionWorld's features (worlds.ParsedRecords): the text
  fields, video uint8 [F, S, S, 3] and objects int32 [n, len(OBJECT_FIELDS)]; a video of the wrong size raises
  ValueError naming the field."""

  def __init__(self, raw: Any, video_shape: tuple[int, int, int, int]):
    super().__init__(raw)
    self._video_shape = tuple(video_shape)

  def _parse(self, fields: Any) -> dict[str, Any]:
    video = worlds.field_value(fields, 'video', 'bytes_list')
    if len(video) != int(np.prod(self._video_shape)):
      raise ValueError(f"field 'video': {len(video)} bytes, expected {self._video_shape} uint8")
    objects = worlds.field_values(fields, 'objects', 'int64_list')
    return {
        'video': np.frombuffer(video, np.uint8).reshape(self._video_shape).copy(),   # writable, as TFDS's
        'objects': np.array(objects, np.int32).reshape(-1, len(OBJECT_FIELDS)),
    }


def decode_record(record: Mapping[str, Any]) -> dict[str, Any]:
  """A record from `data_source` with text as str and objects as int32 arrays (as `generate_example`)."""
  txt = lambda v: v.decode() if isinstance(v, bytes) else str(v)
  objects = np.asarray(record['objects'], np.int32).reshape(-1, len(OBJECT_FIELDS))
  return {
      'index': int(record['index']),
      'video': np.asarray(record['video']),
      'caption': txt(record['caption']),
      'questions': [txt(v) for v in record['questions']],
      'answers': [txt(v) for v in record['answers']],
      'families': [txt(v) for v in record['families']],
      'objects': {k: objects[:, j] for j, k in enumerate(OBJECT_FIELDS)},
  }


def chance_levels(data_cfg: Any, split: str = 'test') -> dict[str, float]:
  """Per family (and 'overall'): the exact-match accuracy on `split` of always giving the family's most frequent
  answer in that split, what a model that ignores the video and the question's wording scores at best."""
  return worlds.chance_levels(data_source(data_cfg, split), decode_record, FAMILIES)
