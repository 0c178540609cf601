"""HF Llama / Mistral / Qwen2 causal LMs -> mmproj Llama (mmproj/convert/llama.py): logits parity from a
safetensors directory, the config mapping, and key checking (tiny random models, CPU, float32)."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from parity_utils import assert_close, randomize_, seeded, to_torch

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from mmproj.convert import from_transformers  # noqa: E402
from mmproj.convert.llama import lm_config_from_hf, load_lm  # noqa: E402

ATOL = 1e-4
COMMON = dict(vocab_size=67, hidden_size=40, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=52, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=500.0)
LLAMA3 = {'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
          'original_max_position_embeddings': 16, 'rope_theta': 500.0}
LINEAR = {'rope_type': 'linear', 'factor': 2.5, 'rope_theta': 500.0}


def make_hf(kind: str, seed: int = 0, **overrides):
  seeded(seed)
  kw = {**COMMON, **overrides}
  if 'rope_parameters' in kw:
    kw.pop('rope_theta')
  cfg_cls, model_cls = {
      'llama': (transformers.LlamaConfig, transformers.LlamaForCausalLM),
      'mistral': (transformers.MistralConfig, transformers.MistralForCausalLM),
      'qwen2': (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
  }[kind]
  cfg = cfg_cls(**kw)
  cfg._attn_implementation = 'eager'
  model = model_cls(cfg).float()
  randomize_(model, seed, std=0.2)
  if cfg.tie_word_embeddings:
    model.tie_weights()
  return model.eval()


def batch(vocab: int, lengths=(11, 7, 4), seed=0):
  """Right-padded rows: tokens [B, T], mask [B, T], positions = max(cumsum(mask) - 1, 0)."""
  rng = np.random.default_rng(seed)
  t = max(lengths)
  tokens = rng.integers(0, vocab, (len(lengths), t)).astype(np.int32)
  mask = (np.arange(t)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
  return tokens, mask, positions


def our_logits(lm, params, tokens, mask, positions):
  def fwd(lm):
    return lm(lm.embed(jnp.asarray(tokens)), jnp.asarray(positions), jnp.asarray(mask))[0]
  return lm.apply({'params': params}, method=lambda m: fwd(m))


def check_parity(model, lm, params, lengths=(11, 7, 4)):
  tokens, mask, positions = batch(model.config.vocab_size, lengths)
  with torch.no_grad():
    ref = model(input_ids=to_torch(tokens).long(), attention_mask=to_torch(mask).long()).logits.float().numpy()
  ours = np.asarray(our_logits(lm, params, tokens, mask, positions))
  valid = mask.astype(bool)
  assert_close(ours[valid], ref[valid], ATOL, 'logits (unpadded positions)')


def saved(model, tmp_path) -> str:
  path = str(tmp_path / 'hf')
  model.save_pretrained(path, safe_serialization=True)
  return path


@pytest.mark.parametrize('kind,overrides', [
    ('llama', {}),
    ('llama', {'tie_word_embeddings': True}),
    ('llama', {'rope_parameters': LLAMA3}),
    ('llama', {'rope_parameters': LINEAR, 'head_dim': 12}),
    ('qwen2', {}),
    ('mistral', {'sliding_window': 5}),
], ids=['llama', 'llama_tied', 'llama3_rope', 'linear_rope_head_dim', 'qwen2', 'mistral_window'])
def test_load_lm_logits_match(kind, overrides, tmp_path):
  model = make_hf(kind, **overrides)
  lm, params = load_lm(saved(model, tmp_path))
  cfg = lm_config_from_hf(model.config.to_dict())
  assert lm.qkv_bias == (kind == 'qwen2') and lm.tie_embeddings == model.config.tie_word_embeddings
  assert ('lm_head' in params) != cfg['tie_embeddings']
  if kind == 'qwen2':
    assert params['layers_0']['self_attn']['q_proj']['bias'].shape == (4, 10)
  check_parity(model, lm, params)


def test_from_transformers_and_kv_cache_decode():
  """from_transformers dispatch; a cached decode reproduces the full pass (llama3 rope, GQA)."""
  model = make_hf('llama', seed=1, rope_parameters=LLAMA3)
  lm, params = from_transformers(model)
  check_parity(model, lm, params, lengths=(9, 9))
  tokens, mask, positions = batch(model.config.vocab_size, (9, 9), seed=1)
  full = np.asarray(our_logits(lm, params, tokens, mask, positions))

  def step(m, cache, lo, hi):
    x = m.embed(jnp.asarray(tokens[:, lo:hi]))
    return m(x, jnp.asarray(positions[:, lo:hi]), jnp.asarray(mask[:, lo:hi]), cache=cache)

  cache = lm.init_cache(2, 9)
  logits, cache = lm.apply({'params': params}, cache, 0, 6, method=step)
  outs = [np.asarray(logits)]
  for i in range(6, 9):
    logits, cache = lm.apply({'params': params}, cache, i, i + 1, method=step)
    outs.append(np.asarray(logits))
  np.testing.assert_allclose(np.concatenate(outs, axis=1), full, atol=1e-4)


def test_tied_head_saved_explicitly(tmp_path):
  """A tied checkpoint that stores lm_head.weight too loads (the copy is checked and consumed)."""
  from safetensors.numpy import load_file, save_file

  model = make_hf('llama', tie_word_embeddings=True)
  path = saved(model, tmp_path)
  file = os.path.join(path, 'model.safetensors')
  tensors = load_file(file)
  assert 'lm_head.weight' not in tensors
  tensors['lm_head.weight'] = tensors['model.embed_tokens.weight'].copy()
  save_file(tensors, file, metadata={'format': 'pt'})
  lm, params = load_lm(path)
  check_parity(model, lm, params)
  tensors['lm_head.weight'] = tensors['lm_head.weight'] + 1.0
  save_file(tensors, file, metadata={'format': 'pt'})
  with pytest.raises(ValueError, match='lm_head.weight'):
    load_lm(path)


@pytest.mark.parametrize('edit,match', [
    ('drop', 'missing key .model.layers.1.mlp.up_proj.weight'),
    ('extra', "unused key.*'model.extra.weight'"),
    ('shape', 'model.layers.0.self_attn.k_proj.weight.*shape'),
])
def test_bad_keys_name_the_key(edit, match, tmp_path):
  from safetensors.numpy import load_file, save_file

  path = saved(make_hf('qwen2'), tmp_path)
  file = os.path.join(path, 'model.safetensors')
  tensors = load_file(file)
  if edit == 'drop':
    del tensors['model.layers.1.mlp.up_proj.weight']
  elif edit == 'extra':
    tensors['model.extra.weight'] = np.zeros(3, np.float32)
  else:
    tensors['model.layers.0.self_attn.k_proj.weight'] = np.zeros((21, 40), np.float32)
  save_file(tensors, file, metadata={'format': 'pt'})
  with pytest.raises(ValueError, match=match):
    load_lm(path)


def test_config_mapping_and_rejections(tmp_path):
  cfg = lm_config_from_hf(make_hf('mistral', sliding_window=5).config.to_dict())
  assert cfg == dict(vocab_size=67, width=40, depth=2, num_heads=4, num_kv_heads=2, head_dim=10, mlp_dim=52,
                     rope_theta=500.0, norm_eps=1e-5, tie_embeddings=False, max_len=64, qkv_bias=False,
                     rope_scaling=None, sliding_window=5)
  old = dict(model_type='llama', vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
             intermediate_size=16, max_position_embeddings=32, rope_theta=1e4,
             rope_scaling={'type': 'linear', 'factor': 2.0})          # pre-transformers-5 config.json
  assert lm_config_from_hf(old)['rope_scaling'] == {'rope_type': 'linear', 'factor': 2.0}
  for bad, match in [({'rope_scaling': {'rope_type': 'yarn', 'factor': 2.0}}, 'yarn'),
                     ({'attention_bias': True}, 'attention_bias'),
                     ({'hidden_act': 'gelu'}, 'hidden_act'),
                     ({'model_type': 'gemma'}, 'model_type')]:
    with pytest.raises(ValueError, match=match):
      lm_config_from_hf({**old, **bad})
  path = tmp_path / 'cfg'
  os.makedirs(path)
  with open(path / 'config.json', 'w') as f:
    json.dump({**old, 'architectures': ['GPT2LMHeadModel']}, f)
  with pytest.raises(ValueError, match='architectures'):
    load_lm(str(path))


def test_validate_rope_scaling(tiny_model_cfg):
  from mmproj import model as mm

  tiny_model_cfg.lm.rope_scaling = {'rope_type': 'dynamic', 'factor': 2.0}
  with pytest.raises(ValueError, match='model.lm.rope_scaling'):
    mm.validate(tiny_model_cfg)
  tiny_model_cfg.lm.rope_scaling = {'rope_type': 'linear', 'factor': 2.0}
  mm.validate(tiny_model_cfg)
