"""LLaVA-format data: conversation templates (exact text), loss mask exactly on assistant tokens, image-token
expansion, overflow policies, the TFDS builder (read back, rebuild on a changed JSON, build-time errors), the
grain loader (layout, determinism, shards, checkpointable iterator, read-time errors) and image aspect modes."""
from __future__ import annotations

import json
import logging
import os
import types

import ml_collections
import numpy as np
import pytest
import tokenizers
from PIL import Image

import llava_fixture as fx
from mmproj.data import conversation, llava_json, preprocess

M, TEXT_LEN, S = 4, 120, 32
SYSTEM = conversation.VICUNA_SYSTEM


def make_cfg(w, **overrides) -> ml_collections.ConfigDict:
  cfg = dict(name='llava_json', json=w.json_path, image_dir=w.image_dir, data_dir=w.data_dir, tokenizer=w.tok_path,
             template='vicuna_v1', text_len=TEXT_LEN, image_size=S, image_aspect='pad', overflow='truncate',
             worker_count=0)
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


@pytest.fixture(scope='module')
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp('llava')
  w = types.SimpleNamespace(tok_path=fx.make_tokenizer(root / 'tok'), data_dir=str(root / 'data'), root=root)
  w.json_path, w.image_dir = fx.make_llava_json(root / 'src', n=16)
  with open(w.json_path) as f:
    w.records = json.load(f)
  w.cfg = make_cfg(w)
  w.path, w.tok = llava_json.prepare(w.cfg)
  w.special = llava_json.special_tokens(w.cfg, w.tok)
  return w


def loader(cfg, tok, **kw):
  args = dict(num_image_tokens=M, global_batch_size=4, seed=3, process_index=0, process_count=1)
  args.update(kw)
  return llava_json.train_loader(cfg, tok, **args)


def turns(*pairs):
  return [r for r, _ in pairs], [v for _, v in pairs]


def runs(mask):
  """[(start, end)] of the runs of nonzero entries."""
  m = np.concatenate([[0], (np.asarray(mask) > 0).astype(int), [0]])
  d = np.flatnonzero(np.diff(m))
  return list(zip(d[::2], d[1::2]))


# ------------------------------------------------------------------------------------------------ templates


def test_plain_template_text():
  roles, values = turns(('human', 'Describe the image briefly.\n<image>'), ('gpt', 'A red circle.'))
  segs = conversation.segments('plain', roles, values)
  assert segs == [('<image>', False), ('A red circle.\n', True)]
  assert conversation.render(segs) == '<image>A red circle.\n'
  assert conversation.segments('plain', roles[:2], ['Hi', 'A cat.'], has_image=False) == [('A cat.\n', True)]
  assert conversation.prompt_text('plain', 'ignored') == '<image>'


def test_vicuna_v1_template_text():
  roles, values = turns(('human', 'What is it?\n<image>'), ('gpt', 'A cat.'), ('human', 'Color?'),
                        ('gpt', 'Black.'))
  segs = conversation.segments('vicuna_v1', roles, values)
  assert conversation.render(segs) == (
      "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
      "detailed, and polite answers to the human's questions. USER: <image>\nWhat is it? ASSISTANT: A cat.</s>"
      "USER: Color? ASSISTANT: Black.</s>")
  assert [t for t, target in segs if target] == [' A cat.</s>', ' Black.</s>']
  # Text-only records: no tag; a leading assistant turn is dropped (as LLaVA); user/assistant aliases; eos string
  # follows the tokenizer.
  roles, values = turns(('gpt', 'ignored'), ('user', 'Hi?'), ('assistant', 'Hello.'))
  assert conversation.render(conversation.segments('vicuna_v1', roles, values, has_image=False,
                                                   eos_token='<|end|>')) == (
      SYSTEM + ' USER: Hi? ASSISTANT: Hello.<|end|>')
  # The tag is moved to the start of the first human turn (and added when the text has none).
  assert conversation.rounds(['human', 'gpt'], ['Look: <image> here', 'ok'])[0][0] == '<image>\nLook:  here'
  assert conversation.rounds(['human', 'gpt'], ['Look.', 'ok'])[0][0] == '<image>\nLook.'
  assert conversation.prompt_text('vicuna_v1', 'What is it?') == SYSTEM + ' USER: <image>\nWhat is it? ASSISTANT:'
  assert conversation.prompt_text('vicuna_v1', 'Hi?', has_image=False) == SYSTEM + ' USER: Hi? ASSISTANT:'


@pytest.mark.parametrize('roles, values, match', [
    (['human', 'bot'], ['a', 'b'], "record 'r7': turn 1 has role 'bot'"),
    (['human', 'human', 'gpt'], ['a', 'b', 'c'], "record 'r7': turn 1 is 'human'"),
    (['human', 'gpt', 'human'], ['a', 'b', 'c'], "record 'r7': the conversation must end with a gpt turn"),
    (['human', 'gpt'], ['<image>\na', 'b'], "record 'r7': turn 0 has '<image>' but the record has no image"),
    ([], [], "record 'r7': empty conversations"),
])
def test_malformed_conversations_name_the_record(roles, values, match):
  with pytest.raises(ValueError, match=match):
    conversation.segments('vicuna_v1', roles, values, record_id='r7', has_image=False)


# ------------------------------------------------------------------------------------------------ tokenization


def _row(w, rec, template='vicuna_v1', num_image_tokens=M, text_len=TEXT_LEN, overflow='truncate'):
  has_image = 'image' in rec
  segs = conversation.segments(template, [t['from'] for t in rec['conversations']],
                               [t['value'] for t in rec['conversations']], record_id=rec['id'],
                               has_image=has_image)
  return conversation.tokenize(w.tok, segs, w.special, num_image_tokens=num_image_tokens, text_len=text_len,
                               overflow=overflow, record_id=rec['id'])


@pytest.mark.parametrize('template', ['vicuna_v1', 'plain'])
def test_rows_loss_mask_exactly_on_assistant_tokens(world, template):
  w = world
  seq_len = M + TEXT_LEN
  for rec in w.records:
    row = _row(w, rec, template)
    tokens, mask = row['tokens'], row['input_mask']
    for k in ('tokens', 'positions', 'input_mask', 'targets'):
      assert row[k].shape == (seq_len,) and row[k].dtype == np.int32, k
    assert row['loss_mask'].dtype == np.float32
    n = int(mask.sum())
    assert (mask[:n] == 1).all() and (tokens[n:] == conversation.PAD_ID).all()
    assert tokens[0] == fx.BOS_ID
    np.testing.assert_array_equal(row['targets'], np.append(tokens[1:], 0))
    np.testing.assert_array_equal(row['positions'], np.maximum(np.cumsum(mask) - 1, 0))
    assert not (tokens == fx.UNK_ID)[:n].any()
    image = np.flatnonzero(tokens == fx.IMAGE_TOKEN_ID)
    want = M if 'image' in rec else 0
    assert len(image) == want and (np.diff(image) == 1).all()  # one contiguous block of M image tokens
    gpt = [t['value'] for t in rec['conversations'] if t['from'] == 'gpt']
    want_texts = [gpt[0] + '\n'] if template == 'plain' else [g + '</s>' for g in gpt]
    got = [w.tok.decode(row['targets'][a:b].tolist(), skip_special_tokens=False) for a, b in runs(row['loss_mask'])]
    assert got == want_texts, rec['id']
    assert row['loss_mask'][n - 1:].sum() == 0


def test_each_segment_is_tokenized_on_its_own(world):
  w = world
  rec = w.records[1]  # multi-turn with an image
  segs = conversation.segments('vicuna_v1', [t['from'] for t in rec['conversations']],
                               [t['value'] for t in rec['conversations']])
  ids, is_target, image_end = conversation.encode_segments(w.tok, segs, w.special, num_image_tokens=3)
  want = [fx.BOS_ID]
  for text, _ in segs:
    for piece in text.replace('</s>', '\0</s>\0').replace('<image>', '\0<image>\0').split('\0'):
      want += ([fx.IMAGE_TOKEN_ID] * 3 if piece == '<image>' else
               w.tok.encode(piece, add_special_tokens=False).ids if piece else [])
  assert ids == want and len(is_target) == len(ids)
  assert ids[image_end - 3:image_end] == [fx.IMAGE_TOKEN_ID] * 3


def test_image_token_named_differently_in_the_tokenizer(world):
  w = world
  tok = tokenizers.Tokenizer.from_str(w.tok.to_str())
  tok.add_special_tokens([tokenizers.AddedToken('<img>', special=True, normalized=False)])
  special = conversation.SpecialTokens.from_tokenizer(tok, image_token='<img>')
  rec = w.records[1]
  segs = conversation.segments('vicuna_v1', [t['from'] for t in rec['conversations']],
                               [t['value'] for t in rec['conversations']], image_token='<img>')
  assert '<image>' not in conversation.render(segs) and conversation.render(segs).count('<img>\n') == 1
  row = conversation.tokenize(tok, segs, special, num_image_tokens=M, text_len=TEXT_LEN)
  assert (row['tokens'] == tok.token_to_id('<img>')).sum() == M and not (row['tokens'] == fx.IMAGE_TOKEN_ID).any()


def test_overflow_policies(world):
  w = world
  rec = max(w.records, key=lambda r: len(r['conversations']))
  full = _row(w, rec, text_len=200)
  n = int(full['input_mask'].sum())
  text_len = n - M - 10  # 10 tokens too long
  with pytest.raises(ValueError, match=rf"record '{rec['id']}' is {n} tokens long > L = {n - 10}"):
    _row(w, rec, text_len=text_len, overflow='error')
  assert _row(w, rec, text_len=text_len, overflow='skip') is None
  cut = _row(w, rec, text_len=text_len, overflow='truncate')
  seq_len = n - 10
  assert cut['input_mask'].sum() == seq_len
  np.testing.assert_array_equal(cut['tokens'], full['tokens'][:seq_len])
  np.testing.assert_array_equal(cut['loss_mask'][:-1], full['loss_mask'][:seq_len - 1])
  assert cut['loss_mask'][-1] == 0 and cut['targets'][-1] == 0
  # The system prompt comes before the image: a length that cuts into the image block is an error.
  with pytest.raises(ValueError, match=rf"record '{rec['id']}': its image block ends at token \d+ > L = 24"):
    _row(w, rec, text_len=20, overflow='truncate')


# ------------------------------------------------------------------------------------------------ builder


def test_builder_reads_back_the_records(world):
  w = world
  src = llava_json.data_source(w.cfg)
  assert len(src) == len(w.records)
  assert os.path.basename(os.path.dirname(w.path)) == f'llava_{llava_json.json_hash(w.json_path)[:16]}'
  for i, want in enumerate(w.records):
    got = llava_json.decode_record(src[i])
    assert got['index'] == i and got['id'] == want['id']
    assert got['roles'] == [t['from'] for t in want['conversations']]
    assert got['values'] == [t['value'] for t in want['conversations']]
    assert got['has_image'] == ('image' in want)
    if 'image' in want:
      with open(os.path.join(w.image_dir, want['image']), 'rb') as f:
        assert got['image'] == f.read() and got['image_path'] == want['image']
    else:
      assert got['image'] == b'' and got['image_path'] == ''
  assert sum(not r['has_image'] for r in map(llava_json.decode_record, (src[i] for i in range(len(src))))) == 1


def test_prepare_is_noop_when_built_and_rebuilds_on_changed_json(world, tmp_path, monkeypatch):
  w = world
  def explode(self):
    raise RuntimeError('generator must not run')
  monkeypatch.setattr(llava_json.LlavaJson, '_generate_examples', explode)
  assert llava_json.prepare(w.cfg)[0] == w.path
  monkeypatch.undo()
  records = w.records[:5]
  records[0] = {**records[0], 'id': 'edited'}
  edited = tmp_path / 'llava.json'
  edited.write_text(json.dumps(records))
  cfg = make_cfg(w, json=str(edited))
  path, _ = llava_json.prepare(cfg)
  assert path != w.path and os.path.dirname(os.path.dirname(path)) == os.path.dirname(os.path.dirname(w.path))
  assert llava_json.decode_record(llava_json.data_source(cfg)[0])['id'] == 'edited'
  assert len(llava_json.data_source(w.cfg)) == len(w.records)  # the old build is untouched


def _write_json(tmp_path, records):
  path = tmp_path / 'bad.json'
  path.write_text(json.dumps(records))
  return str(path)


def test_build_errors_name_the_record_and_file(world, tmp_path):
  w = world
  good = w.records[0]
  missing = {'id': 'lost-1', 'image': 'nowhere/x.png', 'conversations': good['conversations']}
  cfg = make_cfg(w, json=_write_json(tmp_path, [good, missing]), data_dir=str(tmp_path / 'd1'))
  with pytest.raises(FileNotFoundError, match=r"record 'lost-1' \(entry 1 of .*bad.json\): image file "
                                              r".*nowhere/x.png not found"):
    llava_json.prepare(cfg)
  assert not llava_json.is_prepared(cfg)
  cfg = make_cfg(w, json=_write_json(tmp_path, [{'id': 'empty-2', 'image': good['image']}]),
                 data_dir=str(tmp_path / 'd2'))
  with pytest.raises(ValueError, match=r"record 'empty-2' \(entry 0 of .*\): the record has no \"conversations\""):
    llava_json.prepare(cfg)
  bad_roles = {'id': 'odd-3', 'conversations': [{'from': 'human', 'value': 'a'}, {'from': 'human', 'value': 'b'}]}
  cfg = make_cfg(w, json=_write_json(tmp_path, [bad_roles]), data_dir=str(tmp_path / 'd3'))
  with pytest.raises(ValueError, match=r"record 'odd-3' \(entry 0 .*\): turn 1 is 'human'"):
    llava_json.prepare(cfg)


@pytest.mark.parametrize('field, value', [('image_token', '<img>'), ('bos_token', '<bos>'),
                                          ('eos_token', '<|eot|>')])
def test_missing_tokenizer_token_names_the_field(world, field, value):
  with pytest.raises(ValueError, match=rf"data.{field}: the tokenizer has no token '{value}'"):
    llava_json.prepare(make_cfg(world, **{field: value}))


def test_config_errors_name_the_field(world):
  w = world
  with pytest.raises(ValueError, match='data.name'):
    llava_json.prepare(make_cfg(w, name='shapes'))
  with pytest.raises(FileNotFoundError, match='data.tokenizer'):
    llava_json.prepare(make_cfg(w, tokenizer=str(w.root)))
  for field, value in (('template', 'chatml'), ('overflow', 'wrap'), ('image_aspect', 'fit'), ('text_len', 0)):
    with pytest.raises(ValueError, match=f'data.{field}'):
      loader(make_cfg(w, **{field: value}), w.tok)


# ------------------------------------------------------------------------------------------------ loader


def assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _image(w, rec):
  if 'image' not in rec:
    return np.zeros((S, S, 3), np.uint8)
  with open(os.path.join(w.image_dir, rec['image']), 'rb') as f:
    return llava_json.load_image(f.read(), size=S, aspect='pad')


def test_loader_batch_layout_and_determinism(world):
  w = world
  it = iter(loader(w.cfg, w.tok))
  batches = [next(it) for _ in range(4)]  # one epoch of 16
  for b in batches:
    assert b.keys() == {'image', 'tokens', 'positions', 'input_mask', 'targets', 'loss_mask'}
    assert b['image'].shape == (4, S, S, 3) and b['image'].dtype == np.uint8
    for k in ('tokens', 'positions', 'input_mask', 'targets'):
      assert b[k].shape == (4, M + TEXT_LEN) and b[k].dtype == np.int32, k
    assert b['loss_mask'].shape == (4, M + TEXT_LEN) and b['loss_mask'].dtype == np.float32
  rows = {r['id']: {**_row(w, r), 'image': _image(w, r)} for r in w.records}
  seen = []
  for b in batches:
    for i in range(4):
      match = [rid for rid, row in rows.items() if all((row[k] == b[k][i]).all() for k in row)]
      assert len(match) == 1
      seen.append(match[0])
      has_image = (b['tokens'][i] == fx.IMAGE_TOKEN_ID).sum() == M
      assert has_image == bool(b['image'][i].any())  # text-only rows: zero image, no image tokens
  assert sorted(seen) == sorted(rows)  # every record once per epoch
  again = iter(loader(w.cfg, w.tok))
  for want in batches:
    assert_batches_equal(want, next(again))
  other = next(iter(loader(w.cfg, w.tok, seed=4)))
  assert not np.array_equal(other['tokens'], batches[0]['tokens'])


def test_loader_process_shards_are_disjoint(world):
  w = world
  ids = []
  for p in range(2):
    it = iter(loader(w.cfg, w.tok, global_batch_size=4, process_index=p, process_count=2))
    batches = [next(it) for _ in range(4)]  # one epoch of 8 records
    ids.append({b['tokens'][i].tobytes() + b['image'][i].tobytes() for b in batches for i in range(2)})
    assert len(ids[-1]) == 8
  assert not ids[0] & ids[1]


def test_iterator_state_restore_gives_same_next_batches(world):
  w = world
  it = iter(loader(w.cfg, w.tok))
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]  # crosses the epoch boundary (4 batches per epoch)
  restored = iter(loader(w.cfg, w.tok))
  restored.set_state(state)
  for want in expected:
    assert_batches_equal(want, next(restored))


def test_loader_skip_drops_and_logs_overlong_records(world, caplog):
  w = world
  lengths = llava_json.token_lengths(w.cfg, w.tok, num_image_tokens=M)
  text_len = int(np.sort(lengths)[-4]) - M - 1  # the 4 longest records do not fit (the text-only one does)
  cfg = make_cfg(w, text_len=text_len, overflow='skip')
  long_ids = {w.records[i]['id'] for i in np.flatnonzero(lengths > M + text_len)}
  assert len(long_ids) >= 4
  kept = {r['id']: {**_row(w, r, text_len=text_len), 'image': _image(w, r)} for r in w.records
          if r['id'] not in long_ids}
  with caplog.at_level(logging.WARNING, logger='mmproj.data.llava_json'):
    it = iter(loader(cfg, w.tok, global_batch_size=2))
    batches = [next(it) for _ in range(len(kept) // 2 + 2)]  # one epoch of kept rows, then some of the next
  rows = [{k: v[i] for k, v in b.items()} for b in batches for i in range(2)][:len(kept)]
  seen = sorted(rid for row in rows for rid, want in kept.items() if all((row[k] == want[k]).all() for k in want))
  assert seen == sorted(kept)
  logged = ' '.join(r.getMessage() for r in caplog.records)
  assert all(f"skipping record '{rid}'" in logged for rid in long_ids)
  # Skipping keeps the iterator checkpointable.
  it = iter(loader(cfg, w.tok, global_batch_size=2))
  for _ in range(5):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(4)]
  restored = iter(loader(cfg, w.tok, global_batch_size=2))
  restored.set_state(state)
  for want in expected:
    assert_batches_equal(want, next(restored))
  with pytest.raises(ValueError, match=r"record '\d+' is \d+ tokens long"):
    it = iter(loader(make_cfg(w, text_len=text_len, overflow='error'), w.tok, global_batch_size=16))
    next(it)


def test_undecodable_image_fails_at_read_time_naming_the_record(world, tmp_path):
  w = world
  (tmp_path / 'img').mkdir()
  (tmp_path / 'img' / 'junk.png').write_bytes(b'not a png at all')
  records = [{'id': 'junk-9', 'image': 'junk.png', 'conversations': w.records[0]['conversations']}]
  cfg = make_cfg(w, json=_write_json(tmp_path, records), image_dir=str(tmp_path / 'img'),
                 data_dir=str(tmp_path / 'd'))
  llava_json.prepare(cfg)  # builds: images are not decoded at build time
  with pytest.raises(ValueError, match=r"record 'junk-9' \(entry 0\), image file 'junk.png': cannot decode"):
    next(iter(loader(cfg, w.tok, global_batch_size=1)))


# ------------------------------------------------------------------------------------------------ images


def _png(img):
  import io
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format='PNG')
  return buf.getvalue()


def test_image_aspect_modes():
  rng = np.random.default_rng(0)
  wide = rng.integers(0, 256, (20, 50, 3), dtype=np.uint8)  # [H, W, 3]
  data = _png(wide)
  out = {a: llava_json.load_image(data, size=S, aspect=a) for a in llava_json.ASPECTS}
  for a, img in out.items():
    assert img.shape == (S, S, 3) and img.dtype == np.uint8, a
  pil = Image.fromarray(wide)
  np.testing.assert_array_equal(out['resize'], np.asarray(pil.resize((S, S), Image.BICUBIC)))
  w80 = int(S * 50 / 20)  # CLIP: shortest edge -> S, then center crop
  left = (w80 - S) // 2
  np.testing.assert_array_equal(out['crop'], np.asarray(pil.resize((w80, S), Image.BICUBIC))[:, left:left + S])
  color = tuple(int(m * 255) for m in preprocess.OPENAI_CLIP_MEAN)
  assert color == (122, 116, 104)  # LLaVA's expand2square colour truncates
  square = Image.new('RGB', (50, 50), color)
  square.paste(pil, (0, 15))
  np.testing.assert_array_equal(out['pad'], np.asarray(square.resize((S, S), Image.BICUBIC)))
  assert tuple(out['pad'][0, 0]) == color and tuple(out['pad'][-1, -1]) == color
  # Decoded arrays (inference) go through the same steps; grayscale and RGBA become RGB.
  for a in llava_json.ASPECTS:
    np.testing.assert_array_equal(llava_json.resize_image(wide, size=S, aspect=a), out[a])
  gray = rng.integers(0, 256, (30, 40), dtype=np.uint8)
  assert llava_json.load_image(_png(gray), size=S, aspect='pad').shape == (S, S, 3)
  np.testing.assert_array_equal(llava_json.resize_image(gray[..., None], size=S, aspect='crop'),
                                llava_json.resize_image(np.repeat(gray[..., None], 3, -1), size=S, aspect='crop'))
  rgba = np.concatenate([wide, np.zeros_like(wide[..., :1])], -1)  # alpha dropped, as LLaVA's convert('RGB')
  np.testing.assert_array_equal(llava_json.resize_image(rgba, size=S, aspect='pad'), out['pad'])


def test_resize_and_crop_is_process_one_without_normalisation():
  img = np.random.default_rng(1).integers(0, 256, (37, 53, 3), dtype=np.uint8)
  for proc in (preprocess.ImageProcessor.clip(size=24, crop_size=(24, 24)), preprocess.ImageProcessor.siglip()):
    u8 = proc.resize_and_crop(img)
    assert u8.dtype == np.uint8
    ref = proc.process_one(img)
    mean, std = np.asarray(proc.image_mean, np.float32), np.asarray(proc.image_std, np.float32)
    np.testing.assert_array_equal(((u8.astype(np.float64) * proc.rescale_factor).astype(np.float32) - mean) / std,
                                  ref)


def test_fixture_tokenizer(world):
  w = world
  assert fx.vocab_size(w.tok_path) <= fx.MAX_VOCAB_SIZE
  assert fx.image_token_id(w.tok_path) == fx.IMAGE_TOKEN_ID == 3
  assert [w.tok.token_to_id(t) for t in fx.SPECIAL_TOKENS] == list(range(5))
  ids = w.tok.encode('<image>\nWhat color is the circle?', add_special_tokens=False).ids
  assert ids[0] == fx.IMAGE_TOKEN_ID and fx.UNK_ID not in ids
  assert w.tok.encode('<image>\nWhat color is the circle?').ids == [fx.BOS_ID] + ids  # Llama-like <s>
