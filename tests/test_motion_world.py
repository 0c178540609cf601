"""The motion world (mmproj/data/motion.py): deterministic clips whose frames show the annotated events at their
frames, answers recomputed from the annotations, near-balanced answers, the closed vocabulary, the config checks,
a tiny build read back through data_source (equal to TFDS's decoder and to generate_example), corrupt records,
chance levels, and the temporal check: trackers over all frames answer direction and order every time, while the
best lookup on a single frame (first or last) stays far below."""
from __future__ import annotations

import collections
import functools

import numpy as np
import pytest

from mmproj import data as data_lib
from mmproj.data import motion, shapes
from mmproj.data import tokenizer as tokenizer_lib

C = motion.MotionWorldConfig(num_train=24, num_test=16)
CELL = C.image_size / C.grid


def make_data(data_dir, **overrides):
  cfg = dict(name='motion', data_dir=str(data_dir), image_size=32, grid=3, num_frames=8, num_train=24, num_test=16,
             max_objects=3, max_move=1, seed=0)
  cfg.update(overrides)
  return cfg


@pytest.fixture(scope='module')
def world(tmp_path_factory):
  data = make_data(tmp_path_factory.mktemp('motion'))
  data_dir, tok = data_lib.prepare(data)   # through the package's dispatch on data.name
  return data, data_dir, tok


@functools.lru_cache(maxsize=None)
def clips(split, n, **fields):
  c = motion.MotionWorldConfig(**fields) if fields else C
  return tuple(motion.generate_example(c, split, i) for i in range(n))


def records(data, split):
  source = motion.data_source(data, split)
  return [motion.decode_record(source[i]) for i in range(len(source))]


def assert_example_equal(a, b):
  np.testing.assert_array_equal(a['video'], b['video'])
  for k in motion.OBJECT_FIELDS:
    np.testing.assert_array_equal(a['objects'][k], b['objects'][k], err_msg=k)
  for k in ('index', 'caption', 'questions', 'answers', 'families'):
    assert a[k] == b[k], k


# ------------------------------------------------------------------------------------------------ pixels


def color_masks(video, color):
  """[F, H, W] bool: the pixels of one palette colour (a clip's colours are its objects' own)."""
  return np.all(video == shapes.COLOR_RGB[color], axis=-1)


def centroid(mask):
  ys, xs = np.nonzero(mask)
  return np.array([ys.mean(), xs.mean()]) if len(ys) else None


def cell_of(mask):
  c = centroid(mask)
  return None if c is None else tuple(int(v) for v in c // CELL)


def track_direction(video, question):
  """All frames: where the named object's pixels go between the first and the last frame."""
  m = color_masks(video, shapes.COLORS.index(question.split()[4]))   # which way does the C S move ?
  d = centroid(m[-1]) - centroid(m[0])
  if np.abs(d).max() < CELL / 4:
    return 'nowhere'
  if abs(d[0]) > abs(d[1]):
    return 'down' if d[0] > 0 else 'up'
  return 'right' if d[1] > 0 else 'left'


def clauses(question):
  """'does the C S verb ... before the C S verbs ... ?' -> the two clauses' words."""
  a, b = question[len('does '):-len(' ?')].split(' before ')
  return a.split(), b.split()


def first_change(video, clause):
  """All frames: the first frame where the clause's object (by its first colour) looks different."""
  _, color, _, verb = clause[:4]
  m = color_masks(video, shapes.COLORS.index(color))
  seen = m.any(axis=(1, 2))
  if verb.startswith('move'):
    start = centroid(m[0])
    return next(t for t in range(len(m)) if np.abs(centroid(m[t]) - start).max() > 0.5)
  if verb.startswith('appear'):
    return int(np.argmax(seen))
  return int(np.argmax(~seen))     # disappears, or becomes another colour: its first colour is gone


def track_order(video, question):
  a, b = clauses(question)
  return 'yes' if first_change(video, a) < first_change(video, b) else 'no'


def frame_key(family, video, question, frame):
  """What one frame shows of the question's objects: their cells (None: not drawn), and the verbs asked about."""
  if family == 'direction':
    return cell_of(color_masks(video, shapes.COLORS.index(question.split()[4]))[frame])
  a, b = clauses(question)
  return (a[3], b[3], cell_of(color_masks(video, shapes.COLORS.index(a[1]))[frame]),
          cell_of(color_masks(video, shapes.COLORS.index(b[1]))[frame]))


def temporal_check(fit, held_out):
  """Accuracy per (family, rule) on the held-out clips' direction and order questions: 'all frames' (the trackers),
  'first frame' / 'last frame' (the answer most frequent on the fit clips for what that frame shows: the best rule
  that reads one frame), and 'chance' (the fit clips' most frequent answer)."""
  out = {}
  for family in ('direction', 'order'):
    items = [[(ex['video'], q, a) for ex in exs for f, q, a in zip(ex['families'], ex['questions'], ex['answers'])
              if f == family] for exs in (fit, held_out)]
    majority = collections.Counter(a for _, _, a in items[0]).most_common(1)[0][0]
    out[family, 'chance'] = np.mean([a == majority for _, _, a in items[1]])
    track = track_direction if family == 'direction' else track_order
    out[family, 'all frames'] = np.mean([track(v, q) == a for v, q, a in items[1]])
    for rule, frame in (('first frame', 0), ('last frame', -1)):
      table = collections.defaultdict(collections.Counter)
      for v, q, a in items[0]:
        table[frame_key(family, v, q, frame)][a] += 1
      guess = lambda key: table[key].most_common(1)[0][0] if key in table else majority
      out[family, rule] = np.mean([guess(frame_key(family, v, q, frame)) == a for v, q, a in items[1]])
  return out


# ------------------------------------------------------------------------------------------------ the world


def test_records_are_a_pure_function_of_seed_split_and_index():
  a = motion.generate_example(C, 'train', 3)
  assert_example_equal(a, motion.generate_example(C, 'train', 3))
  # The split sizes are not in the key: a larger build holds the same records.
  assert_example_equal(a, motion.generate_example(motion.MotionWorldConfig(num_train=500), 'train', 3))
  assert not np.array_equal(motion.generate_example(C, 'test', 3)['video'], a['video'])
  other_seed = motion.generate_example(motion.MotionWorldConfig(seed=1), 'train', 3)
  assert not np.array_equal(other_seed['video'], a['video'])


def _expected_answer(family, question, o):
  """An answer recomputed from the annotations alone (independently of the generator's question code)."""
  names = [f'{shapes.COLORS[c]} {shapes.SHAPES[s]}' for c, s in zip(o['color'], o['shape'])]
  event = [motion.EVENTS[e] for e in o['event']]
  w = question.split()
  if family == 'direction':
    i = names.index(' '.join(w[4:6]))            # which way does the C S move ?
    assert event[i] in ('none', 'move')          # drawn in one colour from start to end
    step = (int(o['row1'][i] - o['row0'][i]), int(o['col1'][i] - o['col0'][i]))
    return {(0, 0): 'nowhere', (0, -1): 'left', (0, 1): 'right', (-1, 0): 'up', (1, 0): 'down'}[step]
  if family == 'order':
    a, b = clauses(question)
    slot = lambda clause: int(o['slot'][names.index(' '.join(clause[1:3]))])
    return 'yes' if slot(a) < slot(b) else 'no'
  if family == 'moved':
    (i,) = [i for i, e in enumerate(event) if e == 'move']
    return names[i]
  if family == 'count':
    gone = 'appear' if w[-2] == 'start' else 'disappear'
    return shapes.NUMBERS[sum(e != gone for e in event)]
  if family == 'change':
    (i,) = [i for i in range(len(names)) if shapes.SHAPES[o['shape'][i]] == w[4]]
    assert event[i] == 'change'
    return shapes.COLORS[o['color1'][i]]
  raise AssertionError(family)


def test_frames_show_the_annotated_events_and_answers_follow_from_them():
  num_slots, slot_frames = motion.timing(C)
  assert (num_slots, slot_frames) == (3, 2)
  stamps = shapes._stamps(C.image_size, C.grid)[1]
  seen = collections.Counter()
  for ex in clips('train', 150):
    video, o = ex['video'], ex['objects']
    assert video.shape == (8, 32, 32, 3) and video.dtype == np.uint8
    n = len(o['shape'])
    assert 1 <= n <= 3 and len(set(o['shape'].tolist())) == n and len(set(o['color'].tolist())) == n
    slots = o['slot'][o['slot'] >= 0]
    assert len(slots) >= 1 and len(set(slots.tolist())) == len(slots)          # every event has a slot of its own
    for i in range(n):
      kind, k = motion.EVENTS[o['event'][i]], motion.event_frame(o, i, slot_frames)
      m = color_masks(video, o['color'][i])
      drawn = m.sum(axis=(1, 2))                                               # [F] pixels in its first colour
      area = stamps[int(o['shape'][i]), int(o['size'][i])].sum()
      # Objects never overlap or leave the board: whole stamps in every frame where they are drawn.
      assert set(drawn.tolist()) <= {0, area}, (ex['index'], i)
      first, last = cell_of(m[0]), cell_of(m[-1])
      if kind == 'appear':
        assert (drawn[:k] == 0).all() and (drawn[k:] == area).all() and last == (o['row0'][i], o['col0'][i])
      elif kind in ('disappear', 'change'):
        assert (drawn[:k] == area).all() and (drawn[k:] == 0).all() and first == (o['row0'][i], o['col0'][i])
      else:
        assert (drawn == area).all()
        assert first == (o['row0'][i], o['col0'][i]) and last == (o['row1'][i], o['col1'][i])
      if kind == 'change':
        assert o['color1'][i] not in o['color']
        assert (color_masks(video, o['color1'][i]).sum(axis=(1, 2))[k:] == area).all()
      if kind == 'move':
        assert abs(o['row1'][i] - o['row0'][i]) + abs(o['col1'][i] - o['col0'][i]) == 1      # max_move=1
        centres = [centroid(m[t]) for t in range(8)]
        moved = [not np.allclose(centres[t], centres[0]) for t in range(8)]
        assert moved.index(True) == k and np.allclose(centres[k + slot_frames - 1], centres[-1])
        mid = (centres[0] + centres[-1]) / 2
        assert np.abs(centres[k] - mid).max() <= 1.0                          # half way after one of two frames
    timed = sorted(np.flatnonzero(o['slot'] >= 0), key=lambda i: o['slot'][i])
    assert len(ex['caption'].split(' , then ')) == len(timed)
    for f, q, a in zip(ex['families'], ex['questions'], ex['answers']):
      assert a == _expected_answer(f, q, o), (ex['index'], q, a)
      seen[f] += 1
  assert set(seen) == set(motion.FAMILIES)


def test_caption_tells_the_events_in_time_order():
  o = {k: np.array(v, np.int32) for k, v in dict(
      shape=[1, 0, 3], color=[0, 2, 3], size=[0, 1, 0], row0=[1, 0, 2], col0=[1, 0, 2], row1=[1, 0, 2],
      col1=[0, 0, 2], color1=[0, 2, 4], event=[1, 2, 4], slot=[1, 0, 2]).items()}
  assert motion.caption(o) == ('a blue square appears , then the red circle moves left , '
                               'then the yellow cross becomes cyan')


def test_answers_are_near_balanced():
  answers = collections.defaultdict(collections.Counter)
  for ex in clips('test', 600):
    for f, a in zip(ex['families'], ex['answers']):
      answers[f][a] += 1
  share = {f: c.most_common(1)[0][1] / sum(c.values()) for f, c in answers.items()}
  assert answers['order']['yes'] == answers['order']['no']          # one of each per clip with two events
  assert set(answers['direction']) == {'left', 'right', 'up', 'down', 'nowhere'} and share['direction'] < 0.3
  assert set(answers['change']) == set(shapes.COLORS) and share['change'] < 0.25
  assert share['moved'] < 0.1 and share['count'] < 0.45
  assert set(answers['count']) <= set(shapes.NUMBERS[:4])


def test_every_text_and_answer_is_in_the_vocabulary():
  tok = motion.make_tokenizer()
  assert tokenizer_lib.vocab_size(tok) == motion.VOCAB_SIZE <= tokenizer_lib.MAX_VOCAB_SIZE
  words = [tok.id_to_token(i) for i in range(tokenizer_lib.NUM_SPECIAL, motion.VOCAB_SIZE)]
  assert words == sorted(words) == list(motion.WORDS)
  answers = (list(motion.DIRECTIONS) + [motion.NOWHERE, 'yes', 'no'] + list(shapes.NUMBERS[:motion.MAX_OBJECTS + 1])
             + list(shapes.COLORS) + [f'{c} {s}' for c in shapes.COLORS for s in shapes.SHAPES])
  for text in answers:
    tokenizer_lib.encode(tok, text)                                   # raises on an out-of-vocabulary word
  big = motion.MotionWorldConfig(max_objects=4, num_frames=16, grid=4, image_size=48, max_move=3)
  for ex in clips('train', 100) + clips('train', 60, max_objects=4, num_frames=16, grid=4, image_size=48, max_move=3):
    for text in [ex['caption']] + ex['questions'] + ex['answers']:
      tokenizer_lib.encode(tok, text)
    # The default pipeline budget (data.text_len=40) holds the caption and every QA pair.
    assert len(tokenizer_lib.encode(tok, ex['caption'])) + 4 <= 40
  assert motion.timing(big) == (4, 3)


@pytest.mark.parametrize('fields, match', [
    (dict(num_frames=3), 'data.num_frames'),
    (dict(num_frames=17), 'data.num_frames'),
    (dict(grid=1, image_size=32), 'data.grid'),
    (dict(grid=7, image_size=112), 'data.grid'),
    (dict(image_size=20), 'data.image_size'),
    (dict(max_objects=5), 'data.max_objects'),                 # four shapes, each used once per clip
    (dict(grid=2, max_objects=3), 'data.max_objects'),         # three paths of two cells do not fit on 2x2
    (dict(max_objects=0), 'data.max_objects'),
    (dict(max_move=3), 'data.max_move'),
    (dict(num_test=0), 'data.num_test'),
    (dict(seed=-1), 'data.seed'),
    (dict(num_frames=8.0), 'data.num_frames'),
])
def test_config_errors_name_the_field(fields, match):
  with pytest.raises(ValueError, match=match):
    motion.MotionWorldConfig(**fields)


def test_config_from_and_the_package_dispatch(tmp_path):
  assert 'motion' in data_lib.DATASETS and data_lib._module({'name': 'motion'}) is motion
  c = motion.config_from(make_data(tmp_path, num_frames=5))
  assert c.num_frames == 5 and c.name == 'img32_grid3_frames5_obj1-3_move1_n24-16_seed0'
  with pytest.raises(ValueError, match='data.name'):
    motion.config_from(dict(name='shapes'))
  with pytest.raises(ValueError, match='data.data_dir'):
    motion.prepare(dict(name='motion'))
  with pytest.raises(FileNotFoundError, match='not built'):
    motion.data_source(make_data(tmp_path), 'train')
  with pytest.raises(ValueError, match='split'):
    motion.data_source(make_data(tmp_path), 'validation')


# ------------------------------------------------------------------------------------------------ TFDS build


def test_build_reads_back_as_generate_example(world):
  data, data_dir, tok = world
  assert motion.is_prepared(data) and tok.get_vocab() == motion.make_tokenizer().get_vocab()
  assert motion.prepare(data)[0] == data_dir                          # a second prepare reuses the build
  c = motion.config_from(data)
  for split, n in (('train', 24), ('test', 16)):
    recs = records(data, split)
    assert len(recs) == n
    for i, rec in enumerate(recs):
      assert_example_equal(rec, motion.generate_example(c, split, i))


def test_parsed_source_equals_tfds_decoder_and_names_corrupt_fields(world):
  import tensorflow_datasets as tfds
  from tensorflow_datasets.proto import tf_example_pb2

  data, _, _ = world
  ours = motion.data_source(data, 'test')
  assert isinstance(ours, motion.ParsedSource)
  theirs = tfds.data_source(motion.MotionWorld.name, split='test', data_dir=data['data_dir'], download=False,
                            builder_kwargs={'config': motion.config_from(data), 'file_format': 'array_record'})
  for i in range(len(ours)):
    a, b = ours[i], theirs[i]
    assert a.keys() == b.keys()
    for k in a:
      if isinstance(b[k], np.ndarray):
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].flags.writeable, (i, k)
        np.testing.assert_array_equal(a[k], b[k])
      else:
        assert type(a[k]) is type(b[k]) and a[k] == b[k], (i, k)

  raw = ours._raw
  short = tf_example_pb2.Example.FromString(raw[0])
  short.features.feature['video'].bytes_list.value[0] = b'\0' * (8 * 32 * 32 * 3 - 1)
  without = {}
  for field in ('video', 'caption', 'questions'):
    ex = tf_example_pb2.Example.FromString(raw[0])
    del ex.features.feature[field]
    without[field] = ex.SerializeToString()
  bad = motion.ParsedSource([short.SerializeToString(), raw[0][:40]] + list(without.values()), (8, 32, 32, 3))
  with pytest.raises(ValueError, match=r"field 'video': 24575 bytes, expected \(8, 32, 32, 3\) uint8"):
    bad[0]
  with pytest.raises(Exception, match='DecodeError|[Ee]rror parsing'):
    bad[1]
  for j, field in enumerate(without, start=2):
    with pytest.raises(KeyError, match=field):
      bad[j]


def test_chance_levels_are_the_majority_answer_rates(world):
  data, _, _ = world
  chance = motion.chance_levels(data, 'train')
  answers = collections.defaultdict(list)
  for ex in clips('train', 24):
    for f, a in zip(ex['families'], ex['answers']):
      answers[f].append(a)
  assert set(chance) == {'overall', *motion.FAMILIES}
  for f in motion.FAMILIES:
    assert chance[f] == pytest.approx(collections.Counter(answers[f]).most_common(1)[0][1] / len(answers[f]))
  assert chance['order'] == pytest.approx(0.5)
  hits = sum(collections.Counter(a).most_common(1)[0][1] for a in answers.values())
  assert chance['overall'] == pytest.approx(hits / sum(len(a) for a in answers.values()))


# ------------------------------------------------------------------------------------------------ time


def test_direction_and_order_need_more_than_one_frame():
  acc = temporal_check(clips('train', 300), clips('test', 300))
  assert acc['direction', 'all frames'] == 1.0 and acc['order', 'all frames'] == 1.0
  # One frame says nothing about when events happen (slots are dealt at random, every event done by the end) ...
  for rule in ('first frame', 'last frame'):
    assert abs(acc['order', rule] - 0.5) < 0.08, (rule, acc)
  # ... and little about where an object goes: only that it cannot leave the board.
  for rule in ('first frame', 'last frame'):
    assert acc['direction', rule] < acc['direction', 'chance'] + 0.2, (rule, acc)


def test_the_question_alone_does_not_tell_the_answer():
  """The blind baseline's best: per family, the answer most frequent on the fit clips for the question's wording
  with the object names left out (the verbs of an order question, 'start' / 'end' of a count question)."""
  names = set(shapes.COLORS) | set(shapes.SHAPES)
  wording = lambda q: tuple(w for w in q.split() if w not in names)
  tables, majority = collections.defaultdict(collections.Counter), collections.defaultdict(collections.Counter)
  for ex in clips('train', 600):
    for f, q, a in zip(ex['families'], ex['questions'], ex['answers']):
      tables[f, wording(q)][a] += 1
      majority[f][a] += 1
  hits, chance, total = collections.Counter(), collections.Counter(), collections.Counter()
  for ex in clips('test', 600):
    for f, q, a in zip(ex['families'], ex['questions'], ex['answers']):
      table = tables.get((f, wording(q)), majority[f])
      hits[f] += table.most_common(1)[0][0] == a
      chance[f] += majority[f].most_common(1)[0][0] == a
      total[f] += 1
  for f in motion.FAMILIES:
    assert hits[f] / total[f] <= chance[f] / total[f] + 0.05, (f, hits[f] / total[f], chance[f] / total[f])
