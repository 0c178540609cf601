"""mmproj.load + mmproj.generate on an mmproj workdir: prompts in the training layout, batching, errors."""
from __future__ import annotations

import numpy as np
import pytest

import mmproj
from mmproj.data import pipeline, shapes
from mmproj.eval.generate import generate_tokens


@pytest.fixture(scope='module')
def bundle(trained_workdir):
  return mmproj.load(trained_workdir)


def _test_questions(bundle, n):
  source = shapes.data_source(bundle.config.data, 'test')
  images, questions = [], []
  for i in range(len(source)):
    rec = shapes.decode_record(source[i])
    for q in rec['questions']:
      images.append(rec['image'])
      questions.append(str(q))
    if len(questions) >= n:
      return images[:n], questions[:n]
  return images, questions


def test_generate_equals_the_eval_decoding(bundle):
  """mmproj.generate on raw question strings gives the ids the VQA evaluation decodes from its own prompt rows."""
  images, questions = _test_questions(bundle, 5)
  texts, ids = mmproj.generate(bundle, images, questions, max_new_tokens=6, return_ids=True)
  rows = [pipeline.prompt_row(bundle.tokenizer, q, num_image_tokens=bundle.num_image_tokens,
                              text_len=int(bundle.config.data.text_len)) for q in questions]
  batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  batch['image'] = np.stack(images)
  want = np.asarray(generate_tokens(bundle.model, bundle.params, batch, max_new_tokens=6, eos_id=2))
  np.testing.assert_array_equal(ids, want)
  assert texts == [pipeline.decode(bundle.tokenizer, row) for row in want]
  # The <image> marker at the start is the layout the model trained on; without one the image goes first too.
  assert mmproj.generate(bundle, images, ['<image> ' + q for q in questions], max_new_tokens=6) == texts
  # One prompt alone decodes the same as inside the batch (left padding is neutral).
  assert mmproj.generate(bundle, images[2:3], questions[2:3], max_new_tokens=6) == texts[2:3]


def test_sampling_is_reproducible_per_seed(bundle):
  images, questions = _test_questions(bundle, 4)
  a = mmproj.generate(bundle, images, questions, max_new_tokens=6, temperature=2.0, seed=1, return_ids=True)[1]
  b = mmproj.generate(bundle, images, questions, max_new_tokens=6, temperature=2.0, seed=1, return_ids=True)[1]
  c = mmproj.generate(bundle, images, questions, max_new_tokens=6, temperature=2.0, seed=2, return_ids=True)[1]
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_bad_inputs_are_named(bundle):
  images, questions = _test_questions(bundle, 2)
  with pytest.raises(ValueError, match='2 prompts need 2 images, got 1'):
    mmproj.generate(bundle, images[:1], questions)
  with pytest.raises(ValueError, match=r'images\[0\] is 20x20'):
    mmproj.generate(bundle, [np.zeros((20, 20, 3), np.uint8)], questions[:1])
  with pytest.raises(ValueError, match=r"prompts\[0\].*'zebra'"):
    mmproj.generate(bundle, images[:1], ['what color is the zebra ?'])
  with pytest.raises(ValueError, match='one image per prompt'):
    mmproj.generate(bundle, images[:1], ['<image> <image> what color is the circle ?'])
  with pytest.raises(FileNotFoundError, match='does not exist'):
    mmproj.load(bundle.path + '-missing')
