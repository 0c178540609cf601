"""Image preprocessing equal to Hugging Face's CLIP and SigLIP image processors, with no torch at run time.

Which transformers class this matches: in transformers v5 the names `CLIPImageProcessor` and
`SiglipImageProcessor` are the torchvision ("fast") backend, and the PIL/NumPy ones are `CLIPImageProcessorPil`
and `SiglipImageProcessorPil` (`transformers.image_processing_backends.PilBackend`; without torchvision,
`AutoImageProcessor` and the plain names fall back to them). `ImageProcessor` reproduces the PIL classes — the
classic "slow" processors of transformers v4 — step by step:

  1. convert to RGB (`do_convert_rgb`): 1 channel is repeated, 4 channels are alpha-composited onto white and
     rounded, as `transformers.image_transforms.convert_to_rgb` does for uint8 arrays;
  2. resize (`do_resize`) with `PIL.Image.resize(resample=...)` on the uint8 image (bicubic by default):
     `size` an int is the shortest edge — the long edge becomes `int(size * long / short)` (truncation, as
     `get_resize_output_image_size(default_to_square=False)`) — and `size` a (height, width) pair resizes to
     exactly that;
  3. center crop (`do_center_crop`) to `crop_size` with top = (H - h) // 2, left = (W - w) // 2, zero-padding
     first when the image is smaller than the crop (`image_transforms.center_crop`);
  4. rescale (`do_rescale`): float64 multiply by `rescale_factor`, then cast to float32;
  5. normalise (`do_normalize`): (x - mean) / std in float32.

The result is float32 channels-last [B, H, W, 3] (the transformers processors give [B, 3, H, W]); the numbers
are identical. Unlike transformers, inputs are always taken as channels-last (HF guesses the layout and reads
e.g. a 3 x W x 3 image as channels-first). Only uint8 numpy inputs are accepted.

Configs are read from `preprocessor_config.json` as `save_pretrained` writes it (`from_hf_config`,
`from_dir`); keys that the file omits take the class defaults of the processor named by `image_processor_type`
(CLIP: shortest edge 224, center crop 224 x 224, OPENAI_CLIP_MEAN/STD; SigLIP: 224 x 224, no crop, mean and
std 0.5). Anything this module cannot reproduce raises a ValueError naming the offending key.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)

BICUBIC = 3  # PIL.Image.Resampling.BICUBIC == PILImageResampling.BICUBIC
_VALID_RESAMPLE = (0, 1, 2, 3, 4, 5)  # NEAREST, LANCZOS, BILINEAR, BICUBIC, BOX, HAMMING

# Keys that describe the file rather than the processing.
_METADATA_KEYS = frozenset(
    {'image_processor_type', 'feature_extractor_type', 'processor_class', 'auto_map', '_processor_class'})
# Keys that are fine when absent/None/False (they switch off something this module does not implement).
_OFF_ONLY_KEYS = frozenset({
    'do_pad', 'pad_size', 'use_square_size', 'data_format', 'input_data_format', 'device', 'return_tensors',
    'disable_grouping'})


def _kind_of(type_name: str | None) -> str | None:
  if type_name is None:
    return None
  base = type_name
  for suffix in ('Pil', 'Fast'):
    if base.endswith(suffix):
      base = base[: -len(suffix)]
  return {'CLIPImageProcessor': 'clip', 'CLIPFeatureExtractor': 'clip', 'SiglipImageProcessor': 'siglip'}.get(base)


@dataclasses.dataclass(frozen=True)
class ImageProcessor:
  """Frozen equivalent of `CLIPImageProcessorPil` / `SiglipImageProcessorPil` (see module docstring).

  size: an int is the target shortest edge (HF `{"shortest_edge": n}`), a pair is (height, width)
  (HF `{"height": h, "width": w}`). crop_size: (height, width). image_mean/std: 3 floats.
  The defaults are CLIP's; `siglip()` gives SigLIP's.
  """

  do_convert_rgb: bool = True
  do_resize: bool = True
  size: int | tuple[int, int] = 224
  resample: int = BICUBIC
  do_center_crop: bool = True
  crop_size: tuple[int, int] | None = (224, 224)
  do_rescale: bool = True
  rescale_factor: float = 1 / 255
  do_normalize: bool = True
  image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
  image_std: tuple[float, float, float] = OPENAI_CLIP_STD

  def __post_init__(self):
    size = self.size
    if isinstance(size, (list, tuple)):
      if len(size) != 2 or not all(_is_int(s) and s > 0 for s in size):
        raise ValueError(f'size must be a positive int or (height, width), got {size!r}')
      object.__setattr__(self, 'size', (int(size[0]), int(size[1])))
    elif not (_is_int(size) and size > 0):
      raise ValueError(f'size must be a positive int or (height, width), got {size!r}')
    if self.crop_size is not None:
      cs = self.crop_size
      if not isinstance(cs, (list, tuple)) or len(cs) != 2 or not all(_is_int(s) and s > 0 for s in cs):
        raise ValueError(f'crop_size must be (height, width), got {cs!r}')
      object.__setattr__(self, 'crop_size', (int(cs[0]), int(cs[1])))
    if self.do_center_crop and self.crop_size is None:
      raise ValueError('crop_size is required when do_center_crop is set')
    if self.resample not in _VALID_RESAMPLE or isinstance(self.resample, bool):
      raise ValueError(f'resample must be a PIL resampling filter in {_VALID_RESAMPLE}, got {self.resample!r}')
    if isinstance(self.rescale_factor, bool) or not isinstance(self.rescale_factor, (int, float)):
      raise ValueError(f'rescale_factor must be a number, got {self.rescale_factor!r}')
    for name in ('image_mean', 'image_std'):
      v = getattr(self, name)
      if isinstance(v, (int, float)) and not isinstance(v, bool):
        v = (v, v, v)
      if not isinstance(v, (list, tuple)) or len(v) != 3 or not all(
          isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        raise ValueError(f'{name} must be a float or 3 floats, got {v!r}')
      object.__setattr__(self, name, tuple(float(x) for x in v))
    if any(s == 0 for s in self.image_std):
      raise ValueError(f'image_std must be non-zero, got {self.image_std!r}')
    for name in ('do_convert_rgb', 'do_resize', 'do_center_crop', 'do_rescale', 'do_normalize'):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f'{name} must be a bool, got {getattr(self, name)!r}')

  # -- construction -------------------------------------------------------------------------------------------

  @classmethod
  def clip(cls, **overrides) -> ImageProcessor:
    return cls(**overrides)

  @classmethod
  def siglip(cls, **overrides) -> ImageProcessor:
    base = dict(size=(224, 224), do_center_crop=False, crop_size=None,
                image_mean=IMAGENET_STANDARD_MEAN, image_std=IMAGENET_STANDARD_STD)
    return cls(**{**base, **overrides})

  @classmethod
  def from_hf_config(cls, preprocessor_config: Mapping[str, Any], kind: str | None = None) -> ImageProcessor:
    """From a `preprocessor_config.json` dict. `kind` ("clip"/"siglip") is needed only when the dict names
    no `image_processor_type`/`feature_extractor_type`; missing keys take that class's defaults."""
    cfg = dict(preprocessor_config)
    type_name = cfg.get('image_processor_type', cfg.get('feature_extractor_type'))
    found = _kind_of(type_name)
    if type_name is not None and found is None:
      key = 'image_processor_type' if 'image_processor_type' in cfg else 'feature_extractor_type'
      raise ValueError(f'{key}={type_name!r} is not a CLIP or SigLIP image processor')
    if kind is not None and kind not in ('clip', 'siglip'):
      raise ValueError(f"kind must be 'clip' or 'siglip', got {kind!r}")
    if found is not None and kind is not None and found != kind:
      raise ValueError(f'image_processor_type={type_name!r} disagrees with kind={kind!r}')
    kind = found or kind
    if kind is None:
      raise ValueError("the config names no image_processor_type; pass kind='clip' or kind='siglip'")

    defaults = cls.clip() if kind == 'clip' else cls.siglip()
    kw: dict[str, Any] = {}
    for key, value in cfg.items():
      if key in _METADATA_KEYS:
        continue
      if key in _OFF_ONLY_KEYS:
        if value not in (None, False):
          raise ValueError(f'{key}={value!r} is not supported (only unset/false)')
        continue
      if key == 'default_to_square':
        if not isinstance(value, bool):
          raise ValueError(f'default_to_square must be a bool, got {value!r}')
        continue  # used with `size` below
      if key == 'size':
        kw['size'] = _parse_size(value, bool(cfg.get('default_to_square', False)))
      elif key == 'crop_size':
        kw['crop_size'] = None if value is None else _parse_crop_size(value)
      elif key == 'resample':
        if value is None:
          continue
        kw['resample'] = value
      elif key in ('do_convert_rgb', 'do_resize', 'do_center_crop', 'do_rescale', 'do_normalize'):
        # HF treats None as "class default" for these (None -> falsy for do_center_crop on SigLIP).
        kw[key] = getattr(defaults, key) if value is None else value
      elif key in ('rescale_factor', 'image_mean', 'image_std'):
        if value is not None:
          kw[key] = value
      else:
        raise ValueError(f'unknown preprocessor config key {key!r}')
    return dataclasses.replace(defaults, **kw)

  @classmethod
  def from_dir(cls, path: str | os.PathLike, kind: str | None = None) -> ImageProcessor:
    """From `path/preprocessor_config.json` (a checkpoint or `save_pretrained` directory)."""
    with open(os.path.join(os.fspath(path), 'preprocessor_config.json')) as f:
      return cls.from_hf_config(json.load(f), kind=kind)

  def to_hf_config(self) -> dict[str, Any]:
    """The `preprocessor_config.json` dict (keys as `save_pretrained` writes them, minus the type name)."""
    if isinstance(self.size, int):
      size = {'shortest_edge': self.size}
    else:
      size = {'height': self.size[0], 'width': self.size[1]}
    out = dict(do_convert_rgb=self.do_convert_rgb, do_resize=self.do_resize, size=size, resample=self.resample,
               do_center_crop=self.do_center_crop, do_rescale=self.do_rescale,
               rescale_factor=self.rescale_factor, do_normalize=self.do_normalize,
               image_mean=list(self.image_mean), image_std=list(self.image_std))
    if self.crop_size is not None:
      out['crop_size'] = {'height': self.crop_size[0], 'width': self.crop_size[1]}
    return out

  # -- processing ---------------------------------------------------------------------------------------------

  def output_size(self, height: int, width: int) -> tuple[int, int]:
    """(height, width) of the processed image for an input of height x width."""
    if self.do_resize:
      height, width = self._resize_size(height, width)
    if self.do_center_crop:
      height, width = self.crop_size
    return height, width

  def _resize_size(self, height: int, width: int) -> tuple[int, int]:
    if not isinstance(self.size, int):
      return self.size
    # transformers.image_transforms.get_resize_output_image_size(default_to_square=False), max_size None.
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = self.size, int(self.size * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)

  def resize_and_crop(self, image: np.ndarray) -> np.ndarray:
    """Steps 1-3 only (RGB conversion, resize, center crop): one uint8 [H, W, C] image -> uint8 [h, w, 3].

    For pipelines that leave rescaling and normalisation to the model (which takes uint8 images);
    `process_one(x)` is exactly rescale + normalise of `resize_and_crop(x)`.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8:
      raise ValueError(f'images must be uint8, got {image.dtype}')
    if image.ndim != 3:
      raise ValueError(f'an image must be [H, W, C], got shape {image.shape}')
    if self.do_convert_rgb:
      image = _convert_to_rgb(image)
    if image.shape[-1] != 3:
      raise ValueError(f'images must have 3 channels (or 1/4 with do_convert_rgb), got shape {image.shape}')
    if self.do_resize:
      h, w = self._resize_size(*image.shape[:2])
      image = np.asarray(Image.fromarray(image).resize((w, h), resample=self.resample))
    if self.do_center_crop:
      image = _center_crop(image, self.crop_size)
    return image

  def process_one(self, image: np.ndarray) -> np.ndarray:
    """One uint8 [H, W, C] image -> float32 [h, w, 3]."""
    image = self.resize_and_crop(image)
    if self.do_rescale:
      image = (image.astype(np.float64) * self.rescale_factor).astype(np.float32)
    else:
      image = image.astype(np.float32)
    if self.do_normalize:
      mean = np.asarray(self.image_mean, np.float32)
      std = np.asarray(self.image_std, np.float32)
      image = (image - mean) / std
    return image

  def __call__(self, images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """uint8 images ([H, W, C] one, [B, H, W, C] or a list of [H, W, C]) -> float32 [B, h, w, 3]."""
    if isinstance(images, np.ndarray):
      if images.ndim == 3:
        images = [images]
      elif images.ndim != 4:
        raise ValueError(f'expected [H, W, C] or [B, H, W, C], got shape {images.shape}')
    images = [self.process_one(im) for im in images]
    if not images:
      raise ValueError('no images')
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
      raise ValueError(f'processed images differ in shape {sorted(shapes)}; set do_resize/do_center_crop')
    return np.stack(images)


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _parse_size(value, default_to_square: bool) -> int | tuple[int, int]:
  # transformers.image_processing_utils.get_size_dict, with CLIP/SigLIP's default_to_square=False.
  if _is_int(value):
    return (int(value), int(value)) if default_to_square else int(value)
  if isinstance(value, (list, tuple)) and len(value) == 2:
    return tuple(value)
  if isinstance(value, Mapping):
    if set(value) == {'shortest_edge'}:
      return value['shortest_edge']
    if set(value) == {'height', 'width'}:
      return (value['height'], value['width'])
  raise ValueError(f"size={value!r} is not supported (use {{'shortest_edge': n}} or {{'height', 'width'}})")


def _parse_crop_size(value) -> tuple[int, int]:
  if _is_int(value):
    return (int(value), int(value))
  if isinstance(value, (list, tuple)) and len(value) == 2:
    return tuple(value)
  if isinstance(value, Mapping) and set(value) == {'height', 'width'}:
    return (value['height'], value['width'])
  raise ValueError(f"crop_size={value!r} is not supported (use {{'height', 'width'}})")


def _convert_to_rgb(image: np.ndarray) -> np.ndarray:
  """transformers.image_transforms.convert_to_rgb for a channels-last uint8 array."""
  c = image.shape[-1]
  if c == 1:
    return np.repeat(image, 3, axis=-1)
  if c == 4:
    alpha = image[..., 3:4] / 255
    composite = alpha * image[..., :3] + (1 - alpha) * 255
    return np.round(composite).astype(image.dtype)
  return image


def _center_crop(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """transformers.image_transforms.center_crop on a channels-last array (zero-pads if too small)."""
  orig_h, orig_w = image.shape[:2]
  crop_h, crop_w = size
  top = (orig_h - crop_h) // 2
  left = (orig_w - crop_w) // 2
  bottom, right = top + crop_h, left + crop_w
  if top >= 0 and bottom <= orig_h and left >= 0 and right <= orig_w:
    return image[top:bottom, left:right]
  new_h, new_w = max(crop_h, orig_h), max(crop_w, orig_w)
  padded = np.zeros((new_h, new_w) + image.shape[2:], image.dtype)
  top_pad = math.ceil((new_h - orig_h) / 2)
  left_pad = math.ceil((new_w - orig_w) / 2)
  padded[top_pad:top_pad + orig_h, left_pad:left_pad + orig_w] = image
  top, bottom, left, right = top + top_pad, bottom + top_pad, left + left_pad, right + left_pad
  return padded[max(0, top):min(new_h, bottom), max(0, left):min(new_w, right)]
