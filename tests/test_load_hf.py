"""mmproj.load on HF directories written by save_pretrained: CLIP / SigLIP vision towers and Llama / Qwen2 causal
LMs give the PyTorch outputs within 1e-4 (f32); a causal LM bundle generates the ids transformers' greedy
generate gives. (LLaVA directories: tests/test_generate_hf.py and tests/test_convert_llava.py.)"""
from __future__ import annotations

import numpy as np
import pytest
from parity_utils import assert_close, randomize_, seeded, to_torch

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

import mmproj  # noqa: E402

ATOL = 1e-4
VISION = dict(image_size=24, patch_size=8, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4)
TEXT = dict(vocab_size=71, hidden_size=40, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, eos_token_id=5, bos_token_id=1, pad_token_id=0)


def _save(model, path):
  randomize_(model, seed=3, std=0.2).save_pretrained(path)
  return model


@pytest.mark.parametrize('family', ['clip', 'siglip'])
def test_vision_tower_directory(family, tmp_path):
  seeded(0)
  cls, cfg_cls = {'clip': (transformers.CLIPVisionModel, transformers.CLIPVisionConfig),
                  'siglip': (transformers.SiglipVisionModel, transformers.SiglipVisionConfig)}[family]
  hf = _save(cls(cfg_cls(**VISION)).float(), tmp_path)
  bundle = mmproj.load(str(tmp_path))
  assert bundle.prompt_format == 'none' and bundle.config.model.encoder.cls_token == (family == 'clip')
  pixels = np.random.default_rng(0).normal(size=(2, 24, 24, 3)).astype(np.float32)
  tokens, grid = bundle.model.apply({'params': bundle.params}, pixels)
  with torch.no_grad():
    out = hf(pixel_values=to_torch(pixels.transpose(0, 3, 1, 2))).last_hidden_state
  assert grid == (3, 3)
  assert_close(tokens, out[:, 1:] if family == 'clip' else out, ATOL, f'{family} last_hidden_state')
  with pytest.raises(ValueError, match='does not generate text'):
    mmproj.generate(bundle, None, ['hi'])


@pytest.mark.parametrize('family', ['llama', 'qwen2'])
def test_causal_lm_directory(family, tmp_path):
  seeded(0)
  cls, cfg_cls = {'llama': (transformers.LlamaForCausalLM, transformers.LlamaConfig),
                  'qwen2': (transformers.Qwen2ForCausalLM, transformers.Qwen2Config)}[family]
  extra = {'tie_word_embeddings': True} if family == 'qwen2' else {}
  hf = _save(cls(cfg_cls(**TEXT, **extra)).float(), tmp_path)
  if family == 'qwen2':
    hf.tie_weights()
    hf.save_pretrained(tmp_path)
  bundle = mmproj.load(str(tmp_path))
  assert not bundle.config.model.use_image and bundle.stop_ids == (5,)

  rng = np.random.default_rng(1)
  tokens = rng.integers(6, 71, (3, 9)).astype(np.int32)
  mask = np.ones_like(tokens)
  mask[1, :3] = mask[2, :5] = 0                                          # left padding
  positions = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)
  logits = bundle.model.apply({'params': bundle.params},
                              {'tokens': tokens, 'positions': positions, 'input_mask': mask})
  with torch.no_grad():
    ref = hf(input_ids=to_torch(tokens.astype(np.int64)), attention_mask=to_torch(mask.astype(np.int64)),
             position_ids=to_torch(positions.astype(np.int64))).logits
  assert_close(logits * mask[..., None], ref * to_torch(mask[..., None].astype(np.float32)), ATOL, f'{family} logits')

  # Text-only greedy generation from the same left-padded prompts (no tokenizer needed for ids).
  from mmproj.eval.generate import generate_tokens
  ids = np.asarray(generate_tokens(bundle.model, bundle.params,
                                   {'tokens': tokens, 'positions': positions, 'input_mask': mask},
                                   max_new_tokens=8, eos_id=list(bundle.stop_ids), pad_id=0))
  with torch.no_grad():
    out = hf.generate(input_ids=to_torch(tokens.astype(np.int64)), attention_mask=to_torch(mask.astype(np.int64)),
                      max_new_tokens=8, do_sample=False, eos_token_id=5, pad_token_id=0)
  want = out[:, tokens.shape[1]:].numpy()
  np.testing.assert_array_equal(ids[:, :want.shape[1]], want)


def test_unsupported_directory_is_named(tmp_path):
  (tmp_path / 'config.json').write_text('{"model_type": "bert"}')
  with pytest.raises(ValueError, match="model_type 'bert' is not supported by mmproj.load"):
    mmproj.load(str(tmp_path))
