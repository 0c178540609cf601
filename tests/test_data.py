"""Shapes world, tokenizer and grain pipeline: determinism, answers that match the pictures, sequence layout,
process shards, checkpointable iterators (also through orbax), eval batches, and build safety."""
from __future__ import annotations

import collections
import os

import grain
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiment_utils import load_config
from mmproj.data import pipeline, shapes
from mmproj.data import tokenizer as tokenizer_lib

NUM_TRAIN, NUM_TEST, M = 64, 16, 4


def make_cfg(data_dir, **overrides) -> ml_collections.ConfigDict:
  cfg = dict(name='shapes', data_dir=str(data_dir), image_size=48, grid=3, num_train=NUM_TRAIN, num_test=NUM_TEST,
             min_objects=1, max_objects=6, seed=0, text_len=40, caption_prob=0.1, worker_count=0)
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


@pytest.fixture(scope='module')
def world(tmp_path_factory):
  cfg = make_cfg(tmp_path_factory.mktemp('shapes'))
  data_dir, tok = shapes.prepare(cfg)
  return cfg, data_dir, tok


def records(cfg, split):
  source = shapes.data_source(cfg, split)
  return [shapes.decode_record(source[i]) for i in range(len(source))]


def loader(cfg, tok, **kw):
  args = dict(num_image_tokens=M, global_batch_size=8, seed=7, process_index=0, process_count=1)
  args.update(kw)
  return pipeline.train_loader(cfg, tok, **args)


def assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ------------------------------------------------------------------------------------------------ tokenizer


def test_tokenizer_fixed_ids_and_roundtrip(world, tmp_path):
  cfg, data_dir, tok = world
  for i, t in enumerate(['<pad>', '<bos>', '<eos>', '<image>', '<sep>', '<unk>']):
    assert tok.token_to_id(t) == i
  assert tokenizer_lib.vocab_size(tok) == shapes.VOCAB_SIZE <= 64
  words = [tok.id_to_token(i) for i in range(tokenizer_lib.NUM_SPECIAL, shapes.VOCAB_SIZE)]
  assert words == sorted(words) == list(shapes.WORDS)
  assert os.path.exists(os.path.join(data_dir, 'tokenizer.json'))
  tokenizer_lib.save(tok, tmp_path / 'tok.json')
  assert tokenizer_lib.load(tmp_path / 'tok.json').get_vocab() == tok.get_vocab()
  ids = tokenizer_lib.encode(tok, 'is the red circle left of the blue square ?')
  assert pipeline.decode(tok, [1, 3, 3] + ids + [2, 9, 9]) == 'is the red circle left of the blue square ?'
  assert pipeline.decode(tok, [tok.token_to_id('top'), 63, tok.token_to_id('left')]) == 'top <unk> left'
  with pytest.raises(ValueError, match='purple'):
    tokenizer_lib.encode(tok, 'is there a purple circle ?')


# ------------------------------------------------------------------------------------------------ the world


def test_records_deterministic_and_independent_of_build(world, tmp_path):
  cfg, _, _ = world
  # A second build elsewhere, with fewer records: every shared record is identical (no dependence on order/size).
  other = make_cfg(tmp_path, num_train=NUM_TRAIN // 2)
  shapes.prepare(other)
  for split, n in (('train', NUM_TRAIN // 2), ('test', NUM_TEST)):
    a, b = records(cfg, split)[:n], records(other, split)
    assert len(b) == n
    for ra, rb in zip(a, b):
      np.testing.assert_array_equal(ra.pop('image'), rb.pop('image'))
      oa, ob = ra.pop('objects'), rb.pop('objects')
      assert all(np.array_equal(oa[k], ob[k]) for k in shapes.OBJECT_FIELDS)
      assert ra == rb
  # Records are the pure function generate_example(cfg, split, index); train and test differ.
  rec = records(cfg, 'train')[5]
  ex = shapes.generate_example(shapes.config_from(cfg), 'train', 5)
  np.testing.assert_array_equal(rec['image'], ex['image'])
  assert rec['questions'] == ex['questions'] and rec['answers'] == ex['answers'] and rec['index'] == 5
  assert records(cfg, 'test')[0]['caption'] != records(cfg, 'train')[0]['caption']
  assert shapes.config_from(cfg).name != shapes.config_from(other).name


def test_parsed_source_equals_tfds_decoder_on_every_record(world):
  import tensorflow_datasets as tfds
  from tensorflow_datasets.proto import tf_example_pb2

  cfg, _, _ = world
  for split in ('train', 'test'):
    ours = shapes.data_source(cfg, split)
    assert isinstance(ours, shapes.ParsedSource)
    theirs = tfds.data_source(shapes.ShapesWorld.name, split=split, data_dir=cfg.data_dir, download=False,
                              builder_kwargs={'config': shapes.config_from(cfg), 'file_format': 'array_record'})
    assert len(ours) == len(theirs) == (NUM_TRAIN if split == 'train' else NUM_TEST)
    for i in range(len(ours)):
      a, b = ours[i], theirs[i]
      assert a.keys() == b.keys()
      for k in a:
        if isinstance(b[k], np.ndarray):
          assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].flags.writeable, (split, i, k)
          np.testing.assert_array_equal(a[k], b[k])
        else:
          assert type(a[k]) is type(b[k]) and a[k] == b[k], (split, i, k)

  # Faults surface as exceptions naming what is wrong, for the loader's data.bad_records handling.
  raw = shapes.data_source(cfg, 'test')._raw
  ex = tf_example_pb2.Example.FromString(raw[0])
  ex.features.feature['image'].bytes_list.value[0] = b'\0' * 10
  no_caption = tf_example_pb2.Example.FromString(raw[0])
  del no_caption.features.feature['caption']
  bad = shapes.ParsedSource([ex.SerializeToString(), no_caption.SerializeToString(), raw[0][:40]], 48)
  with pytest.raises(ValueError, match=r"field 'image': 10 bytes, expected \(48, 48, 3\) uint8"):
    bad[0]
  with pytest.raises(KeyError, match='caption'):
    bad[1]
  with pytest.raises(Exception, match='DecodeError|[Ee]rror parsing'):
    bad[2]


def _expected_answer(family, question, o, grid):
  """Recomputes an answer from the object annotations alone (independently of the generator)."""
  desc = list(zip([shapes.COLORS[c] for c in o['color']], [shapes.SHAPES[s] for s in o['shape']]))
  w = question.split()
  def find(color, shape):
    hits = [i for i, d in enumerate(desc) if d == (color, shape)]
    assert len(hits) == 1, (question, desc)  # objects are only named when unique
    return hits[0]
  if family == 'existence':  # is there a C S ?
    return 'yes' if (w[3], w[4]) in desc else 'no'
  if family == 'color':  # what color is the S ?
    hits = [c for c, s in desc if s == w[4]]
    assert len(hits) == 1
    return hits[0]
  if family == 'shape':  # what shape is the C object ?
    hits = [s for c, s in desc if c == w[4]]
    assert len(hits) == 1
    return hits[0]
  if family == 'count':  # how many objects are there ? | how many C objects are there ?
    n = len(desc) if w[2] == 'objects' else sum(c == w[2] for c, _ in desc)
    return shapes.NUMBERS[n]
  if family == 'position':  # where is the C S ?
    i = find(w[3], w[4])
    names = {(0, 0): 'top left', (0, 1): 'top', (0, 2): 'top right', (1, 0): 'left', (1, 1): 'center',
             (1, 2): 'right', (2, 0): 'bottom left', (2, 1): 'bottom', (2, 2): 'bottom right'}
    return names[int(o['row'][i]), int(o['col'][i])]
  if family == 'relation':  # is the C S (left of|right of|above|below) the C S ?
    a = find(w[2], w[3])
    rel, rest = (' '.join(w[4:6]), w[7:]) if w[5] == 'of' else (w[4], w[6:])
    b = find(rest[0], rest[1])
    r, c = o['row'], o['col']
    return 'yes' if {'left of': c[a] < c[b], 'right of': c[a] > c[b], 'above': r[a] < r[b],
                     'below': r[a] > r[b]}[rel] else 'no'
  raise AssertionError(family)


def test_answers_match_objects_and_image(world):
  cfg, _, tok = world
  counts, answers = collections.Counter(), collections.defaultdict(collections.Counter)
  cell = cfg.image_size / cfg.grid
  for rec in records(cfg, 'train') + records(cfg, 'test'):
    o, n = rec['objects'], len(rec['objects']['shape'])
    assert cfg.min_objects <= n <= cfg.max_objects
    cells = o['row'] * cfg.grid + o['col']
    assert len(set(cells.tolist())) == n and list(cells) == sorted(cells)  # one object per cell, reading order
    # Each object lies in its cell and its centre pixel has its colour.
    assert ((o['x'] // cell == o['col']) & (o['y'] // cell == o['row'])).all()
    np.testing.assert_array_equal(rec['image'][o['y'], o['x']], shapes.COLOR_RGB[o['color']])
    assert rec['caption'] == ' '.join(f'{shapes.SIZES[z]} {shapes.COLORS[c]} {shapes.SHAPES[s]}'
                                        for s, c, z in zip(o['shape'], o['color'], o['size']))
    for f, q, a in zip(rec['families'], rec['questions'], rec['answers']):
      assert a == _expected_answer(f, q, o, cfg.grid), (q, a)
      counts[f] += 1
      answers[f][a] += 1
      tokenizer_lib.encode(tok, q + ' ' + a)  # closed vocabulary
  assert set(counts) == set(shapes.FAMILIES)
  assert answers['existence']['yes'] == answers['existence']['no']  # one of each per image
  assert answers['relation']['yes'] > 0.3 * counts['relation'] and answers['relation']['no'] > 0.3 * counts['relation']


def test_caption_length_and_position_names():
  six = {k: np.array(v, np.int32) for k, v in dict(shape=[2] * 6, color=[5] * 6, size=[1] * 6).items()}
  assert len(shapes.caption(six).split()) <= 28
  for g in range(1, shapes.MAX_GRID + 1):
    names = [shapes.position_name(r, c, g) for r in range(g) for c in range(g)]
    assert len(set(names)) == g * g and all(w in shapes.WORDS for n in names for w in n.split())
  assert shapes.position_name(1, 1, 3) == 'center' and shapes.position_name(2, 0, 3) == 'bottom left'
  with pytest.raises(ValueError, match='data.grid'):
    shapes.config_from(dict(grid=6, max_objects=6))
  with pytest.raises(ValueError, match='data.max_objects'):
    shapes.config_from(dict(grid=2, max_objects=6))


# ------------------------------------------------------------------------------------------------ training


@pytest.mark.parametrize('num_image_tokens', [M, 0])
def test_train_batch_layout_targets_and_loss_mask(world, num_image_tokens):
  cfg, _, tok = world
  seq_len = num_image_tokens + cfg.text_len
  texts = {t for r in records(cfg, 'train') for t in r['answers'] + [r['caption']]}
  b = next(iter(loader(cfg, tok, num_image_tokens=num_image_tokens, global_batch_size=16)))
  assert b['image'].shape == (16, 48, 48, 3) and b['image'].dtype == np.uint8
  for k in ('tokens', 'positions', 'input_mask', 'targets'):
    assert b[k].shape == (16, seq_len) and b[k].dtype == np.int32, k
  assert b['loss_mask'].dtype == np.float32
  sep_id, eos_id = tokenizer_lib.SEP_ID, tokenizer_lib.EOS_ID
  for tokens, mask, targets, loss, pos in zip(b['tokens'], b['input_mask'], b['targets'], b['loss_mask'],
                                              b['positions']):
    n = int(mask.sum())
    assert (mask[:n] == 1).all() and (tokens[n:] == 0).all()  # right-padded
    assert tokens[0] == tokenizer_lib.BOS_ID and tokens[n - 1] == eos_id
    assert (tokens[1:1 + num_image_tokens] == tokenizer_lib.IMAGE_ID).all()
    assert (tokens == tokenizer_lib.IMAGE_ID).sum() == num_image_tokens
    np.testing.assert_array_equal(targets, np.append(tokens[1:], 0))
    np.testing.assert_array_equal(pos, np.maximum(np.cumsum(mask) - 1, 0))
    sep = int(np.flatnonzero(tokens == sep_id)[0])
    np.testing.assert_array_equal(np.flatnonzero(loss), np.arange(sep, n - 1))  # answer tokens + <eos>
    assert targets[n - 2] == eos_id and loss[n - 2] == 1
    assert pipeline.decode(tok, targets[loss > 0]) in texts
  assert (b['tokens'] == tokenizer_lib.IMAGE_ID).any() == (num_image_tokens > 0)


def test_caption_prob_and_overlong_text_error(world):
  cfg, _, tok = world
  captions = {r['caption'] for r in records(cfg, 'train')}
  b = next(iter(loader(make_cfg(cfg.data_dir, caption_prob=1.0), tok)))
  for tokens in b['tokens']:
    sep = int(np.flatnonzero(tokens == tokenizer_lib.SEP_ID)[0])
    assert pipeline.decode(tok, tokens[1:sep]) == 'caption'
    assert pipeline.decode(tok, tokens[sep + 1:]) in captions
  with pytest.raises(ValueError, match=r"train record \d+, field 'caption' is too long"):
    next(iter(loader(make_cfg(cfg.data_dir, caption_prob=1.0, text_len=8), tok)))
  with pytest.raises(ValueError, match=r"field 'questions\[\d+\]' \+ 'answers\[\d+\]' is too long"):
    next(iter(loader(make_cfg(cfg.data_dir, caption_prob=0.0, text_len=6), tok)))


def _record_ids(cfg, batches):
  by_image = {r['image'].tobytes(): r['index'] for r in records(cfg, 'train')}
  assert len(by_image) == NUM_TRAIN  # images identify records
  return [by_image[im.tobytes()] for b in batches for im in b['image']]


def test_process_shards_disjoint_and_cover(world):
  cfg, _, tok = world
  per_shard = NUM_TRAIN // 2
  shards = []
  for p in range(2):
    it = iter(loader(cfg, tok, global_batch_size=8, process_index=p, process_count=2))
    batches = [next(it) for _ in range(per_shard // 4)]  # one epoch of the shard, 4 rows per process
    assert all(len(b['tokens']) == 4 for b in batches)
    ids = _record_ids(cfg, batches)
    assert len(set(ids)) == per_shard  # no repeats within an epoch
    shards.append(set(ids))
  assert not shards[0] & shards[1] and shards[0] | shards[1] == set(range(NUM_TRAIN))


def test_shuffled_by_seed_and_reshuffled_per_epoch(world):
  cfg, _, tok = world
  def order(seed, n):
    it = iter(loader(cfg, tok, seed=seed))
    return _record_ids(cfg, [next(it) for _ in range(n)])
  a = order(7, 16)  # two epochs of 64
  assert a == order(7, 16) and a[:64] != order(8, 8)
  assert sorted(a[:64]) == sorted(a[64:]) == list(range(NUM_TRAIN)) and a[:64] != a[64:]


def test_iterator_state_restore_gives_same_next_batches(world):
  cfg, _, tok = world
  it = iter(loader(cfg, tok))
  for _ in range(5):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(6)]  # crosses the epoch boundary (8 batches of 8 per epoch)
  restored = iter(loader(cfg, tok))
  restored.set_state(state)
  for want in expected:
    assert_batches_equal(want, next(restored))


def test_iterator_orbax_roundtrip(world, tmp_path):
  cfg, _, tok = world
  it = iter(loader(cfg, tok))
  for _ in range(3):
    next(it)
  options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=True)
  with ocp.CheckpointManager(tmp_path / 'ckpt', options=options) as mngr:
    mngr.save(3, args=ocp.args.Composite(
        state=ocp.args.StandardSave({'w': np.arange(4.0)}),
        data=grain.checkpoint.CheckpointSave(it)))
    expected = next(it)  # advancing while the async save may still run must not change what was saved
    next(it)
    mngr.wait_until_finished()
  with ocp.CheckpointManager(tmp_path / 'ckpt', options=options) as mngr:
    assert mngr.latest_step() == 3
    fresh = iter(loader(cfg, tok))
    out = mngr.restore(3, args=ocp.args.Composite(
        state=ocp.args.StandardRestore({'w': np.zeros(4)}),
        data=grain.checkpoint.CheckpointRestore(fresh)))
  assert out['data'] is fresh  # restored in place
  np.testing.assert_array_equal(out['state']['w'], np.arange(4.0))
  assert_batches_equal(expected, next(fresh))


# ------------------------------------------------------------------------------------------------ eval


def test_qa_eval_batches_cover_every_pair_once(world):
  cfg, _, tok = world
  want = [(q, a, f) for r in records(cfg, 'test') for q, a, f in zip(r['questions'], r['answers'], r['families'])]
  batches = list(pipeline.qa_eval_batches(cfg, tok, num_image_tokens=M, batch_size=32))
  assert len(batches) == -(-len(want) // 32)
  got = []
  for b in batches:
    assert b['tokens'].shape == (32, M + cfg.text_len) and b['valid'].dtype == bool
    assert (b['tokens'][:, -1] == tokenizer_lib.SEP_ID).all()  # every prompt ends at the last column
    for tokens, mask, pos, ans, fam, valid in zip(b['tokens'], b['input_mask'], b['positions'], b['answer'],
                                                  b['family'], b['valid']):
      n = int(mask.sum())
      assert (mask[-n:] == 1).all() and (tokens[:-n] == 0).all()  # left-padded
      np.testing.assert_array_equal(pos, np.maximum(np.cumsum(mask) - 1, 0))
      assert tokens[-n] == tokenizer_lib.BOS_ID and (tokens[-n + 1:-n + 1 + M] == tokenizer_lib.IMAGE_ID).all()
      if valid:
        got.append((pipeline.decode(tok, tokens[-n + 1 + M:-1]), str(ans), str(fam)))
      else:
        assert ans == '' and fam == ''
  assert got == want
  assert batches[-1]['valid'].sum() == len(want) - 32 * (len(batches) - 1)
  first = list(pipeline.qa_eval_batches(cfg, tok, num_image_tokens=0, batch_size=5, max_examples=7))
  assert [b['valid'].tolist() for b in first] == [[True] * 5, [True, True, False, False, False]]
  assert [str(a) for b in first for a in b['answer'][b['valid']]] == [a for _, a, _ in want[:7]]


def test_caption_eval_batches(world):
  cfg, _, tok = world
  batches = list(pipeline.caption_eval_batches(cfg, tok, num_image_tokens=M, batch_size=6))
  assert [int(b['valid'].sum()) for b in batches] == [6, 6, 4]
  caps = [pipeline.decode(tok, b['targets'][i][b['loss_mask'][i] > 0])
          for b in batches for i in np.flatnonzero(b['valid'])]
  assert caps == [r['caption'] for r in records(cfg, 'test')]
  assert (batches[-1]['loss_mask'][~batches[-1]['valid']] == 0).all()


# ------------------------------------------------------------------------------------------------ building


def test_prepare_is_noop_second_time_and_killed_builds_never_read_complete(world, tmp_path, monkeypatch):
  cfg, data_dir, _ = world
  before = sorted(os.listdir(data_dir))
  def explode(self, split, num):
    raise RuntimeError('generator must not run')
  monkeypatch.setattr(shapes.ShapesWorld, '_generate_examples', explode)
  assert shapes.prepare(cfg)[0] == data_dir  # already built: nothing is generated
  assert sorted(os.listdir(data_dir)) == before

  # A build that dies halfway leaves nothing that reads as complete; the next prepare() builds it properly and
  # removes what a SIGKILLed build left behind.
  fresh = make_cfg(tmp_path)
  def dies_halfway(self, split, num):
    for i in range(num // 2):
      yield i, shapes.tfds_example(self.builder_config, split, i)
    raise KeyboardInterrupt('killed')
  monkeypatch.setattr(shapes.ShapesWorld, '_generate_examples', dies_halfway)
  with pytest.raises(KeyboardInterrupt):
    shapes.prepare(fresh)
  assert not shapes.is_prepared(fresh)
  with pytest.raises(FileNotFoundError, match='prepare'):
    shapes.data_source(fresh, 'train')
  stale = shapes.builder(fresh).data_path.parent / f'incomplete.ABC123_{shapes.ShapesWorld.VERSION}'
  stale.mkdir(parents=True)
  (stale / 'shapes_world-train.array_record-00000-of-00001').write_text('junk')
  monkeypatch.undo()
  path, tok = shapes.prepare(fresh)
  assert shapes.is_prepared(fresh) and not stale.exists()
  assert len(shapes.data_source(fresh, 'train')) == NUM_TRAIN and tokenizer_lib.vocab_size(tok) == shapes.VOCAB_SIZE



def test_a_url_data_dir_is_refused_naming_the_field():
  """array_record reads and writes local files only: data.data_dir='gs://...' fails before anything is built (a
  workdir may be a URL; the data dir may not)."""
  cfg = load_config('configs/quickstart.py', 'smoke')
  cfg.data.data_dir = 'gs://bucket/data'
  with pytest.raises(ValueError, match=r"data.data_dir='gs://bucket/data': the data dir must be a local path"):
    shapes.prepare(cfg.data)
