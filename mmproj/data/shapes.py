"""The procedural 'shapes' world: images of coloured shapes on a grid, captions, and closed-vocabulary VQA.

Each record is a pure function of (seed, split, index): `np.random.default_rng([seed, split_id, index])` draws
min_objects..max_objects (default 1..6) objects on a `grid x grid` board (at most one per cell, a jitter of at most data.jitter px inside the cell), each with a shape,
a colour and a size, renders them with numpy onto a dark background, and writes

  - a caption listing the objects in reading order: "large red circle , small blue square"
  - question/answer pairs from six families (`FAMILIES`), about one or two of each family that applies:
      existence  "is there a red circle ?"                      yes / no (one of each per image)
      color      "what color is the circle ?"                   only shapes that occur once in the image
      shape      "what shape is the red object ?"               only colours that occur once
      count      "how many objects are there ?", "how many red objects are there ?"   zero .. nine
      position   "where is the red circle ?"                    cell name ("top left", "center", ...)
      relation   "is the red circle left of the blue square ?"  yes / no (one of each where possible);
                 left/right compare grid columns, above/below grid rows, so jitter never changes an answer.
    Objects in color/position/relation questions are named by "colour shape", asked only when that pair is
    unique in the image.

The 'scenes' world (data.world='scenes') is the same board made for studying connectors on a pretrained
encoder: larger images and finer grids (up to 6x6 cells, up to 12 objects, counts to twelve), every object's cell
in the caption ("large red circle top left"), up to data.max_glyphs digits drawn as glyphs in empty cells, and two
more families:
      nearest   "which object is nearest to the red circle ?"   "blue square" (asked only when the nearest object,
                by distance between cell centres, is unique and uniquely named)
      text      "what number is at top left ?"                  zero .. nine (a glyph's digit)
`chance_levels` gives each family's chance level: the accuracy of always answering its most frequent answer.

`ShapesWorld` is a TFDS `GeneratorBasedBuilder` written as array_record (no TensorFlow needed to build or read);
`prepare(cfg.data)` builds it once under `cfg.data.data_dir` and returns (dataset dir, tokenizer).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
import tokenizers
from etils import epath

from mmproj.data import tokenizer as tokenizer_lib
from mmproj.data import worlds
from mmproj.data.worlds import get_field, local_dir  # shared by the worlds; here too for stage0, llava_json, ...

FAMILIES = ('existence', 'color', 'shape', 'count', 'position', 'relation')
SHAPES = ('square', 'circle', 'triangle', 'cross')
COLORS = ('red', 'green', 'blue', 'yellow', 'cyan', 'magenta')
# [len(COLORS), 3]: far apart in RGB, and every colour has the same channel sum (375), so an object's
# silhouette is the same in R+G+B whatever its colour: shape is readable without first undoing colour.
COLOR_RGB = np.array([(255, 60, 60), (60, 255, 60), (60, 60, 255), (188, 187, 0), (0, 188, 187),
                      (187, 0, 188)], np.uint8)
BACKGROUND_RGB = (20, 20, 24)
SIZES = ('small', 'large')
SIZE_RADIUS = (0.22, 0.36)  # object half-extent as a fraction of the cell side
NUMBERS = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine')
RELATIONS = ('left of', 'right of', 'above', 'below')
SPLITS = {'train': 0, 'test': 1}  # split name -> split_id in the record rng key
OBJECT_FIELDS = ('shape', 'color', 'size', 'row', 'col', 'x', 'y')  # per-object annotations (x, y: centre pixel)
MAX_GRID = 5
MAX_OBJECTS = len(NUMBERS) - 1
WORLDS = ('shapes', 'scenes')
SCENE_FAMILIES = FAMILIES + ('nearest', 'text')
SCENE_NUMBERS = NUMBERS + ('ten', 'eleven', 'twelve')
SCENE_MAX_GRID = 6
SCENE_MAX_OBJECTS = len(SCENE_NUMBERS) - 1
GLYPH_RGB = (235, 235, 235)  # digits are light grey: brighter than any shape colour (channel sum 705 vs 375)
# 5x7 bitmaps of the digits 0-9 ('#' = ink), scaled to the cell when drawn.
DIGIT_BITMAPS = (
    (' ### ', '#   #', '#  ##', '# # #', '##  #', '#   #', ' ### '),
    ('  #  ', ' ##  ', '  #  ', '  #  ', '  #  ', '  #  ', ' ### '),
    (' ### ', '#   #', '    #', '   # ', '  #  ', ' #   ', '#####'),
    ('#####', '   # ', '  #  ', '   # ', '    #', '#   #', ' ### '),
    ('   # ', '  ## ', ' # # ', '#  # ', '#####', '   # ', '   # '),
    ('#####', '#    ', '#### ', '    #', '    #', '#   #', ' ### '),
    ('  ## ', ' #   ', '#    ', '#### ', '#   #', '#   #', ' ### '),
    ('#####', '    #', '   # ', '  #  ', ' #   ', ' #   ', ' #   '),
    (' ### ', '#   #', '#   #', ' ### ', '#   #', '#   #', ' ### '),
    (' ### ', '#   #', '#   #', ' ####', '    #', '   # ', ' ##  '),
)

# Row/column words per grid size; a cell is "<row> <col>", with the middle row/centre column words dropped
# ("middle left" -> "left", "top center" -> "top", "middle center" -> "center").
ROW_WORDS = {1: ('middle',), 2: ('top', 'bottom'), 3: ('top', 'middle', 'bottom'),
             4: ('top', 'upper', 'lower', 'bottom'), 5: ('top', 'upper', 'middle', 'lower', 'bottom'),
             6: ('top', 'upper', 'high', 'low', 'lower', 'bottom')}
COL_WORDS = {1: ('center',), 2: ('left', 'right'), 3: ('left', 'center', 'right'),
             4: ('left', 'midleft', 'midright', 'right'), 5: ('left', 'midleft', 'center', 'midright', 'right'),
             6: ('left', 'midleft', 'inleft', 'inright', 'midright', 'right')}

_TEMPLATE_WORDS = ('is there a ? what color the shape object how many objects are where left of right above '
                   'below caption yes no')
WORDS = tuple(sorted(set(_TEMPLATE_WORDS.split()) | set(SHAPES) | set(COLORS) | set(SIZES) | set(NUMBERS)
                     | {w for g in range(1, MAX_GRID + 1) for w in ROW_WORDS[g] + COL_WORDS[g]}))
VOCAB_SIZE = tokenizer_lib.NUM_SPECIAL + len(WORDS)  # 58 <= model.lm.vocab_size = 64
# The scenes world's words: the shapes world's and these (its own tokenizer, so the shapes world's ids never move).
SCENE_WORDS = tuple(sorted(set(WORDS) | set(SCENE_NUMBERS) | set(ROW_WORDS[6] + COL_WORDS[6])
                           | set('which nearest to number at'.split())))
SCENE_VOCAB_SIZE = tokenizer_lib.NUM_SPECIAL + len(SCENE_WORDS)  # <= model.lm.vocab_size = 96
MEDIA = 'image'               # the batch key of this world's media (mmproj/data/__init__.py)
CAPTION_QUESTION = 'caption'  # a caption example is `<bos> <image>*M caption <sep> <the caption's words> <eos>`

DEFAULTS = dict(image_size=48, grid=3, num_train=20_000, num_test=1_000, min_objects=1, max_objects=6, seed=0,
                jitter=1, world='shapes', max_glyphs=0)


def position_name(row: int, col: int, grid: int) -> str:
  """Name of grid cell (row, col), e.g. 'top left', 'top', 'center', 'bottom right' on a 3x3 grid."""
  r, c = ROW_WORDS[grid][row], COL_WORDS[grid][col]
  if r == 'middle':
    return c
  return r if c == 'center' else f'{r} {c}'


def make_tokenizer(world: str = 'shapes') -> tokenizers.Tokenizer:
  """The world's tokenizer: fixed specials, then the sorted `WORDS` (VOCAB_SIZE ids; scenes: SCENE_WORDS)."""
  if world == 'scenes':
    return tokenizer_lib.build(SCENE_WORDS, max_vocab_size=SCENE_VOCAB_SIZE)
  return tokenizer_lib.build(WORDS)


def families(data_cfg: Any) -> tuple[str, ...]:
  """The question families of cfg.data's world, in report order."""
  return SCENE_FAMILIES if get_field(data_cfg, 'world', 'shapes') == 'scenes' else FAMILIES


def numbers(world: str) -> tuple[str, ...]:
  return SCENE_NUMBERS if world == 'scenes' else NUMBERS


# ----------------------------------------------------------------------------------------------- config


@dataclasses.dataclass
class ShapesWorldConfig(tfds.core.BuilderConfig):
  """World parameters; `name` is derived from them, so different settings never share a directory."""
  name: str = ''  # filled in by __post_init__
  image_size: int = DEFAULTS['image_size']
  grid: int = DEFAULTS['grid']
  num_train: int = DEFAULTS['num_train']
  num_test: int = DEFAULTS['num_test']
  min_objects: int = DEFAULTS['min_objects']
  max_objects: int = DEFAULTS['max_objects']
  seed: int = DEFAULTS['seed']
  jitter: int = DEFAULTS['jitter']  # max pixels an object moves off its cell centre (capped so it stays inside)
  world: str = DEFAULTS['world']  # 'shapes' | 'scenes' (module docstring)
  max_glyphs: int = DEFAULTS['max_glyphs']  # scenes: 0..max_glyphs digits drawn in empty cells

  def __post_init__(self):
    expected = config_name(self)
    if self.name in (None, '', expected):
      object.__setattr__(self, 'name', expected)
    else:
      raise ValueError(f'ShapesWorldConfig name {self.name!r} does not match its values ({expected!r})')
    validate(self)


def config_name(c: Any) -> str:
  name = (f'img{c.image_size}_grid{c.grid}_obj{c.min_objects}-{c.max_objects}'
          f'_n{c.num_train}-{c.num_test}_seed{c.seed}_jitter{c.jitter}')
  return f'scenes_{name}_glyphs{c.max_glyphs}' if c.world == 'scenes' else name


def validate(c: Any) -> None:
  """ValueError naming the offending `data.*` field."""
  def fail(field, msg):
    raise ValueError(f'data.{field}: {msg}')
  if c.world not in WORLDS:
    fail('world', f'unknown world {c.world!r}; known: {list(WORLDS)}')
  for f in ('image_size', 'grid', 'num_train', 'num_test', 'min_objects', 'max_objects', 'seed', 'jitter',
            'max_glyphs'):
    if not isinstance(getattr(c, f), (int, np.integer)) or isinstance(getattr(c, f), bool):
      fail(f, f'must be an int, got {getattr(c, f)!r}')
  scenes = c.world == 'scenes'
  max_grid, max_objects = (SCENE_MAX_GRID, SCENE_MAX_OBJECTS) if scenes else (MAX_GRID, MAX_OBJECTS)
  if not 1 <= c.grid <= max_grid:
    fail('grid', f'must be in [1, {max_grid}] in the {c.world} world (cells need names), got {c.grid}')
  if c.image_size < 8 * c.grid:
    fail('image_size', f'{c.image_size} gives cells under 8 px on a {c.grid}x{c.grid} grid')
  if not 1 <= c.min_objects <= c.max_objects:
    fail('min_objects', f'need 1 <= min_objects <= max_objects, got {c.min_objects}, {c.max_objects}')
  if c.max_objects > min(c.grid * c.grid, max_objects):
    fail('max_objects', f'{c.max_objects} > min(grid*grid, {max_objects}) = {min(c.grid ** 2, max_objects)}')
  if c.max_glyphs and not scenes:
    fail('max_glyphs', f"glyphs are drawn in the scenes world only (data.world='scenes'), got {c.max_glyphs}")
  if not 0 <= c.max_glyphs < c.grid * c.grid:
    fail('max_glyphs', f'must be in [0, grid*grid) = [0, {c.grid ** 2}), got {c.max_glyphs}')
  for f in ('num_train', 'num_test'):
    if getattr(c, f) < 1:
      fail(f, f'must be >= 1, got {getattr(c, f)}')
  if not 0 <= c.seed < 2 ** 32:
    fail('seed', f'must be in [0, 2**32), got {c.seed}')
  if c.jitter < 0:
    fail('jitter', f'must be >= 0, got {c.jitter}')


def config_from(data_cfg: Any) -> ShapesWorldConfig:
  """cfg.data (ConfigDict, dict or attribute object) -> ShapesWorldConfig; checks `data.name == 'shapes'`."""
  name = get_field(data_cfg, 'name', 'shapes')
  if name != 'shapes':
    raise ValueError(f"data.name: the shapes world needs name='shapes', got {name!r}")
  return ShapesWorldConfig(**{k: type(v)(get_field(data_cfg, k, v)) for k, v in DEFAULTS.items()})


# ----------------------------------------------------------------------------------------------- rendering


@functools.lru_cache(maxsize=None)
def _stamps(image_size: int, grid: int) -> tuple[int, dict[tuple[int, int], np.ndarray], tuple[int, ...]]:
  """Pre-drawn boolean masks per (shape, size): (half window h, {(s, z): [2h+1, 2h+1]}, jitter per size)."""
  cell = image_size / grid
  radii = [f * cell for f in SIZE_RADIUS]
  h = int(np.ceil(max(radii)))
  d = np.arange(-h, h + 1, dtype=np.float32)
  dy, dx = np.meshgrid(d, d, indexing='ij')  # [2h+1, 2h+1] offsets from the centre pixel
  stamps = {}
  for z, r in enumerate(radii):
    t = max(1.0, r / 3)  # cross bar half-thickness
    masks = {
        'square': np.maximum(abs(dx), abs(dy)) <= 0.8 * r,
        'circle': dx * dx + dy * dy <= r * r,
        'triangle': (dy <= r) & (abs(dx) <= (dy + r) / 2),  # apex up, base 2r wide
        'cross': ((abs(dx) <= t) & (abs(dy) <= r)) | ((abs(dy) <= t) & (abs(dx) <= r)),
    }
    for s, name in enumerate(SHAPES):
      stamps[s, z] = masks[name]
  jitter = tuple(max(0, int(np.floor(cell / 2 - r)) - 1) for r in radii)
  return h, stamps, jitter


@functools.lru_cache(maxsize=None)
def _glyph_stamps(image_size: int, grid: int) -> tuple[np.ndarray, ...]:
  """DIGIT_BITMAPS scaled (nearest neighbour) to ~70% of the cell height: one boolean mask [gh, gw] per digit."""
  cell = image_size / grid
  gh = max(7, int(round(0.7 * cell)))
  gw = max(5, int(round(gh * 5 / 7)))
  rows = (np.arange(gh) * 7 // gh)[:, None]
  cols = (np.arange(gw) * 5 // gw)[None, :]
  return tuple(np.array([[ch == '#' for ch in line] for line in bitmap])[rows, cols] for bitmap in DIGIT_BITMAPS)


def render(objects: Mapping[str, np.ndarray], image_size: int, grid: int,
           glyphs: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
  """Draws objects (arrays 'shape', 'color', 'size', 'x', 'y' [n]) and glyphs (arrays 'digit', 'row', 'col' [g],
  each centred in its cell) -> uint8 image [S, S, 3]."""
  h, stamps, _ = _stamps(image_size, grid)
  img = np.empty((image_size, image_size, 3), np.uint8)
  img[:] = BACKGROUND_RGB
  for s, c, z, x, y in zip(objects['shape'], objects['color'], objects['size'], objects['x'], objects['y']):
    mask = stamps[int(s), int(z)]  # [2h+1, 2h+1]
    y0, x0 = int(y) - h, int(x) - h
    # Clip the window to the image (objects stay inside their cell, so this only matters for tiny images).
    sy, sx = max(0, -y0), max(0, -x0)
    ey, ex = min(mask.shape[0], image_size - y0), min(mask.shape[1], image_size - x0)
    img[y0 + sy:y0 + ey, x0 + sx:x0 + ex][mask[sy:ey, sx:ex]] = COLOR_RGB[c]
  if glyphs is not None:
    stamps = _glyph_stamps(image_size, grid)
    cell = image_size / grid
    for d, row, col in zip(glyphs['digit'], glyphs['row'], glyphs['col']):
      mask = stamps[int(d)]                                                     # [gh, gw]
      y0 = int((row + 0.5) * cell) - mask.shape[0] // 2
      x0 = int((col + 0.5) * cell) - mask.shape[1] // 2
      img[y0:y0 + mask.shape[0], x0:x0 + mask.shape[1]][mask] = GLYPH_RGB
  return img


# ----------------------------------------------------------------------------------------------- records


def _sample_objects(rng: np.random.Generator, c: ShapesWorldConfig) -> dict[str, np.ndarray]:
  n = int(rng.integers(c.min_objects, c.max_objects + 1))
  cells = np.sort(rng.choice(c.grid * c.grid, size=n, replace=False))  # reading order
  shape = rng.integers(0, len(SHAPES), n)
  color = rng.integers(0, len(COLORS), n)
  size = rng.integers(0, len(SIZES), n)
  _, _, jitter = _stamps(c.image_size, c.grid)
  j = np.minimum(np.array(jitter)[size], c.jitter)  # [n]
  cell = c.image_size / c.grid
  row, col = cells // c.grid, cells % c.grid
  x = ((col + 0.5) * cell).astype(np.int64) + rng.integers(-j, j + 1)
  y = ((row + 0.5) * cell).astype(np.int64) + rng.integers(-j, j + 1)
  values = dict(shape=shape, color=color, size=size, row=row, col=col, x=x, y=y)
  return {k: np.asarray(values[k], np.int32) for k in OBJECT_FIELDS}


def _sample_glyphs(rng: np.random.Generator, c: ShapesWorldConfig, objects: Mapping[str, np.ndarray]
                   ) -> dict[str, np.ndarray]:
  """0..max_glyphs digits in cells no object occupies, in reading order (drawn after the objects, so a shapes
  world's records do not depend on this)."""
  taken = set((objects['row'] * c.grid + objects['col']).tolist())
  free = np.array([i for i in range(c.grid * c.grid) if i not in taken], np.int64)
  g = min(int(rng.integers(0, c.max_glyphs + 1)), len(free))
  cells = np.sort(rng.choice(free, size=g, replace=False)) if g else np.zeros(0, np.int64)
  digit = rng.integers(0, len(DIGIT_BITMAPS), g)
  return {'digit': digit.astype(np.int32), 'row': (cells // c.grid).astype(np.int32),
          'col': (cells % c.grid).astype(np.int32)}


def scene_caption(objects: Mapping[str, np.ndarray], glyphs: Mapping[str, np.ndarray], grid: int) -> str:
  """The scenes world's caption: each object as 'size colour shape <cell>' in reading order, then each glyph as
  'number <digit> <cell>': 'large red circle top left number seven low right' (5 tokens per object, 4 per glyph)."""
  where = lambda row, col: position_name(int(row), int(col), grid)
  parts = [f'{SIZES[z]} {COLORS[c]} {SHAPES[s]} {where(r, k)}'
           for s, c, z, r, k in zip(objects['shape'], objects['color'], objects['size'], objects['row'],
                                    objects['col'])]
  parts += [f'number {NUMBERS[d]} {where(r, k)}' for d, r, k in zip(glyphs['digit'], glyphs['row'], glyphs['col'])]
  return ' '.join(parts)


def scene_glyphs(caption: str, grid: int) -> dict[str, np.ndarray]:
  """The glyphs ('digit', 'row', 'col' [g]) a scenes caption names, read back from its 'number <digit> <cell>'
  items (records store objects, not glyphs)."""
  cell_of = {position_name(r, c, grid): (r, c) for r in range(grid) for c in range(grid)}
  items = caption.split('number ')[1:]
  digit, row, col = [], [], []
  for item in items:
    word, _, where = item.strip().partition(' ')
    digit.append(NUMBERS.index(word))
    r, c = cell_of[where]
    row.append(r)
    col.append(c)
  return {'digit': np.array(digit, np.int32), 'row': np.array(row, np.int32), 'col': np.array(col, np.int32)}


HARD_NEGATIVE_KINDS = ('shape', 'color', 'size', 'position', 'binding', 'digit')


def hard_negative_caption(objects: Mapping[str, np.ndarray], glyphs: Mapping[str, np.ndarray], grid: int,
                          kind: str, rng: np.random.Generator) -> str | None:
  """A scenes caption that differs from the true one (`scene_caption(objects, glyphs, grid)`) in one thing, for
  contrastive training with hard negatives; None when `kind` does not apply to the scene.

    shape / color / size   one object's attribute changed to another value
    position               one object moved to an empty cell (the caption stays in reading order)
    binding                two objects of different shapes swap them (the same words, bound differently)
    digit                  one glyph's digit changed
  Every negative is a well-formed caption of some other scene, so the text alone cannot tell it apart.
  """
  o = {k: np.array(v) for k, v in objects.items()}
  g = {k: np.array(v) for k, v in glyphs.items()}
  n = len(o['shape'])
  if kind in ('shape', 'color', 'size'):
    field, values = {'shape': ('shape', SHAPES), 'color': ('color', COLORS), 'size': ('size', SIZES)}[kind]
    i = int(rng.integers(n))
    o[field][i] = (o[field][i] + rng.integers(1, len(values))) % len(values)
  elif kind == 'position':
    taken = set((o['row'] * grid + o['col']).tolist()) | set((g['row'] * grid + g['col']).tolist())
    free = [cell for cell in range(grid * grid) if cell not in taken]
    if not free:
      return None
    i, cell = int(rng.integers(n)), free[int(rng.integers(len(free)))]
    o['row'][i], o['col'][i] = cell // grid, cell % grid
    order = np.argsort(o['row'] * grid + o['col'], kind='stable')
    o = {k: v[order] for k, v in o.items()}
  elif kind == 'binding':
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n) if o['shape'][i] != o['shape'][j]]
    if not pairs:
      return None
    i, j = pairs[int(rng.integers(len(pairs)))]
    o['shape'][i], o['shape'][j] = o['shape'][j], o['shape'][i]
  elif kind == 'digit':
    if not len(g['digit']):
      return None
    k = int(rng.integers(len(g['digit'])))
    g['digit'][k] = (g['digit'][k] + rng.integers(1, len(NUMBERS))) % len(NUMBERS)
  else:
    raise ValueError(f'hard negative kind {kind!r}: expected one of {HARD_NEGATIVE_KINDS}')
  return scene_caption(o, g, grid)


def caption(objects: Mapping[str, np.ndarray]) -> str:
  """'large red circle small blue square' in reading order (3 tokens per object, 18 for six): no separators,
  since every object is exactly size-colour-shape, and short captions keep the padded sequence short."""
  return ' '.join(f'{SIZES[z]} {COLORS[c]} {SHAPES[s]}'
                    for s, c, z in zip(objects['shape'], objects['color'], objects['size']))


def _questions(rng: np.random.Generator, o: Mapping[str, np.ndarray], grid: int,
               glyphs: Mapping[str, np.ndarray] | None = None) -> list[tuple[str, str, str]]:
  """(family, question, answer) triples for one image; see the module docstring for the families. glyphs (the
  scenes world): counts go to twelve, and the nearest and text families are added."""
  scenes = glyphs is not None
  count_words = SCENE_NUMBERS if scenes else NUMBERS
  n = len(o['shape'])
  shape_ids, color_ids = [int(v) for v in o['shape']], [int(v) for v in o['color']]
  pairs = list(zip(color_ids, shape_ids))
  qa = []

  # existence: one yes (an object's colour+shape), one no (a colour+shape absent from the image).
  c, s = pairs[rng.integers(n)]
  qa.append(('existence', f'is there a {COLORS[c]} {SHAPES[s]} ?', 'yes'))
  absent = [(c, s) for c in range(len(COLORS)) for s in range(len(SHAPES)) if (c, s) not in pairs]
  c, s = absent[rng.integers(len(absent))]
  qa.append(('existence', f'is there a {COLORS[c]} {SHAPES[s]} ?', 'no'))

  # color: a shape that occurs exactly once.
  unique_shapes = [s for s in range(len(SHAPES)) if shape_ids.count(s) == 1]
  if unique_shapes:
    s = unique_shapes[rng.integers(len(unique_shapes))]
    qa.append(('color', f'what color is the {SHAPES[s]} ?', COLORS[color_ids[shape_ids.index(s)]]))

  # shape: a colour that occurs exactly once.
  unique_colors = [c for c in range(len(COLORS)) if color_ids.count(c) == 1]
  if unique_colors:
    c = unique_colors[rng.integers(len(unique_colors))]
    qa.append(('shape', f'what shape is the {COLORS[c]} object ?', SHAPES[shape_ids[color_ids.index(c)]]))

  # count: all objects, and one colour (present or absent with equal probability when both exist).
  qa.append(('count', 'how many objects are there ?', count_words[n]))
  present = sorted(set(color_ids))
  missing = [c for c in range(len(COLORS)) if c not in present]
  pool = present if (not missing or rng.random() < 0.5) else missing
  c = pool[rng.integers(len(pool))]
  qa.append(('count', f'how many {COLORS[c]} objects are there ?', count_words[color_ids.count(c)]))

  # position / relation: objects whose colour+shape is unique, named "colour shape".
  named = [i for i in range(n) if pairs.count(pairs[i]) == 1]
  name = lambda i: f'{COLORS[color_ids[i]]} {SHAPES[shape_ids[i]]}'
  if named:
    i = named[rng.integers(len(named))]
    qa.append(('position', f'where is the {name(i)} ?', position_name(int(o['row'][i]), int(o['col'][i]), grid)))
  if len(named) >= 2:
    row, col = o['row'], o['col']
    truth = {'left of': lambda a, b: col[a] < col[b], 'right of': lambda a, b: col[a] > col[b],
             'above': lambda a, b: row[a] < row[b], 'below': lambda a, b: row[a] > row[b]}
    cands = {True: [], False: []}
    for a in named:
      for b in named:
        if a != b:
          for rel in RELATIONS:
            cands[bool(truth[rel](a, b))].append((a, rel, b))
    order = [True, False] if rng.random() < 0.5 else [False, True]
    for want in order:  # one yes and one no; if only one answer is possible, two of that answer
      pool = cands[want] or cands[not want]
      a, rel, b = pool[rng.integers(len(pool))]
      qa.append(('relation', f'is the {name(a)} {rel} the {name(b)} ?', 'yes' if truth[rel](a, b) else 'no'))
  if not scenes:
    return qa

  # nearest: a named object whose nearest other object (cell-centre distance) is unique and named.
  cands = []
  for i in named:
    d2 = [(int(o['row'][i] - o['row'][j]) ** 2 + int(o['col'][i] - o['col'][j]) ** 2, j) for j in range(n) if j != i]
    if d2:
      best = min(d for d, _ in d2)
      closest = [j for d, j in d2 if d == best]
      if len(closest) == 1 and closest[0] in named:
        cands.append((i, closest[0]))
  if cands:
    i, j = cands[rng.integers(len(cands))]
    qa.append(('nearest', f'which object is nearest to the {name(i)} ?', name(j)))

  # text: the digit in one glyph's cell.
  g = len(glyphs['digit'])
  if g:
    k = int(rng.integers(g))
    cell = position_name(int(glyphs['row'][k]), int(glyphs['col'][k]), grid)
    qa.append(('text', f'what number is at {cell} ?', NUMBERS[int(glyphs['digit'][k])]))
  return qa


def generate_example(c: ShapesWorldConfig, split: str, index: int) -> dict[str, Any]:
  """Record `index` of `split`: a pure function of (c.seed, split, index), independent of build order."""
  rng = np.random.default_rng([c.seed, SPLITS[split], index])
  objects = _sample_objects(rng, c)
  glyphs = _sample_glyphs(rng, c, objects) if c.world == 'scenes' else None
  qa = _questions(rng, objects, c.grid, glyphs)
  return {
      'index': index,
      'image': render(objects, c.image_size, c.grid, glyphs),
      'caption': caption(objects) if glyphs is None else scene_caption(objects, glyphs, c.grid),
      'families': [f for f, _, _ in qa],
      'questions': [q for _, q, _ in qa],
      'answers': [a for _, _, a in qa],
      'objects': objects,
  }


def tfds_example(c: ShapesWorldConfig, split: str, index: int) -> dict[str, Any]:
  """`generate_example` in the builder's feature layout (objects as one int32 [n, len(OBJECT_FIELDS)] array)."""
  ex = generate_example(c, split, index)
  ex['objects'] = np.stack([ex['objects'][k] for k in OBJECT_FIELDS], axis=-1)  # [n, 7]
  return ex


# ----------------------------------------------------------------------------------------------- TFDS builder


class ShapesWorld(worlds.GeneratedSplits, tfds.core.GeneratorBasedBuilder):
  """TFDS builder for the shapes world (array_record; records in index order, disable_shuffling=True)."""

  VERSION = tfds.core.Version('1.2.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.', '1.1.0': 'Captions without comma separators.',
                   '1.2.0': 'Palette with equal channel sums.'}
  # TFDS 4.9.10 resolves `code_path` for packaged builders through the `importlib_resources` backport, which
  # it only declares for Python < 3.9; pin it to this file instead (used only to look for a checksums file).
  code_path = epath.Path(__file__)
  # No BUILDER_CONFIGS: every instance gets an explicit ShapesWorldConfig (see `builder`), whose name encodes
  # its values; TFDS refuses custom configs that share a name with a listed one.

  def _info(self) -> tfds.core.DatasetInfo:
    s = self.builder_config.image_size
    return worlds.dataset_info(self, __doc__, 'image', (s, s, 3), np.uint8, 'objects', len(OBJECT_FIELDS))

  def _make_tokenizer(self) -> tokenizers.Tokenizer:
    return make_tokenizer(self.builder_config.world)

  def _make_example(self, split: str, index: int) -> dict[str, Any]:
    return tfds_example(self.builder_config, split, index)


# ----------------------------------------------------------------------------------------------- prepare / read


class _QuietCustomConfig(logging.Filter):
  """Drops TFDS's 'Using custom data configuration' warning, logged on every builder we create (all ours are
  custom: the config name encodes the world's values)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith('Using custom data configuration')


logging.getLogger('absl').addFilter(_QuietCustomConfig())


def builder(data_cfg: Any) -> ShapesWorld:
  """The TFDS builder for cfg.data under data.data_dir (nothing is built)."""
  return worlds.make_builder(ShapesWorld, config_from(data_cfg), data_cfg, 'shapes')


def is_prepared(data_cfg: Any) -> bool:
  """True when the dataset and its tokenizer.json are complete on disk."""
  return worlds.is_built(builder(data_cfg))


def prepare(data_cfg: Any) -> tuple[str, tokenizers.Tokenizer]:
  """Builds the world once under data.data_dir (worlds.build: locked, resumable after a killed build) and returns
  (dataset dir, tokenizer)."""
  b = builder(data_cfg)
  return worlds.build(b, functools.partial(make_tokenizer, b.builder_config.world))


def media_spec(data_cfg: Any) -> tuple[tuple[int, int, int], Any]:
  """(shape, dtype) of one example's image: ((image_size, image_size, 3), uint8)."""
  s = config_from(data_cfg).image_size
  return (s, s, 3), np.uint8


def data_source(data_cfg: Any, split: str):
  """Random-access source of decoded records of a prepared split: tfds.data_source over array_record, each
  record parsed by `ParsedSource` (the same values TFDS's decoder gives, ~8x faster)."""
  c = config_from(data_cfg)
  return worlds.open_split(ShapesWorld, c, data_cfg, split, 'shapes', lambda raw: ParsedSource(raw, c.image_size))


class ParsedSource(worlds.ParsedRecords):
  """A split's records parsed as TFDS's decoder would for ShapesWorld's features (worlds.ParsedRecords): the text
  fields, image uint8 [s, s, 3] and objects int32 [n, len(OBJECT_FIELDS)]; a wrong-sized image raises ValueError
  naming the field. tests/test_data.py checks that both decoders agree on every record of a built split."""

  def __init__(self, raw: Any, image_size: int):
    super().__init__(raw)
    self._image_shape = (image_size, image_size, 3)

  def _parse(self, fields: Any) -> dict[str, Any]:
    image = worlds.field_value(fields, 'image', 'bytes_list')
    if len(image) != int(np.prod(self._image_shape)):
      raise ValueError(f"field 'image': {len(image)} bytes, expected {self._image_shape} uint8")
    objects = worlds.field_values(fields, 'objects', 'int64_list')
    return {
        'image': np.frombuffer(image, np.uint8).reshape(self._image_shape).copy(),   # writable, as TFDS's
        'objects': np.array(objects, np.int32).reshape(-1, len(OBJECT_FIELDS)),
    }


def decode_record(record: Mapping[str, Any]) -> dict[str, Any]:
  """A record from `data_source` with text as str and objects as int32 arrays (as `generate_example`)."""
  txt = lambda v: v.decode() if isinstance(v, bytes) else str(v)
  return {
      'index': int(record['index']),
      'image': np.asarray(record['image']),
      'caption': txt(record['caption']),
      'questions': [txt(v) for v in record['questions']],
      'answers': [txt(v) for v in record['answers']],
      'families': [txt(v) for v in record['families']],
      'objects': {k: np.asarray(record['objects'], np.int32).reshape(-1, len(OBJECT_FIELDS))[:, j]
                  for j, k in enumerate(OBJECT_FIELDS)},
  }


def chance_levels(data_cfg: Any, split: str = 'test') -> dict[str, float]:
  """Per family (and 'overall'): the exact-match accuracy on `split` of always giving the family's most frequent
  answer in that split, what a model that ignores the image and the question's wording scores at best."""
  return worlds.chance_levels(data_source(data_cfg, split), decode_record, families(data_cfg))
