"""mmproj.data.preprocess against transformers' PIL image processors (CLIPImageProcessorPil /
SiglipImageProcessorPil, the classic slow CLIPImageProcessor / SiglipImageProcessor)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from mmproj.data.preprocess import ImageProcessor

transformers = pytest.importorskip('transformers')
from transformers import CLIPImageProcessorPil, SiglipImageProcessorPil  # noqa: E402

SIZES = [(37, 53), (64, 31), (224, 300)]
ATOL = 1e-5


def _images(sizes, channels=3, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, (h, w, channels), dtype=np.uint8) for h, w in sizes]


def _hf(proc, images) -> np.ndarray:
  out = proc(images, return_tensors='np')['pixel_values']
  return np.transpose(out, (0, 2, 3, 1))


def _check(ours: ImageProcessor, hf, images):
  got = ours(images)
  want = _hf(hf, images)
  assert got.dtype == np.float32
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)
  return got


CLIP_CONFIGS = {
    'clip_se32_crop30': dict(size={'shortest_edge': 32}, crop_size={'height': 30, 'width': 30}),
    'clip_crop_bigger_than_resize': dict(size={'shortest_edge': 20}, crop_size={'height': 24, 'width': 22}),
    'clip_rect_crop': dict(size={'shortest_edge': 29}, crop_size={'height': 27, 'width': 17}),
    'clip_no_rescale': dict(size={'shortest_edge': 32}, crop_size={'height': 30, 'width': 30}, do_rescale=False),
    'clip_no_normalize': dict(size={'shortest_edge': 32}, crop_size={'height': 30, 'width': 30},
                              do_normalize=False, resample=2),
}


@pytest.mark.parametrize('name', sorted(CLIP_CONFIGS))
def test_clip_matches_hf(name):
  kw = CLIP_CONFIGS[name]
  hf = CLIPImageProcessorPil(**kw)
  ours = ImageProcessor.from_hf_config(hf.to_dict())
  _check(ours, hf, _images(SIZES))


def test_clip_default_224():
  hf = CLIPImageProcessorPil()
  ours = ImageProcessor.from_hf_config({'image_processor_type': 'CLIPImageProcessor'})
  assert ours == ImageProcessor()
  got = _check(ours, hf, _images([(250, 231)]))
  assert got.shape == (1, 224, 224, 3)


def test_clip_no_center_crop_matches_hf():
  """Without the crop the output keeps the aspect ratio (long edge = int(size * long / short)): one at a time."""
  hf = CLIPImageProcessorPil(size={'shortest_edge': 32}, do_center_crop=False)
  ours = ImageProcessor.from_hf_config(hf.to_dict())
  for image in _images(SIZES):
    got = _check(ours, hf, [image])
    h, w = image.shape[:2]
    assert min(got.shape[1:3]) == 32
    assert got.shape[1:3] == ours.output_size(h, w)


@pytest.mark.parametrize('size', [{'height': 28, 'width': 28}, {'height': 24, 'width': 40}])
def test_siglip_matches_hf(size):
  hf = SiglipImageProcessorPil(size=size)
  ours = ImageProcessor.from_hf_config(hf.to_dict())
  assert not ours.do_center_crop and ours.image_mean == (0.5, 0.5, 0.5)
  got = _check(ours, hf, _images(SIZES))
  assert got.shape[1:3] == (size['height'], size['width'])


def test_siglip_default_224():
  hf = SiglipImageProcessorPil()
  ours = ImageProcessor.from_hf_config({'image_processor_type': 'SiglipImageProcessor'})
  assert ours == ImageProcessor.siglip()
  _check(ours, hf, _images([(100, 57)]))


@pytest.mark.parametrize('channels', [1, 4])
def test_convert_rgb_matches_hf(channels):
  hf = CLIPImageProcessorPil(size={'shortest_edge': 32}, crop_size={'height': 30, 'width': 30})
  ours = ImageProcessor.from_hf_config(hf.to_dict())
  images = _images(SIZES[:2], channels=channels, seed=channels)
  _check(ours, hf, images)
  with pytest.raises(ValueError, match='3 channels'):
    ImageProcessor(do_convert_rgb=False)(images)


def test_single_array_and_batch_array():
  ours = ImageProcessor.siglip(size=(28, 28))
  images = _images([(40, 50)] * 3)
  one = ours(images[0])
  assert one.shape == (1, 28, 28, 3)
  np.testing.assert_array_equal(ours(np.stack(images)), ours(images))
  np.testing.assert_array_equal(one[0], ours(images)[0])
  with pytest.raises(ValueError, match='uint8'):
    ours(images[0].astype(np.float32))


def test_round_trip_through_save_pretrained(tmp_path):
  for i, hf in enumerate([
      CLIPImageProcessorPil(size={'shortest_edge': 32}, crop_size={'height': 30, 'width': 30}),
      SiglipImageProcessorPil(size={'height': 28, 'width': 28}),
  ]):
    d = tmp_path / str(i)
    hf.save_pretrained(d)
    ours = ImageProcessor.from_dir(d)
    assert ours == ImageProcessor.from_hf_config(json.loads((d / 'preprocessor_config.json').read_text()))
    images = _images(SIZES, seed=i)
    _check(ours, hf, images)
    # and back: our config builds an HF processor that computes the same thing
    back = type(hf)(**ours.to_hf_config())
    _check(ours, back, images)
    assert ImageProcessor.from_hf_config(ours.to_hf_config(), kind=['clip', 'siglip'][i]) == ours


def test_legacy_clip_feature_extractor_config():
  """Old hub configs (openai/clip-*) store ints: size = shortest edge, crop_size = square."""
  cfg = {'feature_extractor_type': 'CLIPFeatureExtractor', 'size': 32, 'crop_size': 30, 'do_resize': True,
         'do_center_crop': True, 'do_normalize': True, 'resample': 3,
         'image_mean': [0.48145466, 0.4578275, 0.40821073], 'image_std': [0.26862954, 0.26130258, 0.27577711]}
  ours = ImageProcessor.from_hf_config(cfg)
  assert ours.size == 32 and ours.crop_size == (30, 30)
  hf_kw = {k: v for k, v in cfg.items() if k != 'feature_extractor_type'}
  _check(ours, CLIPImageProcessorPil(**hf_kw), _images(SIZES))


@pytest.mark.parametrize('key,value', [
    ('size', {'longest_edge': 64}),
    ('crop_size', {'shortest_edge': 30}),
    ('image_mean', [0.5, 0.5]),
    ('image_std', 'oops'),
    ('resample', 42),
    ('do_resize', 'yes'),
    ('do_pad', True),
    ('do_flip', False),
    ('image_processor_type', 'ViTImageProcessor'),
])
def test_bad_config_field_raises_naming_it(key, value):
  cfg = {**CLIPImageProcessorPil(size={'shortest_edge': 32}, crop_size={'height': 30, 'width': 30}).to_dict(),
         key: value}
  with pytest.raises(ValueError, match=key):
    ImageProcessor.from_hf_config(cfg)


def test_missing_type_needs_kind():
  with pytest.raises(ValueError, match='kind'):
    ImageProcessor.from_hf_config({'size': {'height': 28, 'width': 28}})
  assert ImageProcessor.from_hf_config({'size': {'height': 28, 'width': 28}}, kind='siglip') == ImageProcessor.siglip(
      size=(28, 28))
