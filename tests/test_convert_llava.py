"""Whole llava-hf LLaVA checkpoints in and out of mmproj (mmproj/convert/llava.py): f32 logits parity with
transformers from a saved directory and after export, both key layouts, strict key / config checking.

Two tiny random models: CLIP tower (vision_feature_layer -2: the top block is skipped) + Llama, and SigLIP tower
(strategy 'full', non-default image mean/std) + Qwen2 (GQA, q/k/v biases, tied embeddings, bias-free projector).
"""

import json
import os

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest
from parity_utils import assert_close, randomize_, seeded, to_torch

import mmproj
from mmproj.convert import StateDict, from_transformers, hf_dir, llama, llava, vision
from mmproj.data.preprocess import ImageProcessor

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

ATOL = 1e-4
PAD = 0
MODELS = {
    'clip_llama': dict(
        vision=('CLIPVisionConfig', dict(image_size=30, patch_size=6, hidden_size=24, intermediate_size=40,
                                         num_hidden_layers=3, num_attention_heads=2)),
        text=('LlamaConfig', dict(vocab_size=67, hidden_size=40, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=52, max_position_embeddings=64,
                                  rms_norm_eps=1e-5)),
        llava=dict(image_token_index=5, image_seq_length=25, vision_feature_layer=-2,
                   vision_feature_select_strategy='default', projector_hidden_act='gelu'),
        processor=ImageProcessor.clip(size=30, crop_size=(30, 30))),
    'siglip_qwen2': dict(
        vision=('SiglipVisionConfig', dict(image_size=32, patch_size=8, hidden_size=48, intermediate_size=72,
                                           num_hidden_layers=2, num_attention_heads=4)),
        text=('Qwen2Config', dict(vocab_size=71, hidden_size=40, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=52, max_position_embeddings=64,
                                  tie_word_embeddings=True)),
        llava=dict(image_token_index=7, image_seq_length=16, vision_feature_layer=-1,
                   vision_feature_select_strategy='full', projector_hidden_act='gelu_pytorch_tanh',
                   multimodal_projector_bias=False),
        processor=ImageProcessor.siglip(size=(32, 32), image_mean=(0.4, 0.5, 0.6), image_std=(0.3, 0.2, 0.25))),
}


def _processor_config(kind: str) -> dict:
  proc = MODELS[kind]['processor']
  name = 'CLIPImageProcessor' if kind.startswith('clip') else 'SiglipImageProcessor'
  return {'image_processor_type': name, **proc.to_hf_config()}


@pytest.fixture(scope='module', params=sorted(MODELS))
def saved(request, tmp_path_factory):
  """(kind, torch model, directory written by save_pretrained + a preprocessor_config.json)."""
  spec = MODELS[request.param]
  seeded(0)
  vision_cfg = getattr(transformers, spec['vision'][0])(**spec['vision'][1])
  text_cfg = getattr(transformers, spec['text'][0])(**spec['text'][1])
  cfg = transformers.LlavaConfig(vision_config=vision_cfg, text_config=text_cfg, **spec['llava'])
  model = transformers.LlavaForConditionalGeneration._from_config(cfg, attn_implementation='eager')
  randomize_(model, seed=1, std=0.2)
  path = tmp_path_factory.mktemp(request.param)
  model.save_pretrained(str(path), safe_serialization=True)
  with open(path / 'preprocessor_config.json', 'w') as f:
    json.dump(_processor_config(request.param), f)
  return request.param, model, str(path)


def make_batch(kind: str, seed: int = 0) -> dict:
  """Two rows holding image_seq_length image tokens plus text; row 1 left-padded. uint8 images at tower size."""
  spec = MODELS[kind]
  rng = np.random.default_rng(seed)
  size, n = spec['vision'][1]['image_size'], spec['llava']['image_seq_length']
  vocab, image_id = spec['text'][1]['vocab_size'], spec['llava']['image_token_index']

  def text(k):
    t = rng.integers(PAD + 1, vocab, k)
    return np.where(t == image_id, image_id + 1, t)

  rows = [np.concatenate([text(3), np.full(n, image_id), text(4)]),
          np.concatenate([np.full(4, PAD), text(1), np.full(n, image_id), text(2)])]
  tokens = np.stack(rows).astype(np.int32)                                           # [B, L]
  mask = np.ones_like(tokens)
  mask[1, :4] = 0
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
  images = rng.integers(0, 256, (2, size, size, 3), dtype=np.uint8)                  # [B, H, W, 3]
  return {'image': images, 'tokens': tokens, 'positions': positions, 'input_mask': mask}


def hf_logits(model, batch, processor: ImageProcessor) -> np.ndarray:
  pixel_values = processor(batch['image']).transpose(0, 3, 1, 2)                       # [B, 3, H, W]
  with torch.no_grad():
    out = model(input_ids=to_torch(batch['tokens']).long(), pixel_values=to_torch(pixel_values),
                attention_mask=to_torch(batch['input_mask']).long(),
                position_ids=to_torch(batch['positions']).long())
  return out.logits.float().numpy()


def our_logits(cfg_model: dict, params, batch) -> np.ndarray:
  model = mmproj.build_model(ml_collections.ConfigDict(cfg_model))
  return np.asarray(jax.jit(model.apply)({'params': params}, batch))                  # [B, L, V]


def check_logits(cfg_model, params, model, batch, kind, what):
  ours = our_logits(cfg_model, params, batch)
  ref = hf_logits(model, batch, MODELS[kind]['processor'])
  valid = batch['input_mask'].astype(bool)
  assert_close(ours[valid], ref[valid], ATOL, what)
  return float(np.max(np.abs(ours[valid] - ref[valid])))


def flat(params) -> dict:
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def assert_same_params(a, b):
  fa, fb = flat(a), flat(b)
  assert sorted(fa) == sorted(fb)
  for key in fa:
    assert fa[key].shape == fb[key].shape and np.array_equal(fa[key], fb[key]), key


def test_saved_directory_logits_match(saved):
  kind, model, path = saved
  names = set(hf_dir.read_safetensors(path))
  assert any(k.startswith('language_model.model.') for k in names)      # transformers 5.23 writes the saved layout
  cfg, params = llava.load_llava(path)
  enc = cfg['encoder']
  proc = MODELS[kind]['processor']
  assert (tuple(enc['image_mean']), tuple(enc['image_std'])) == (proc.image_mean, proc.image_std)
  assert enc['output_layer'] == MODELS[kind]['llava']['vision_feature_layer'] and not enc['final_norm']
  assert cfg['lm']['tie_embeddings'] == (kind == 'siglip_qwen2') and ('lm_head' in params['lm']) != (
      kind == 'siglip_qwen2')
  assert cfg['projector']['use_bias'] == (kind == 'clip_llama')
  check_logits(cfg, params, model, make_batch(kind), kind, f'{kind} load_llava')


def _write(path, config: dict, tensors: dict) -> str:
  from safetensors.numpy import save_file
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump(config, f)
  save_file(tensors, os.path.join(path, 'model.safetensors'), metadata={'format': 'pt'})
  return str(path)


def _family_normalisation(kind: str) -> dict:
  proc = ImageProcessor.clip() if kind.startswith('clip') else ImageProcessor.siglip()
  return {'image_mean': list(proc.image_mean), 'image_std': list(proc.image_std)}


def test_layouts_and_live_module_give_same_params(saved, tmp_path):
  kind, model, path = saved
  cfg, params = llava.load_llava(path)
  config, tensors = hf_dir.read_config(path), hf_dir.read_safetensors(path)
  # The released llava-hf layout: vision_tower.vision_model.* (transformers 5.23 saves vision_tower.*).
  legacy = {('vision_tower.vision_model.' + k[len('vision_tower.'):] if k.startswith('vision_tower.') else k): v
            for k, v in tensors.items()}
  assert 'vision_tower.vision_model.embeddings.patch_embedding.weight' in legacy
  cfg2, params2 = llava.load_llava(_write(tmp_path / 'legacy', config, legacy))
  assert cfg2 == {**cfg, 'encoder': {**cfg['encoder'], **_family_normalisation(kind)}}   # no preprocessor config
  assert_same_params(params2, params)
  # The live module (transformers 5: model.vision_tower.*, lm_head.weight) through the registered converter.
  module, params3 = from_transformers(model)
  assert isinstance(module, mmproj.MultimodalLM)
  assert_same_params(params3, params)
  # The transformers 4.52-4.57 live layout (model.vision_tower.vision_model.*).
  live = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  live = {k.replace('model.vision_tower.', 'model.vision_tower.vision_model.'): v for k, v in live.items()}
  assert_same_params(llava.llava_params_from_hf(StateDict(live), cfg), params)


def test_export_round_trip(saved, tmp_path):
  from tokenizers import Tokenizer, models

  kind, model, path = saved
  cfg, params = llava.load_llava(path)
  tok = tmp_path / 'tok.json'
  Tokenizer(models.WordLevel({'<pad>': 0, '<unk>': 1}, unk_token='<unk>')).save(str(tok))
  out = llava.export_llava(cfg, params, str(tmp_path / 'export'), tokenizer_file=str(tok), eos_token_id=2,
                           bos_token_id=1, pad_token_id=PAD)
  assert sorted(os.listdir(out)) == ['config.json', 'generation_config.json', 'model.safetensors',
                                     'preprocessor_config.json', 'tokenizer.json']
  names = set(hf_dir.read_safetensors(out))
  assert 'vision_tower.vision_model.embeddings.patch_embedding.weight' in names    # released llava-hf layout
  hf, info = transformers.LlavaForConditionalGeneration.from_pretrained(
      out, output_loading_info=True, attn_implementation='eager')
  assert not info['missing_keys'] and not info['unexpected_keys'] and not info['mismatched_keys'], info
  assert hf.config.vision_feature_layer == -1
  assert hf.config.vision_config.num_hidden_layers == cfg['encoder']['depth'] + cfg['encoder']['output_layer'] + 1
  assert hf.generation_config.eos_token_id == 2 and hf.generation_config.pad_token_id == PAD
  batch = make_batch(kind, seed=1)
  check_logits(cfg, params, hf.eval(), batch, kind, f'{kind} exported -> transformers')
  # The exported preprocessor config is the one the tower was loaded with (transformers reads it the same way).
  hf_proc = transformers.AutoImageProcessor.from_pretrained(out)
  pixel = hf_proc(images=list(batch['image']), return_tensors='np')['pixel_values']
  np.testing.assert_allclose(pixel, MODELS[kind]['processor'](batch['image']).transpose(0, 3, 1, 2), atol=1e-6)
  # Back into mmproj: identical params; the tower now ends at the selected block.
  cfg2, params2 = llava.load_llava(out)
  assert_same_params(params2, params)
  n = cfg['encoder']['depth'] + cfg['encoder']['output_layer'] + 1
  assert cfg2['encoder'] == {**cfg['encoder'], 'depth': n, 'output_layer': -1}
  assert {k: v for k, v in cfg2.items() if k != 'encoder'} == {k: v for k, v in cfg.items() if k != 'encoder'}


@pytest.mark.parametrize('edit,match', [
    ('extra', "unused key.*'multi_modal_projector.extra.weight'"),
    ('missing', "missing key 'language_model.model.layers.1.mlp.up_proj.weight'"),
    ('shape', 'multi_modal_projector.linear_2.weight.? has shape'),
    ('top_block', None),
])
def test_bad_keys_are_named(saved, tmp_path, edit, match):
  kind, _, path = saved
  config, tensors = hf_dir.read_config(path), hf_dir.read_safetensors(path)
  if edit == 'extra':
    tensors['multi_modal_projector.extra.weight'] = np.zeros(3, np.float32)
  elif edit == 'missing':
    del tensors['language_model.model.layers.1.mlp.up_proj.weight']
  elif edit == 'shape':
    tensors['multi_modal_projector.linear_2.weight'] = tensors['multi_modal_projector.linear_2.weight'][:, :-1]
  else:                    # the keys deliberately skipped may be absent: the top block above output_layer, the norm
    depth = MODELS[kind]['vision'][1]['num_hidden_layers']
    skipped = vision.skipped_prefixes(llava.llava_model_config(config)['encoder'], 'vision_tower.')
    assert 'vision_tower.post_layernorm.' in skipped
    assert ('vision_tower.encoder.layers.%d.' % (depth - 1) in skipped) == (kind == 'clip_llama')
    tensors = {k: v for k, v in tensors.items() if not k.startswith(skipped)}
  bad = _write(tmp_path / edit, config, tensors)
  if match is None:
    llava.load_llava(bad)
  else:
    with pytest.raises(ValueError, match=match):
      llava.load_llava(bad)


def test_layout_must_be_recognised():
  with pytest.raises(ValueError, match='no LLaVA key layout'):
    llava.llava_params_from_hf(StateDict({'foo.weight': np.zeros(2)}), {})


CLIP_LLAVA = dict(model_type='llava', image_token_index=5, image_seq_length=25,
                  vision_config=dict(model_type='clip_vision_model', **MODELS['clip_llama']['vision'][1]),
                  text_config=dict(model_type='llama', **MODELS['clip_llama']['text'][1]))
SIGLIP_LLAVA = dict(model_type='llava', image_token_index=7, vision_feature_select_strategy='full',
                    vision_config=dict(model_type='siglip_vision_model', **MODELS['siglip_qwen2']['vision'][1]),
                    text_config=dict(model_type='qwen2', **MODELS['siglip_qwen2']['text'][1]))


@pytest.mark.parametrize('base,edit,match', [
    (CLIP_LLAVA, {'vision_feature_select_strategy': 'full'}, 'vision_feature_select_strategy'),
    (SIGLIP_LLAVA, {'vision_feature_select_strategy': 'default'}, 'vision_feature_select_strategy'),
    (CLIP_LLAVA, {'vision_feature_layer': [-2, -3]}, 'vision_feature_layer'),
    (CLIP_LLAVA, {'vision_feature_layer': 0}, 'vision_feature_layer'),
    (CLIP_LLAVA, {'image_seq_length': 24}, 'image_seq_length'),
    (CLIP_LLAVA, {'image_token_index': 67}, 'image_token_index'),
    (CLIP_LLAVA, {'projector_hidden_act': 'tanh'}, 'projector_hidden_act'),
])
def test_unsupported_configs_name_the_field(base, edit, match):
  with pytest.raises(ValueError, match=match):
    llava.llava_model_config({**base, **edit})


def test_config_defaults_and_aliases():
  """Diff-only configs take LlavaConfig's defaults; image_token_id is accepted; a positive layer index maps."""
  cfg = llava.llava_model_config({k: v for k, v in CLIP_LLAVA.items() if k != 'image_seq_length'})
  assert cfg['encoder']['output_layer'] == -2 and cfg['projector'] == dict(name='mlp', depth=2, act='gelu',
                                                                           use_bias=True)
  alias = {k: v for k, v in CLIP_LLAVA.items() if k != 'image_token_index'}
  assert llava.llava_model_config({**alias, 'image_token_id': 9})['image_token_id'] == 9
  assert llava.llava_model_config({**CLIP_LLAVA, 'vision_feature_layer': 2})['encoder']['output_layer'] == -2
  proc = {'image_processor_type': 'CLIPImageProcessor', 'size': {'shortest_edge': 30},
          'crop_size': {'height': 30, 'width': 30}, 'image_mean': [0.1, 0.2, 0.3]}
  enc = llava.llava_model_config(CLIP_LLAVA, proc)['encoder']
  assert enc['image_mean'] == [0.1, 0.2, 0.3] and enc['image_std'] == list(ImageProcessor.clip().image_std)
  with pytest.raises(ValueError, match='crop_size'):
    llava.llava_model_config(CLIP_LLAVA, {**proc, 'crop_size': {'height': 28, 'width': 28}})
  # A diff-only text config (as released llava-1.5 files have) takes the Llama defaults.
  text = llama.lm_config_from_hf({'model_type': 'llama', 'vocab_size': 32064})
  assert (text['width'], text['depth'], text['num_kv_heads'], text['max_len']) == (4096, 32, 32, 2048)


@pytest.mark.parametrize('lm', [
    dict(rope_scaling={'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
                       'original_max_position_embeddings': 16}),
    dict(sliding_window=5),
    dict(qkv_bias=True, sliding_window=7, head_dim=12),
    dict(qkv_bias=True, tie_embeddings=True),
], ids=['llama3', 'mistral', 'qwen2_window', 'qwen2_tied'])
def test_lm_config_round_trip(lm):
  cfg = dict(vocab_size=67, width=40, depth=2, num_heads=4, num_kv_heads=2, head_dim=10, mlp_dim=52, rope_theta=500.0,
             norm_eps=1e-5, tie_embeddings=False, max_len=64, qkv_bias=False, rope_scaling=None, sliding_window=None)
  cfg.update(lm)
  assert llama.lm_config_from_hf(llama.lm_config_to_hf(cfg)) == cfg


def test_export_refusals(tiny_model_cfg, tmp_path):
  saved_cfg = tiny_model_cfg.to_dict()
  model = mmproj.build_model(tiny_model_cfg)
  batch = {'image': np.zeros((1, 16, 16, 3), np.uint8), 'tokens': np.zeros((1, 20), np.int32),
           'positions': np.zeros((1, 20), np.int32), 'input_mask': np.ones((1, 20), np.int32)}
  shapes = nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), batch))['params'])
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), shapes)   # no init compile
  with pytest.raises(ValueError, match='model.encoder.final_norm'):      # SigLIP-shaped with post_layernorm
    llava.export_llava(saved_cfg, params, str(tmp_path / 'a'))
  cfg = {**saved_cfg, 'encoder': {**saved_cfg['encoder'], 'final_norm': False}}
  params = {**params, 'encoder': {k: v for k, v in params['encoder'].items() if k != 'post_layernorm'}}
  with pytest.raises(ValueError, match='model.projector.name'):
    llava.export_llava({**cfg, 'projector': {'name': 'linear'}}, params, str(tmp_path / 'b'))
  extra = {**params, 'lm': {**params['lm'], 'extra': {'kernel': np.zeros(2)}}}
  with pytest.raises(ValueError, match="'extra/kernel'"):
    llava.export_llava(cfg, extra, str(tmp_path / 'c'))
  with pytest.raises(ValueError, match='cls_token'):
    vision.encoder_config_to_hf({**cfg['encoder'], 'cls_token': True})
  # SigLIP-shaped ViT + Llama LM (image 16/4), given as a ConfigDict as training configs hold it.
  out = llava.export_llava(ml_collections.ConfigDict(cfg), params, str(tmp_path / 'ok'))
  cfg2, params2 = llava.load_llava(out)
  assert_same_params(params2, params)
  assert cfg2['encoder']['image_mean'] == [0.5, 0.5, 0.5]            # unset mean/std == x / 127.5 - 1


def test_transformers5_processor_config_is_read(tmp_path):
  """transformers 5 processors save the image processor inside processor_config.json (no preprocessor_config)."""
  nested = {'image_processor': {'image_processor_type': 'SiglipImageProcessor', 'size': {'height': 32, 'width': 32},
                                'image_mean': [0.1, 0.2, 0.3], 'image_std': [0.4, 0.5, 0.6]}}
  (tmp_path / 'processor_config.json').write_text(json.dumps(nested))
  pp = llava.read_preprocessor_config(str(tmp_path))
  assert pp == nested['image_processor']
  enc = llava.llava_model_config(SIGLIP_LLAVA, pp)['encoder']
  assert (enc['image_mean'], enc['image_std']) == ([0.1, 0.2, 0.3], [0.4, 0.5, 0.6])
