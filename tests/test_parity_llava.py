"""LLaVA's projector vs transformers LlavaMultiModalProjector."""

import numpy as np
import pytest

from parity_utils import assert_close, randomize_, seeded, to_torch

from mmproj import convert

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')


def _hf_projector(vision_width, text_width, act='gelu', bias=True, feature_layers=-2):
  from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
  from transformers.models.llava.modeling_llava import LlavaMultiModalProjector
  cfg = LlavaConfig(vision_config=CLIPVisionConfig(hidden_size=vision_width, num_attention_heads=2),
      text_config=LlamaConfig(hidden_size=text_width, num_attention_heads=2, num_key_value_heads=2), projector_hidden_act=act, multimodal_projector_bias=bias,
      vision_feature_layer=feature_layers)
  return randomize_(LlavaMultiModalProjector(cfg))


@pytest.mark.parametrize('act,bias,feature_layers', [('gelu', True, -2), ('gelu_pytorch_tanh', False, [-2, -5])])
def test_llava_projector_parity(act, bias, feature_layers):
  rng = seeded(0)
  hf = _hf_projector(24, 40, act, bias, feature_layers)
  k = 1 if isinstance(feature_layers, int) else len(feature_layers)
  x = rng.normal(size=(2, 7, 24 * k)).astype(np.float32)  # odd token count: grid (1, 7)
  module, params = convert.from_transformers(hf)
  y = module.apply({'params': params}, x, grid=(1, 7))
  with torch.no_grad():
    ref = hf(to_torch(x))
  assert_close(y, ref)


def test_unsupported_class_names_it():
  with pytest.raises(ValueError, match='no converter for Linear'):
    convert.from_transformers(torch.nn.Linear(2, 2))


def test_missing_or_extra_key_is_named():
  hf = _hf_projector(8, 16)
  sd = convert.StateDict.of(hf)
  with pytest.raises(ValueError, match=r"missing key 'linear_3.weight'"):
    sd.take('linear_3.weight')
  sd.dense('linear_1')
  with pytest.raises(ValueError, match=r"unused key\(s\), first 'linear_2.bias'"):
    sd.finish()
  with pytest.raises(ValueError, match=r"'linear_1.weight' has shape \(16, 8\), expected \(4, 4\)"):
    sd.take('linear_1.weight', (4, 4))
