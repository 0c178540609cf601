"""Reading objects back from an image of the shapes / scenes world, and scoring them against a caption's objects.

The measurable rule of issue 22 for generated images: a generated picture is decoded into objects directly (no
learned classifier), and the match rate to the objects its caption names is the score, per attribute.

decode_objects(image, grid)   one image -> its objects (shape, colour, size, cell, centre)
  1. Pixel classes. The renderer paints palette colours (shapes.COLOR_RGB) and light-grey digit glyphs
     (shapes.GLYPH_RGB) onto a dark background (shapes.BACKGROUND_RGB), so a pixel's excess over the background,
     p - bg, points along one of 7 directions (6 colours + glyph). Each pixel takes the direction nearest in angle,
     and counts as ink when its projection on that direction is at least half the full colour (INK_FRACTION).
     A blend of a colour with the background (a soft or blurred edge) keeps its hue, so it never reads as another
     colour; grey blends of glyphs stay grey. Glyph pixels are not objects and are dropped.
  2. Components. 8-connected components of each colour; components under MIN_AREA_FRACTION of the smallest
     object the renderer can draw are speckles and are dropped; fragments of one colour whose centres lie in the
     same cell are one object (the world puts at most one object in a cell).
  3. Identity. Each component (with the ring of pixels around it, weighted by their strength relative to the
     component's own level, so a soft edge counts in part and a dim or bright object is still whole) is compared
     with the renderer's own stamps (shapes._stamps: every shape in every size), sharp and blurred (BLURS),
     placed at every centre within SEARCH_PX of where that stamp would put the component's centroid; the (shape,
     size, centre) of highest soft IoU (sum of minima over sum of maxima) wins. A render matches its sharp stamp
     exactly (IoU 1), so decoding a render is exact wherever the renderer draws the (shape, size) pairs
     differently (`indistinguishable`); blur, noise and an object a pixel off lower every stamp's IoU but keep
     the right one first (tests/test_recognise.py measures how far).
  The cell is the one holding the chosen centre.
  Not handled: two touching objects of one colour read as one object (the world never draws them; a generator
  that does is scored one object short).

match(decoded, objects)       one image: the caption's objects paired one-to-one with decoded ones, hits per attribute
match_rates(images, objects)  a batch of images -> rates in [0, 1] (definitions in its docstring)
scene_objects(caption, grid)  the objects a scenes caption names (for prompts that exist only as text)

numpy and scipy only (scipy comes with jax): no jax, nothing compiles.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy import ndimage, optimize

from mmproj.data import shapes

FIELDS = ('shape', 'color', 'size', 'row', 'col', 'x', 'y')  # decode_objects' arrays, int32 [n] each
ATTRIBUTES = ('shape', 'color', 'size', 'cell')               # what match scores per caption object
RATES = ('shape', 'color', 'size', 'cell', 'object', 'count', 'image')
INK_FRACTION = 0.5       # a pixel is ink when it carries at least this fraction of its colour over the background
MIN_AREA_FRACTION = 0.3  # components under this fraction of the smallest stamp's area are speckles
BLURS = (0.0, 0.6, 1.0)  # Gaussian blurs (px) of the stamps matched: a blurred object still fits its own shape
SEARCH_PX = 2            # stamp centres tried around each stamp's centroid-aligned position, in pixels each way

@dataclasses.dataclass(frozen=True)
class _Templates:
  """The renderer's stamps (shapes._stamps) laid out for matching at one (image_size, grid)."""
  half: int                         # h: templates are [2h+1, 2h+1], centred on the object's centre pixel
  keys: tuple[tuple[int, int], ...]  # (shape, size) of stamp k, K of them
  areas: np.ndarray                 # [K] pixels per stamp
  soft: np.ndarray                  # [len(BLURS), K, 2h+1, 2h+1] float32: each stamp under each blur
  shifts: np.ndarray                # [K, C, 2] int: (dy, dx) of the stamp centre from a component's rounded
                                    #   centroid, C = (2 SEARCH_PX + 1)^2 centres around the stamp's own centroid
  margin: int                       # max |shift|


@functools.lru_cache(maxsize=None)
def _templates(image_size: int, grid: int) -> _Templates:
  h, stamp_dict, _ = shapes._stamps(image_size, grid)
  keys = tuple(sorted(stamp_dict))
  stamps = np.stack([stamp_dict[k] for k in keys]).astype(np.float32)              # [K, 2h+1, 2h+1]
  areas = stamps.sum(axis=(1, 2))                                                   # [K]
  offsets_yx = np.mgrid[-h:h + 1, -h:h + 1].reshape(2, -1).T                          # [(2h+1)^2, 2]
  centroids = stamps.reshape(len(keys), -1) @ offsets_yx / areas[:, None]           # [K, 2] from the centre
  search = np.mgrid[-SEARCH_PX:SEARCH_PX + 1, -SEARCH_PX:SEARCH_PX + 1].reshape(2, -1).T  # [C, 2]
  shifts = np.round(-centroids).astype(int)[:, None, :] + search[None]               # [K, C, 2]
  soft = np.stack([[_relative(blurred, blurred >= INK_FRACTION) for blurred in
                    (ndimage.gaussian_filter(stamp, b, mode='constant') if b else stamp for stamp in stamps)]
                   for b in BLURS])                                                   # [B, K, 2h+1, 2h+1]
  return _Templates(h, keys, areas, soft, shifts, int(np.abs(shifts).max()))


def _relative(strength: np.ndarray, ink: np.ndarray) -> np.ndarray:
  """Strengths [H, W] relative to their object's own level, clipped to [0, 1]: the level is the median over the
  object's interior (ink pixels whose 8 neighbours are ink too; all its ink when it has none), so neither soft
  edges nor noise move it, while a whole object drawn dimmer or brighter than the palette is scaled back to 1.
  Observed components and blurred stamps both go through this, so they stay comparable."""
  if not ink.any():
    return np.clip(strength, 0, 1)
  interior = ndimage.binary_erosion(ink, np.ones((3, 3), bool))
  level = np.median(strength[interior if interior.any() else ink])
  return np.clip(strength / level, 0, 1)


def indistinguishable(image_size: int, grid: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
  """Pairs of (shape, size) the renderer draws identically (one stamp a translate of the other) at this image size
  and grid: no reader of the pixels can tell them apart. None at the 16 px cells the world's configs use, nor at
  larger ones; at 12 px cells (60 px, grid 5) the small circle and the small cross are the same 3x3 plus, at 8 px
  four pairs coincide. decode_objects reads such an object as the first of its pair."""
  _, stamp_dict, _ = shapes._stamps(image_size, grid)

  def crop(mask):  # [2h+1, 2h+1] -> its bounding box
    ys, xs = np.nonzero(mask)
    return mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
  keys = sorted(stamp_dict)
  return [(a, b) for i, a in enumerate(keys) for b in keys[i + 1:]
          if np.array_equal(crop(stamp_dict[a]), crop(stamp_dict[b]))]


def _check_image(image: np.ndarray, name: str) -> np.ndarray:
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[0] != image.shape[1] or image.shape[2] != 3:
    raise ValueError(f'{name}: expected a uint8 image [S, S, 3], got {image.dtype} {image.shape}')
  return image


def _check_grid(grid: int, image_size: int) -> None:
  if not isinstance(grid, (int, np.integer)) or not 1 <= grid <= shapes.SCENE_MAX_GRID:
    raise ValueError(f'grid: must be an int in [1, {shapes.SCENE_MAX_GRID}], got {grid!r}')
  if image_size < 8 * grid:
    raise ValueError(f'grid: {grid} gives cells under 8 px on a {image_size} px image')


def _pixel_classes(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """uint8 [S, S, 3] -> (hue int [S, S]: the direction nearest in angle to the pixel's excess over the background,
  0..5 a colour of shapes.COLORS, 6 the glyph grey; strength float32 [S, S]: the excess projected on that
  direction, 1 for the full colour, 0 for the background; ink bool [S, S]: strength >= INK_FRACTION)."""
  background = np.asarray(shapes.BACKGROUND_RGB, np.float32)
  directions = np.concatenate([shapes.COLOR_RGB, np.asarray([shapes.GLYPH_RGB])]).astype(np.float32) - background
  excess = image.astype(np.float32) - background                                    # [S, S, 3]
  dots = excess @ directions.T                                                        # [S, S, 7]
  cosine = dots / (np.linalg.norm(excess, axis=-1, keepdims=True) * np.linalg.norm(directions, axis=-1) + 1e-6)
  hue = np.argmax(cosine, axis=-1)                                                    # [S, S]
  strength = np.take_along_axis(dots, hue[..., None], -1)[..., 0] / (directions ** 2).sum(-1)[hue]
  return hue, strength, strength >= INK_FRACTION


def decode_objects(image: np.ndarray, *, grid: int) -> dict[str, np.ndarray]:
  """The objects in one image of the world: int32 arrays [n] 'shape', 'color', 'size' (indices into shapes.SHAPES,
  COLORS, SIZES), 'row', 'col' (the cell of the object's centre), 'x', 'y' (its centre pixel), in reading order.
  Exact on the renderer's images (x, y included) wherever its stamps differ (`indistinguishable`); see the module
  docstring for how, and for what it tolerates."""
  image = _check_image(image, 'image')
  size_px = image.shape[0]
  _check_grid(grid, size_px)
  t = _templates(size_px, grid)
  cell = size_px / grid
  hue, strength, ink = _pixel_classes(image)                                          # [S, S] each
  min_area = max(2, int(round(MIN_AREA_FRACTION * t.areas.min())))
  pad = t.half + t.margin
  side = 2 * pad + 1                                                                  # window around a centroid
  eight = np.ones((3, 3), bool)
  found = []
  for color in range(len(shapes.COLORS)):
    labels, count = ndimage.label(ink & (hue == color), structure=eight)              # [S, S], 0 = none
    if not count:
      continue
    pixels = np.bincount(labels.ravel(), minlength=count + 1)                          # [count + 1]
    keep = np.nonzero(pixels[1:] >= min_area)[0] + 1
    if not len(keep):
      continue
    coordinates = np.indices(labels.shape).reshape(2, -1)                             # [2, S * S] (row, col)
    centres = np.stack([np.bincount(labels.ravel(), v, count + 1)[keep] for v in coordinates], -1) \
        / pixels[keep, None]                                                            # [k, 2] (row, col)
    groups: dict[tuple[int, int], list[int]] = {}   # fragments of this colour per cell: one object
    for label, (y, x) in zip(keep, centres):
      groups.setdefault((min(int(y // cell), grid - 1), min(int(x // cell), grid - 1)), []).append(int(label))
    soft = np.pad(np.where(hue == color, strength, 0), pad)                            # [S + 2 pad, S + 2 pad]
    padded = np.pad(labels, pad)
    for members in groups.values():
      weights = pixels[members]
      cy, cx = np.round(weights @ centres[np.searchsorted(keep, members)] / weights.sum()).astype(int)
      # The component and the ring of pixels around it (its faint edge), weighted by strength relative to the
      # component's own level (an object drawn a little dim or bright is still whole). A render's are 0 or 1.
      inside = np.isin(padded[cy:cy + side, cx:cx + side], members)                   # [side, side]
      strengths = soft[cy:cy + side, cx:cx + side]
      window = _relative(strengths, inside) * ndimage.binary_dilation(inside, eight)  # [side, side], centred
      views = sliding_window_view(window, t.soft.shape[-2:])                         # [2m+1, 2m+1, 2h+1, 2h+1]
      views = views[t.shifts[..., 0] + t.margin, t.shifts[..., 1] + t.margin]       # [K, C, 2h+1, 2h+1]
      inter = np.minimum(views[None], t.soft[:, :, None]).sum((-2, -1))              # [B, K, C] soft IoU
      iou = inter / (t.soft.sum((-2, -1))[:, :, None] + window.sum() - inter)
      _, k, c = np.unravel_index(np.argmax(iou), iou.shape)
      y, x = cy + t.shifts[k, c, 0], cx + t.shifts[k, c, 1]
      row, col = (min(max(int(v // cell), 0), grid - 1) for v in (y, x))
      shape, size = t.keys[k]
      found.append((row, col, y, x, shape, color, size))
  found.sort()
  columns = dict(zip(('row', 'col', 'y', 'x', 'shape', 'color', 'size'), zip(*found))) if found else {}
  return {f: np.asarray(columns.get(f, ()), np.int32) for f in FIELDS}


def match(decoded: Mapping[str, np.ndarray], objects: Mapping[str, np.ndarray]) -> dict[str, np.ndarray | int]:
  """Pairs the caption's objects (arrays 'shape', 'color', 'size', 'row', 'col' [n]) one-to-one with decoded ones
  (decode_objects) and scores each caption object.

  Pairing (one assignment, scipy's linear_sum_assignment) prefers, in this order: pairs in the same cell (cells are
  unique per object in this world, so these are unambiguous), then pairs agreeing on more of shape / colour / size,
  then the decoded object whose cell is nearest the caption object's (a caption knows only cells). Pairs in
  different cells are allowed: an object drawn in the wrong cell is still the same object, with 'cell' wrong; a
  pair sharing nothing (cell, shape, colour and size all differ) is dropped (a missing object and an extra one).
  Returns: 'shape', 'color', 'size', 'cell', 'object' (all four) bool [n], False for an unmatched caption object;
  'index' int32 [n] (the paired decoded object, -1 if none); 'missing' (unmatched caption objects) and 'extra'
  (unmatched decoded objects) ints.
  """
  n, d = len(objects['shape']), len(decoded['shape'])
  caption = {k: np.asarray(objects[k], np.int64) for k in ('shape', 'color', 'size', 'row', 'col')}
  found = {k: np.asarray(decoded[k], np.int64) for k in ('shape', 'color', 'size', 'row', 'col')}
  same = {k: caption[k][:, None] == found[k][None, :] for k in ('shape', 'color', 'size', 'row', 'col')}  # [n, d]
  same['cell'] = same['row'] & same['col']
  index = np.full(n, -1, np.int32)
  if n and d:
    # Lexicographic cost: 10^4 per pair in different cells > 10^2 per attribute differing (<= 3 * 12 of them) >
    # distance between the cells (< 100 summed over <= 12 pairs on a 6x6 grid).
    distance = np.hypot(caption['row'][:, None] - found['row'][None, :],
                        caption['col'][:, None] - found['col'][None, :])                       # [n, d] in cells
    wrong = 3 - (same['shape'].astype(int) + same['color'] + same['size'])                 # [n, d]
    cost = 1e4 * ~same['cell'] + 1e2 * wrong + distance
    rows, cols = optimize.linear_sum_assignment(cost)
    shared = same['cell'] | (wrong < 3)                    # a pair that shares nothing is a miss and an extra
    index[rows] = np.where(shared[rows, cols], cols, -1)
  paired = index >= 0
  hits = {a: paired & same[a][np.arange(n), np.maximum(index, 0)] if d else np.zeros(n, bool) for a in ATTRIBUTES}
  hits['object'] = hits['shape'] & hits['color'] & hits['size'] & hits['cell']
  return {**hits, 'index': index, 'missing': int(n - paired.sum()), 'extra': int(d - paired.sum())}


def match_rates(images: np.ndarray, objects: Sequence[Mapping[str, np.ndarray]], *, grid: int) -> dict[str, float]:
  """Decodes each image (decode_objects) and scores it against its caption's objects (match). Rates in [0, 1]:

    'shape', 'color', 'size', 'cell'  fraction of all caption objects (over all images) whose paired decoded object
                                      has that attribute right; an unpaired caption object is wrong on all four
    'object'                          fraction of caption objects right on all four attributes
    'count'                           fraction of images whose number of decoded objects equals the caption's
    'image'                           fraction of images with every caption object right and nothing extra
                                      (so the decoded scene is exactly the caption's)
  images: uint8 [N, S, S, 3]; objects: N dicts of arrays 'shape', 'color', 'size', 'row', 'col' (a record's
  objects, or scene_objects of a caption). With no caption objects at all the per-object rates are nan.
  """
  images = np.asarray(images)
  if images.ndim != 4:
    raise ValueError(f'images: expected uint8 [N, S, S, 3], got {images.dtype} {images.shape}')
  if len(objects) != len(images):
    raise ValueError(f'objects: {len(objects)} dicts for {len(images)} images')
  if not len(images):
    raise ValueError('images: no images to score')
  hits = {a: 0 for a in ATTRIBUTES + ('object',)}
  total = counted = exact = 0
  for i, (image, wanted) in enumerate(zip(images, objects)):
    decoded = decode_objects(_check_image(image, f'images[{i}]'), grid=grid)
    result = match(decoded, wanted)
    for a in hits:
      hits[a] += int(result[a].sum())
    n = len(wanted['shape'])
    total += n
    counted += len(decoded['shape']) == n
    exact += bool(result['object'].all()) and result['extra'] == 0
  per_object = {a: hits[a] / total if total else float('nan') for a in hits}
  return {**per_object, 'count': counted / len(images), 'image': exact / len(images)}


def scene_objects(caption: str, grid: int) -> dict[str, np.ndarray]:
  """The objects a scenes caption names (shapes.scene_caption: 'large red circle top left small blue square bottom
  right'), as int32 arrays 'shape', 'color', 'size', 'row', 'col' [n] in caption order; glyph items ('number seven
  low right') are skipped. ValueError naming the caption and the word it cannot read."""
  if grid not in shapes.ROW_WORDS:
    raise ValueError(f'grid: must be in [1, {shapes.SCENE_MAX_GRID}], got {grid!r}')
  cell_of = {shapes.position_name(r, c, grid): (r, c) for r in range(grid) for c in range(grid)}
  words = caption.split()
  out = {k: [] for k in ('shape', 'color', 'size', 'row', 'col')}

  def fail(i, what):
    at = repr(words[i]) if i < len(words) else 'the end'
    raise ValueError(f'caption {caption!r}: expected {what} at word {i} ({at})')

  def read(i, vocabulary, what):
    if i >= len(words) or words[i] not in vocabulary:
      fail(i, what)
    return vocabulary.index(words[i])

  def read_cell(i):
    # Two-word names first ('top left' before 'top'): the word after a one-word name starts the next item (a
    # size or 'number'), never a cell word, so this never swallows it.
    for width in (2, 1):
      name = ' '.join(words[i:i + width])
      if i + width <= len(words) and name in cell_of:
        return cell_of[name], i + width
    fail(i, f'a cell of the {grid}x{grid} grid')

  i = 0
  while i < len(words):
    if words[i] == 'number':
      read(i + 1, shapes.NUMBERS, 'a digit word')
      _, i = read_cell(i + 2)
      continue
    out['size'].append(read(i, shapes.SIZES, f"a size {shapes.SIZES} or 'number'"))
    out['color'].append(read(i + 1, shapes.COLORS, f'a colour {shapes.COLORS}'))
    out['shape'].append(read(i + 2, shapes.SHAPES, f'a shape {shapes.SHAPES}'))
    (row, col), i = read_cell(i + 3)
    out['row'].append(row)
    out['col'].append(col)
  return {k: np.asarray(v, np.int32) for k, v in out.items()}
