"""Corrupt and malformed data records, by data.bad_records ('error' | 'skip') and data.overflow (over-long text):
undecodable images and unreadable TFDS records at read time, malformed LLaVA JSON entries at build time, eval
batches over a corrupt record. 'error' names the split, record, position and cause; 'skip' puts a row that
trains on nothing in the bad record's place (bad_records = 1) and leaves every other row as a clean run has it."""
from __future__ import annotations

import json
import logging
import os
import shutil
import types

import grain
import ml_collections
import numpy as np
import pytest
from array_record.python import array_record_module

import llava_fixture as fx
from mmproj.data import llava_json, pipeline, sampling, shapes

M, TEXT_LEN, S = 4, 120, 32
SEED, B = 3, 4
N_LLAVA = 12
CORRUPT = {2: '000002', 5: '000005'}  # JSON entry -> id of the records whose image file is corrupt


def records_at(num, positions, seed=SEED):
  """Record index at each stream position (the order train_dataset uses)."""
  order = sampling.record_order(num, seed)
  return [int(order[g]) for g in positions]


def rows_of(batches):
  """Batches -> one dict per row, in stream order."""
  return [{k: v[i] for k, v in b.items()} for b in batches for i in range(len(next(iter(b.values()))))]


def assert_stand_in(row, image_shape):
  assert row['bad_records'] == 1
  for k in ('tokens', 'positions', 'input_mask', 'targets', 'loss_mask'):
    assert not row[k].any(), k
  assert row['image'].shape == image_shape and not row['image'].any()


def assert_rows_equal(got, want):
  assert set(got) - {'bad_records'} == set(want) - {'bad_records'}
  for k in want:
    if k != 'bad_records':
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)


# ------------------------------------------------------------------------------------------------ any source


class Square(grain.transforms.Map):
  def map(self, rec):
    return {'v': np.int32(rec['x']) ** 2}

  def blank_row(self):
    return {'v': np.int32(0)}


class NoBlank(grain.transforms.Map):
  def map(self, rec):
    return {'v': np.int32(rec['x'])}


def test_missing_field_in_any_source():
  source = [{'id': f'r{i}', 'x': i} for i in range(8)]
  del source[3]['x']
  recs = records_at(8, range(8))
  kw = dict(global_batch_size=8, seed=SEED, process_index=0, process_count=1, split='train')
  with pytest.raises(ValueError, match=rf"bad train record 3 \(id 'r3'\) at stream position {recs.index(3)}: "
                                       r"missing field 'x'"):
    next(iter(sampling.train_dataset(source, Square(), **kw)))
  b = next(iter(sampling.train_dataset(source, Square(), bad_records='skip', **kw)))
  assert b['v'].tolist() == [0 if r == 3 else r * r for r in recs]
  assert b['bad_records'].tolist() == [int(r == 3) for r in recs]
  with pytest.raises(ValueError, match=r'data.bad_records=skip: NoBlank has no blank_row\(\)'):
    sampling.train_dataset(source, NoBlank(), bad_records='skip', **kw)


# ------------------------------------------------------------------------------------------------ LLaVA JSON


def llava_cfg(w, **overrides) -> ml_collections.ConfigDict:
  cfg = dict(name='llava_json', json=w.json_path, image_dir=w.image_dir, data_dir=w.data_dir, tokenizer=w.tok_path,
             template='vicuna_v1', text_len=TEXT_LEN, image_size=S, image_aspect='pad', overflow='truncate',
             worker_count=0, bad_records='error')
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


@pytest.fixture(scope='module')
def llava(tmp_path_factory):
  """The fixture's JSON built twice: over its images, and over a copy where two image files are corrupt (a
  truncated PNG and random bytes; the builder stores raw bytes, so they fail when a row is made)."""
  root = tmp_path_factory.mktemp('faults_llava')
  w = types.SimpleNamespace(root=root, tok_path=fx.make_tokenizer(root / 'tok'), data_dir=str(root / 'clean'))
  w.json_path, w.image_dir = fx.make_llava_json(root / 'src', n=N_LLAVA)
  with open(w.json_path) as f:
    w.records = json.load(f)
  bad_dir = str(root / 'bad_images')
  shutil.copytree(w.image_dir, bad_dir)
  png = os.path.join(bad_dir, w.records[2]['image'])
  with open(png, 'rb') as f:
    data = f.read()
  with open(png, 'wb') as f:
    f.write(data[:len(data) // 2])  # a PNG cut in the middle of its pixel data
  with open(os.path.join(bad_dir, w.records[5]['image']), 'wb') as f:
    f.write(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes())
  w.cfg = llava_cfg(w)
  w.bad = lambda **kw: llava_cfg(w, image_dir=bad_dir, data_dir=str(root / 'bad'), **kw)
  _, w.tok = llava_json.prepare(w.cfg)
  llava_json.prepare(w.bad())
  llava_json.prepare(w.bad(bad_records='skip'))  # its own build: a 'skip' build may leave entries out
  return w


def llava_loader(cfg, tok, **kw):
  args = dict(num_image_tokens=M, global_batch_size=B, seed=SEED, process_index=0, process_count=1)
  args.update(kw)
  return llava_json.train_loader(cfg, tok, **args)


def test_corrupt_images_do_not_decode(llava):
  for entry in CORRUPT:
    with open(os.path.join(llava.root, 'bad_images', llava.records[entry]['image']), 'rb') as f:
      with pytest.raises(ValueError, match='cannot decode the image'):
        llava_json.load_image(f.read(), size=S, aspect='pad')


def test_error_names_split_record_position_and_cause(llava):
  positions = range(3 * B)  # one epoch
  first = next(g for g, r in zip(positions, records_at(N_LLAVA, positions)) if r in CORRUPT)
  rid = CORRUPT[records_at(N_LLAVA, [first])[0]]
  it = iter(llava_loader(llava.bad(), llava.tok))
  with pytest.raises(ValueError) as info:
    for _ in range(3):
      next(it)
  assert (f"bad train record {int(rid)} (id '{rid}') at stream position {first}: record '{rid}' "
          f"(entry {int(rid)}), image file '{llava.records[int(rid)]['image']}': cannot decode the image"
          in str(info.value)), str(info.value)
  assert 'data.bad_records=error' in str(info.value)


def test_skip_stands_in_for_bad_rows_and_keeps_the_stream(llava, caplog):
  steps = 6  # two epochs of 12 records
  clean = rows_of([b for b, _ in zip(llava_loader(llava.cfg, llava.tok), range(steps))])
  with caplog.at_level(logging.WARNING, logger='mmproj.data.sampling'):
    batches = [b for b, _ in zip(llava_loader(llava.bad(bad_records='skip'), llava.tok), range(steps))]
  for b in batches:
    assert b['bad_records'].dtype == np.int32 and b['bad_records'].shape == (B,)
  rows = rows_of(batches)
  recs = records_at(N_LLAVA, range(steps * B))
  for row, want, rec in zip(rows, clean, recs):
    if rec in CORRUPT:
      assert_stand_in(row, (S, S, 3))
    else:
      assert row['bad_records'] == 0
      assert_rows_equal(row, want)
  assert sum(int(b['bad_records'].sum()) for b in batches) == 2 * len(CORRUPT)  # each bad record once an epoch
  logged = ' '.join(r.getMessage() for r in caplog.records)
  for rid in CORRUPT.values():
    assert f"skipping bad train record {int(rid)} (id '{rid}')" in logged
  assert 'bad so far in this process' in logged


def test_skip_is_the_same_stream_across_process_counts_and_resumes(llava):
  cfg = llava.bad(bad_records='skip')
  one = [b for b, _ in zip(llava_loader(cfg, llava.tok), range(4))]
  per_process = [[b for b, _ in zip(llava_loader(cfg, llava.tok, process_index=p, process_count=2), range(4))]
                 for p in range(2)]
  for k, want in enumerate(one):
    for key in want:
      np.testing.assert_array_equal(np.concatenate([per_process[0][k][key], per_process[1][k][key]]), want[key])
  it = iter(llava_loader(cfg, llava.tok))
  next(it), next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  restored = iter(llava_loader(cfg, llava.tok))
  restored.set_state(state)
  for want in expected:
    got = next(restored)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_every_record_bad_raises_naming_the_split(llava, tmp_path):
  img = tmp_path / 'img'
  img.mkdir()
  for i in range(3):
    (img / f'{i}.png').write_bytes(b'\x89PNG not really')
  recs = [{'id': f'junk-{i}', 'image': f'{i}.png', 'conversations': llava.records[0]['conversations']}
          for i in range(3)]
  (tmp_path / 'junk.json').write_text(json.dumps(recs))
  cfg = llava_cfg(llava, json=str(tmp_path / 'junk.json'), image_dir=str(img), data_dir=str(tmp_path / 'd'),
                  bad_records='skip')
  llava_json.prepare(cfg)
  it = iter(llava_loader(cfg, llava.tok, global_batch_size=1))
  with pytest.raises(ValueError, match=r'\d+ bad records in a row in the train split \(data.bad_records=skip\)'):
    for _ in range(2 * sampling.MAX_BAD_RUN):
      next(it)


def _malformed_entries(w):
  """(entry, expected build error) for malformed JSON entries."""
  conv = w.records[0]['conversations']
  return [
      ({'id': 'no-conv', 'image': w.records[0]['image']}, r"record 'no-conv' \(entry 1 of .*\): the record has no "
                                                          r'"conversations"'),
      ({'id': 'dir-image', 'image': 'coco', 'conversations': conv},
       r"record 'dir-image' \(entry 1 of .*\): image file .*coco not found \(or not a file\)"),
      ({'id': 'bad-type', 'conversations': [{'from': 'human', 'value': 7}, conv[1]]},
       r"record 'bad-type' \(entry 1 of .*\): conversations\[0\] must be"),
      ('not an object', r'\(entry 1 of .*\): a record must be a JSON object, got str'),
  ]


def test_build_error_names_the_entry_and_field(llava, tmp_path):
  for k, (entry, match) in enumerate(_malformed_entries(llava)):
    path = tmp_path / f'bad{k}.json'
    path.write_text(json.dumps([llava.records[0], entry]))
    cfg = llava_cfg(llava, json=str(path), data_dir=str(tmp_path / f'd{k}'))
    with pytest.raises((ValueError, FileNotFoundError), match=match):
      llava_json.prepare(cfg)
    assert not llava_json.is_prepared(cfg)


def test_build_skip_leaves_malformed_entries_out_and_overflow_decides_long_text(llava, tmp_path, caplog):
  w = llava
  too_long = {'id': 'too-long', 'conversations': [{'from': 'human', 'value': fx.TEXT_ONLY['question']},
                                                  {'from': 'gpt', 'value': ' '.join(['Four.'] * 120)}]}
  entries = w.records[:4] + [e for e, _ in _malformed_entries(w)] + [too_long, w.records[4]]
  path = tmp_path / 'mixed.json'
  path.write_text(json.dumps(entries))
  cfg = llava_cfg(w, json=str(path), data_dir=str(tmp_path / 'd'), bad_records='skip')
  with caplog.at_level(logging.WARNING, logger='mmproj.data.llava_json'):
    llava_json.prepare(cfg)
  assert llava_json.builder(cfg).builder_config.name.endswith('_skipbad')
  assert not llava_json.is_prepared(llava_cfg(w, json=str(path), data_dir=str(tmp_path / 'd')))  # 'error' own build
  src = llava_json.data_source(cfg)
  got = [llava_json.decode_record(src[i]) for i in range(len(src))]
  assert [r['id'] for r in got] == ['000000', '000001', '000002', '000003', 'too-long', '000004']
  assert [r['index'] for r in got] == [0, 1, 2, 3, 8, 9]  # JSON positions
  bad = llava_json.bad_entries(cfg)
  assert bad['count'] == 4 and bad['entries'] == len(entries)
  assert [(b['entry'], b['id']) for b in bad['first']] == [(4, 'no-conv'), (5, 'dir-image'), (6, 'bad-type'),
                                                          (7, None)]
  assert 'no "conversations"' in bad['first'][0]['cause']
  logged = ' '.join(r.getMessage() for r in caplog.records)
  assert all(f'leaving JSON entry {i} out of the data set' in logged for i in (4, 5, 6, 7))
  assert 'left 4 of the 10 entries' in logged

  # Over-long text is data.overflow's: 'skip' leaves it out of the order (not a stand-in), ...
  lengths = llava_json.token_lengths(cfg, w.tok, num_image_tokens=M)
  text_len = int(np.sort(lengths)[-2]) - M  # every record but 'too-long' fits
  assert lengths[4] > M + text_len
  n = 0
  for b, _ in zip(llava_loader(llava_cfg(w, json=str(path), data_dir=str(tmp_path / 'd'), bad_records='skip',
                                         text_len=text_len, overflow='skip'), w.tok, global_batch_size=1), range(5)):
    assert b['bad_records'].tolist() == [0]
    assert 'Four. Four.' not in w.tok.decode(b['tokens'][0].tolist())
    n += 1
  assert n == 5
  # ... and 'error' is an error even with bad_records='skip', naming the record and L.
  it = iter(llava_loader(llava_cfg(w, json=str(path), data_dir=str(tmp_path / 'd'), bad_records='skip',
                                   text_len=text_len, overflow='error'), w.tok, global_batch_size=1))
  with pytest.raises(sampling.Unskippable, match=rf"record 'too-long' is \d+ tokens long > L = {M + text_len}") as e:
    for _ in range(6):
      next(it)
  assert any('stream position' in note for note in e.value.__notes__)


def test_bad_records_value_is_checked(llava):
  with pytest.raises(ValueError, match=r"data.bad_records: 'drop' is not one of \('error', 'skip'\)"):
    llava_json.builder(llava_cfg(llava, bad_records='drop'))


# ------------------------------------------------------------------------------------------------ shapes world

NUM_TRAIN, NUM_TEST = 16, 8
BAD_TRAIN, BAD_TEST = 3, 2  # records whose serialized bytes are cut in half in the corrupt copy


def shapes_cfg(data_dir, **overrides) -> ml_collections.ConfigDict:
  cfg = dict(name='shapes', data_dir=str(data_dir), image_size=48, grid=3, num_train=NUM_TRAIN, num_test=NUM_TEST,
             min_objects=1, max_objects=6, seed=0, text_len=40, caption_prob=0.5, worker_count=0,
             bad_records='error')
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


def _corrupt_record(path, index):
  """Rewrites one array_record file with record `index`'s bytes cut in half (the proto no longer parses)."""
  reader = array_record_module.ArrayRecordReader(path)
  recs = [reader.read([i])[0] for i in range(reader.num_records())]
  reader.close()
  recs[index] = recs[index][:len(recs[index]) // 2]
  writer = array_record_module.ArrayRecordWriter(path, 'group_size:1')  # as TFDS writes them
  for r in recs:
    writer.write(r)
  writer.close()


@pytest.fixture(scope='module')
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp('faults_shapes')
  clean = shapes_cfg(root / 'clean')
  path, tok = shapes.prepare(clean)
  shutil.copytree(root / 'clean', root / 'bad')
  bad_path = path.replace(str(root / 'clean'), str(root / 'bad'))
  for split, index in (('train', BAD_TRAIN), ('test', BAD_TEST)):
    _corrupt_record(os.path.join(bad_path, f'shapes_world-{split}.array_record-00000-of-00001'), index)
  return types.SimpleNamespace(clean=clean, bad=lambda **kw: shapes_cfg(root / 'bad', **kw), tok=tok)


def shapes_loader(cfg, tok, **kw):
  args = dict(num_image_tokens=M, global_batch_size=B, seed=SEED, process_index=0, process_count=1)
  args.update(kw)
  return pipeline.train_loader(cfg, tok, **args)


def test_shapes_unreadable_record_error_and_skip(world):
  positions = range(8 * B)  # two epochs of 16
  recs = records_at(NUM_TRAIN, positions)
  first = recs.index(BAD_TRAIN)
  with pytest.raises(ValueError, match=rf'bad train record {BAD_TRAIN} at stream position {first}: DecodeError'):
    for b, _ in zip(shapes_loader(world.bad(), world.tok), range(8)):
      pass
  clean = rows_of([b for b, _ in zip(shapes_loader(world.clean, world.tok), range(8))])
  batches = [b for b, _ in zip(shapes_loader(world.bad(bad_records='skip'), world.tok), range(8))]
  for row, want, rec in zip(rows_of(batches), clean, recs):
    if rec == BAD_TRAIN:
      assert_stand_in(row, (48, 48, 3))
      assert not row['segment_ids'].any()
    else:
      assert row['bad_records'] == 0
      assert_rows_equal(row, want)
  assert sum(int(b['bad_records'].sum()) for b in batches) == 2


def test_shapes_overlong_text_is_an_error_even_when_skipping(world):
  with pytest.raises(sampling.Unskippable, match=r"train record \d+, field 'caption' is too long: \d+ tokens .* "
                                                 r'> data.text_len=8'):
    next(iter(shapes_loader(world.bad(bad_records='skip', caption_prob=1.0, text_len=8), world.tok)))


def _valid_rows(batches):
  return [r for r in rows_of(batches) if r['valid']]


def test_shapes_eval_skips_or_names_the_bad_record(world, caplog):
  kw = dict(num_image_tokens=M, batch_size=5)
  with pytest.raises(ValueError, match=rf'bad test record {BAD_TEST}: DecodeError'):
    list(pipeline.qa_eval_batches(world.bad(), world.tok, **kw))
  with pytest.raises(ValueError, match=rf'bad test record {BAD_TEST}: DecodeError'):
    list(pipeline.caption_eval_batches(world.bad(), world.tok, **kw))

  src = shapes.data_source(world.clean, 'test')
  pairs = [len(shapes.decode_record(src[i])['questions']) for i in range(NUM_TEST)]
  clean_qa = _valid_rows(pipeline.qa_eval_batches(world.clean, world.tok, **kw))
  with caplog.at_level(logging.WARNING, logger='mmproj.data.pipeline'):
    qa = _valid_rows(pipeline.qa_eval_batches(world.bad(bad_records='skip'), world.tok, **kw))
  start = sum(pairs[:BAD_TEST])
  want = clean_qa[:start] + clean_qa[start + pairs[BAD_TEST]:]
  assert len(qa) == len(want) == sum(pairs) - pairs[BAD_TEST]
  for got, w in zip(qa, want):
    assert_rows_equal(got, w)
  clean_cap = _valid_rows(pipeline.caption_eval_batches(world.clean, world.tok, **kw))
  with caplog.at_level(logging.WARNING, logger='mmproj.data.pipeline'):
    cap = _valid_rows(pipeline.caption_eval_batches(world.bad(bad_records='skip'), world.tok, **kw))
  assert len(cap) == NUM_TEST - 1
  for got, w in zip(cap, clean_cap[:BAD_TEST] + clean_cap[BAD_TEST + 1:]):
    assert_rows_equal(got, w)
  logged = ' '.join(r.getMessage() for r in caplog.records)
  assert f'leaving bad test record {BAD_TEST} out of the eval' in logged
  assert '1 bad records or QA pairs left out of the test eval' in logged and '1 bad records left out' in logged
