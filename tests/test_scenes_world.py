"""The scenes world (mmproj/data/shapes.py, data.world='scenes'): captions with cells, glyphs drawn where the text
questions say, nearest-object answers, counts to twelve, its own tokenizer, chance levels, and the config checks;
the shapes world's records do not change."""
from __future__ import annotations

import collections

import numpy as np
import pytest

from mmproj.data import shapes
from mmproj.data import tokenizer as tokenizer_lib

SCENES = shapes.ShapesWorldConfig(image_size=96, grid=6, min_objects=1, max_objects=12, world='scenes', max_glyphs=3,
                                  num_train=300, num_test=40)


def _records(n=300):
  return [shapes.generate_example(SCENES, 'train', i) for i in range(n)]


def test_every_family_occurs_and_every_text_is_in_the_vocabulary():
  tok = shapes.make_tokenizer('scenes')
  assert tokenizer_lib.vocab_size(tok) == shapes.SCENE_VOCAB_SIZE <= 96
  seen = collections.Counter()
  for ex in _records():
    seen.update(ex['families'])
    for text in [ex['caption']] + ex['questions'] + ex['answers']:
      tokenizer_lib.encode(tok, text)                       # raises on an out-of-vocabulary word
  assert set(seen) == set(shapes.SCENE_FAMILIES)


def test_caption_names_each_object_and_glyph_with_its_cell():
  ex = shapes.generate_example(SCENES, 'train', 5)
  o = ex['objects']
  words = ex['caption'].split()
  for i in range(len(o['shape'])):
    cell = shapes.position_name(int(o['row'][i]), int(o['col'][i]), 6)
    phrase = f"{shapes.SIZES[o['size'][i]]} {shapes.COLORS[o['color'][i]]} {shapes.SHAPES[o['shape'][i]]} {cell}"
    assert phrase in ex['caption']
  assert len(words) == 5 * len(o['shape']) + 4 * ex['caption'].count('number')


def test_text_answers_are_the_digits_drawn_in_their_cells():
  checked = 0
  stamps = shapes._glyph_stamps(96, 6)
  for ex in _records(100):
    for f, q, a in zip(ex['families'], ex['questions'], ex['answers']):
      if f != 'text':
        continue
      cell_name = q[len('what number is at '):-2]
      (row, col), = [(r, c) for r in range(6) for c in range(6) if shapes.position_name(r, c, 6) == cell_name]
      patch = ex['image'][row * 16:(row + 1) * 16, col * 16:(col + 1) * 16]
      ink = np.all(patch == shapes.GLYPH_RGB, axis=-1)
      digit = shapes.NUMBERS.index(a)
      assert ink.sum() == stamps[digit].sum()                         # that digit's glyph, whole, and nothing else
      ys, xs = np.nonzero(ink)
      drawn = ink[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
      glyph = stamps[digit]
      gy, gx = np.nonzero(glyph)
      np.testing.assert_array_equal(drawn, glyph[gy.min():gy.max() + 1, gx.min():gx.max() + 1])
      checked += 1
  assert checked > 30


def test_the_ten_glyphs_differ():
  stamps = shapes._glyph_stamps(96, 6)
  assert len({s.tobytes() for s in stamps}) == 10


def test_nearest_answers_match_a_brute_force_search():
  checked = 0
  for ex in _records():
    o = ex['objects']
    names = [f'{shapes.COLORS[c]} {shapes.SHAPES[s]}' for c, s in zip(o['color'], o['shape'])]
    for f, q, a in zip(ex['families'], ex['questions'], ex['answers']):
      if f != 'nearest':
        continue
      i = names.index(q[len('which object is nearest to the '):-2])
      d = [(o['row'][i] - o['row'][j]) ** 2 + (o['col'][i] - o['col'][j]) ** 2 if j != i else 10 ** 9
           for j in range(len(names))]
      assert names[int(np.argmin(d))] == a and sorted(d)[0] < sorted(d)[1]
      assert names.count(a) == 1 and names.count(names[i]) == 1
      checked += 1
  assert checked > 50


def test_counts_go_to_twelve():
  answers = {a for ex in _records() for f, q, a in zip(ex['families'], ex['questions'], ex['answers'])
             if q == 'how many objects are there ?'}
  assert 'twelve' in answers and answers <= set(shapes.SCENE_NUMBERS[1:])


def test_shapes_world_is_unchanged_by_the_scenes_options():
  ex = shapes.generate_example(shapes.ShapesWorldConfig(), 'train', 0)
  assert set(ex['families']) <= set(shapes.FAMILIES)
  assert shapes.VOCAB_SIZE == 58 and tokenizer_lib.vocab_size(shapes.make_tokenizer()) == 58
  assert shapes.ShapesWorldConfig().name == 'img48_grid3_obj1-6_n20000-1000_seed0_jitter1'
  assert SCENES.name.startswith('scenes_') and SCENES.name.endswith('_glyphs3')


@pytest.mark.parametrize('fields, match', [
    (dict(world='worlds'), 'data.world'),
    (dict(max_glyphs=2), 'data.max_glyphs'),                              # glyphs need the scenes world
    (dict(world='scenes', grid=7, image_size=112), 'data.grid'),
    (dict(world='scenes', grid=6, image_size=96, max_objects=13), 'data.max_objects'),
    (dict(grid=6, image_size=96), 'data.grid'),                           # the shapes world names 5x5 at most
])
def test_config_errors_name_the_field(fields, match):
  with pytest.raises(ValueError, match=match):
    shapes.ShapesWorldConfig(**fields)


def test_chance_levels_are_the_majority_answer_rates(tmp_path):
  data = dict(name='shapes', world='scenes', data_dir=str(tmp_path), image_size=96, grid=6, max_objects=12,
              max_glyphs=3, num_train=8, num_test=40, min_objects=1, seed=0, jitter=1)
  shapes.prepare(data)
  chance = shapes.chance_levels(data)
  answers = collections.defaultdict(list)
  for i in range(40):
    ex = shapes.generate_example(shapes.config_from(data), 'test', i)
    for f, a in zip(ex['families'], ex['answers']):
      answers[f].append(a)
  for f in shapes.SCENE_FAMILIES:
    assert chance[f] == pytest.approx(collections.Counter(answers[f]).most_common(1)[0][1] / len(answers[f]))
  assert chance['existence'] == pytest.approx(0.5)                        # one yes and one no per image
  assert set(chance) == {'overall', *shapes.SCENE_FAMILIES}


def _items(caption):
  """A scenes caption -> its objects ('size colour shape row col') and glyphs ('number digit row col') as tuples."""
  words = caption.split()
  split = words.index('number') if 'number' in words else len(words)
  objects = [tuple(words[i:i + 5]) for i in range(0, split, 5)]
  glyphs = [tuple(words[i:i + 4]) for i in range(split, len(words), 4)]
  return objects, glyphs


def test_glyphs_read_back_from_the_caption_rebuild_it():
  for ex in _records(100):
    glyphs = shapes.scene_glyphs(ex['caption'], 6)
    assert shapes.scene_caption(ex['objects'], glyphs, 6) == ex['caption']


def test_each_hard_negative_changes_one_thing_and_stays_a_well_formed_caption():
  tok = shapes.make_tokenizer('scenes')
  applied = collections.Counter()
  for ex in _records(150):
    objects, glyphs = _items(ex['caption'])
    g = shapes.scene_glyphs(ex['caption'], 6)
    for kind in shapes.HARD_NEGATIVE_KINDS:
      neg = shapes.hard_negative_caption(ex['objects'], g, 6, kind, np.random.default_rng(0))
      if neg is None:
        continue
      applied[kind] += 1
      tokenizer_lib.encode(tok, neg)
      n_objects, n_glyphs = _items(neg)
      assert neg != ex['caption'] and len(n_objects) == len(objects) and len(n_glyphs) == len(glyphs)
      cells = [o[3:] for o in n_objects] + [gl[2:] for gl in n_glyphs]
      assert len(set(cells)) == len(cells)                            # still at most one thing per cell
      changed = [(a, b) for a, b in zip(objects, n_objects) if a != b]
      if kind in ('shape', 'color', 'size'):
        slot = {'size': 0, 'color': 1, 'shape': 2}[kind]
        assert len(changed) == 1 and [i for i in range(5) if changed[0][0][i] != changed[0][1][i]] == [slot]
      elif kind == 'binding':                 # the same words, two shapes exchanged
        assert len(changed) == 2 and sorted(o[2] for o in objects) == sorted(o[2] for o in n_objects)
      elif kind == 'position':                # the same objects, one in another cell, still in reading order
        assert sorted(o[:3] for o in objects) == sorted(o[:3] for o in n_objects)
        assert len(set(objects) - set(n_objects)) == 1
        order = [shapes.ROW_WORDS[6].index(o[3]) * 6 + shapes.COL_WORDS[6].index(o[4]) for o in n_objects]
        assert order == sorted(order)
      else:                                   # digit: the objects untouched, one glyph's digit changed
        assert not changed and sum(a != b for a, b in zip(glyphs, n_glyphs)) == 1
  assert set(applied) == set(shapes.HARD_NEGATIVE_KINDS)
  with pytest.raises(ValueError, match='hard negative kind'):
    shapes.hard_negative_caption(ex['objects'], g, 6, 'texture', np.random.default_rng(0))
