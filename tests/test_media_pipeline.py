"""The grain pipeline reads every procedural world: training rows and eval batches carry the world's media under
its key (audio float32 [B, S] for tones, video uint8 [B, F, H, W, 3] for motion), next to the same text layout."""
import numpy as np
import pytest

import mmproj.data
from mmproj.data import pipeline

WORLDS = {
    'tones': dict(name='tones', num_train=16, num_test=8, clip_seconds=1.0, max_events=2, text_len=40),
    'motion': dict(name='motion', num_train=16, num_test=8, num_frames=4, image_size=32, text_len=40),
}
EXPECTED = {'tones': ('audio', (16_000,), np.float32), 'motion': ('video', (4, 32, 32, 3), np.uint8)}


@pytest.fixture(scope='module', params=sorted(WORLDS))
def world(request, tmp_path_factory):
  cfg = dict(WORLDS[request.param], data_dir=str(tmp_path_factory.mktemp(request.param)))
  _, tok = mmproj.data.prepare(cfg)
  return request.param, cfg, tok


def test_training_rows_carry_the_worlds_media(world):
  name, cfg, tok = world
  key, shape, dtype = EXPECTED[name]
  assert pipeline.media_spec(cfg) == (key, shape, dtype)
  loader = mmproj.data.train_loader(cfg, tok, num_image_tokens=5, global_batch_size=4, seed=0, process_index=0,
                                    process_count=1)
  batch = next(iter(loader))
  assert batch[key].shape == (4,) + shape and batch[key].dtype == dtype
  assert 'image' not in batch and batch['tokens'].shape == (4, 5 + 40)
  assert np.any(batch[key] != 0)                                         # real media, not the blank stand-in
  assert np.all(batch['tokens'][:, 1:6] == mmproj.data.tokenizer.IMAGE_ID)


def test_eval_batches_carry_the_worlds_media_and_answers(world):
  name, cfg, tok = world
  key, shape, dtype = EXPECTED[name]
  source = mmproj.data.world(cfg).data_source(cfg, 'test')
  first = mmproj.data.world(cfg).decode_record(source[0])
  qa = next(pipeline.qa_eval_batches(cfg, tok, num_image_tokens=5, batch_size=3))
  assert qa[key].shape == (3,) + shape and qa[key].dtype == dtype
  np.testing.assert_array_equal(qa[key][0], first[key])
  assert str(qa['answer'][0]) == first['answers'][0] and str(qa['family'][0]) == first['families'][0]
  cap = next(pipeline.caption_eval_batches(cfg, tok, num_image_tokens=5, batch_size=3))
  assert cap[key].shape == (3,) + shape and cap['loss_mask'].sum() > 0


def test_a_bad_record_stands_in_as_silence_or_black_frames(world):
  name, cfg, tok = world
  key, shape, dtype = EXPECTED[name]
  row = pipeline.SampleText(tok, 5, 40, 0.5, media=pipeline.media_spec(cfg)).blank_row()
  assert row[key].shape == shape and row[key].dtype == dtype and not row[key].any()
  assert not row['loss_mask'].any()


def test_a_non_world_dataset_is_refused_by_name():
  with pytest.raises(ValueError, match="data.name 'llava_json' is not a procedural world"):
    mmproj.data.world(dict(name='llava_json'))
