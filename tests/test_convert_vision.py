"""CLIP / SigLIP vision towers from HF directories: f32 parity with transformers, strict key checking."""
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from parity_utils import assert_close, randomize_, seeded, to_torch

from mmproj.convert import CONVERTERS, StateDict, from_transformers, hf_dir
from mmproj.convert import vision

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

ATOL = 1e-4
# Odd sizes on purpose: CLIP 30/6 -> 5x5 grid (+CLS), 3 layers; SigLIP 32/8 -> 4x4 grid, 2 layers.
TOWERS = {
    'clip': ('CLIPVisionConfig', 'CLIPVisionModel',
             dict(image_size=30, patch_size=6, hidden_size=24, intermediate_size=40, num_hidden_layers=3,
                  num_attention_heads=2)),
    'siglip': ('SiglipVisionConfig', 'SiglipVisionModel',
               dict(image_size=32, patch_size=8, hidden_size=48, intermediate_size=72, num_hidden_layers=2,
                    num_attention_heads=4)),
}


@pytest.fixture(scope='module', params=sorted(TOWERS))
def tower(request, tmp_path_factory):
  """(family, torch module, saved directory) for a tiny random tower with randomized LayerNorms."""
  config_cls, model_cls, kwargs = TOWERS[request.param]
  seeded(0)
  model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs))
  randomize_(model, seed=1, std=0.2)
  path = tmp_path_factory.mktemp(request.param)
  model.save_pretrained(str(path), safe_serialization=True)
  return request.param, model, str(path)


def _images(size: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).uniform(-1, 1, (2, size, size, 3)).astype(np.float32)  # [B, H, W, 3]


def _reference(model, images, output_layer: int, family: str):
  with torch.no_grad():
    out = model(pixel_values=to_torch(images.transpose(0, 3, 1, 2)), output_hidden_states=True)
  ref = out.last_hidden_state if output_layer == -1 else out.hidden_states[output_layer]
  return ref[:, 1:] if family == 'clip' else ref


@pytest.mark.parametrize('output_layer', [-1, -2])
def test_directory_parity(tower, output_layer):
  family, model, path = tower
  vit, params = vision.load_vision_tower(path, output_layer=output_layer)
  assert vit.cls_token == (family == 'clip') and vit.pre_norm == (family == 'clip')
  assert vit.final_norm == (family == 'siglip' and output_layer == -1)
  images = _images(vit.image_size)
  # The converted tree is exactly the one the module initialises (no missing or extra leaves).
  shapes = jax.eval_shape(lambda: vit.init(jax.random.key(0), jnp.asarray(images)))['params']
  shapes = jax.tree.map(lambda x: x.shape, nn.meta.unbox(shapes))
  assert jax.tree.map(np.shape, params) == shapes
  tokens, grid = vit.apply({'params': params}, jnp.asarray(images))
  assert grid == (vit.image_size // vit.patch_size,) * 2
  assert_close(tokens, _reference(model, images, output_layer, family), ATOL, f'{family} output_layer={output_layer}')


def test_live_module_converter(tower):
  family, model, _ = tower
  assert {'CLIPVisionModel', 'SiglipVisionModel'} <= set(CONVERTERS)
  vit, params = from_transformers(model)
  images = _images(vit.image_size, seed=1)
  tokens, _ = vit.apply({'params': params}, jnp.asarray(images))
  assert_close(tokens, _reference(model, images, -1, family), ATOL, f'{family} live')


def test_full_config_and_llava_prefix(tower):
  """A LLaVA-style config (vision_config inside) and state-dict prefix give the same tower."""
  family, model, path = tower
  vision_cfg = hf_dir.read_config(path)
  full = {'model_type': 'llava', 'vision_config': vision_cfg, 'text_config': {'model_type': 'llama'}}
  assert vision.encoder_config_from_hf(full, -2) == vision.encoder_config_from_hf(vision_cfg, -2)
  tensors = {f'model.vision_tower.vision_model.{k}': v for k, v in hf_dir.read_safetensors(path).items()}
  tensors['model.multi_modal_projector.linear_1.weight'] = np.zeros((2, 2), np.float32)
  sd = StateDict(tensors)
  cfg = vision.encoder_config_from_hf(full, -2)
  prefix = vision.find_prefix(sd)
  assert prefix == 'model.vision_tower.vision_model.'
  params = vision.encoder_params_from_hf(sd, cfg, prefix)
  sd.finish(ignore=vision.skipped_prefixes(cfg, prefix) + ('model.multi_modal_projector.',))
  vit = vision._build(cfg)
  images = _images(vit.image_size, seed=2)
  tokens, _ = vit.apply({'params': params}, jnp.asarray(images))
  assert_close(tokens, _reference(model, images, -2, family), ATOL, f'{family} llava prefix')


def test_unsupported_configs_are_refused():
  with pytest.raises(ValueError, match='siglip2_vision_model'):
    vision.encoder_config_from_hf({'model_type': 'siglip2_vision_model'})
  with pytest.raises(ValueError, match='output_layer=-4'):
    vision.encoder_config_from_hf({'model_type': 'clip_vision_model', 'num_hidden_layers': 3}, output_layer=-4)
  with pytest.raises(ValueError, match='not a multiple'):
    vision.encoder_config_from_hf({'model_type': 'clip_vision_model', 'image_size': 32, 'patch_size': 6})


def _rewrite(src: str, dst, edit) -> str:
  """Copies an HF directory with its safetensors tensors passed through `edit(dict)`."""
  from safetensors.numpy import save_file
  dst.mkdir()
  shutil.copy(f'{src}/config.json', dst / 'config.json')
  tensors = hf_dir.read_safetensors(src)
  edit(tensors)
  save_file(tensors, str(dst / 'model.safetensors'))
  return str(dst)


def test_pickle_only_directory_is_refused(tower, tmp_path):
  _, _, path = tower
  shutil.copy(f'{path}/config.json', tmp_path / 'config.json')
  (tmp_path / 'pytorch_model.bin').write_bytes(b'not unpickled')
  with pytest.raises(ValueError, match='pytorch_model.bin'):
    vision.load_vision_tower(str(tmp_path))


def test_extra_missing_and_misshaped_keys_are_named(tower, tmp_path):
  _, _, path = tower
  extra = _rewrite(path, tmp_path / 'extra', lambda t: t.update({'encoder.layers.0.extra.weight': np.ones(3)}))
  with pytest.raises(ValueError, match='encoder.layers.0.extra.weight'):
    vision.load_vision_tower(extra)
  top = hf_dir.read_config(path)['num_hidden_layers'] - 1
  missing = _rewrite(path, tmp_path / 'missing', lambda t: t.pop(f'encoder.layers.{top}.mlp.fc2.bias'))
  with pytest.raises(ValueError, match=f"missing key 'encoder.layers.{top}.mlp.fc2.bias'"):
    vision.load_vision_tower(missing)
  # A key of a skipped (truncated) block is not needed: output_layer=-2 loads without the top block.
  vision.load_vision_tower(missing, output_layer=-2)

  def misshape(t):
    t['encoder.layers.0.self_attn.v_proj.weight'] = t['encoder.layers.0.self_attn.v_proj.weight'][:, :-1]
  bad = _rewrite(path, tmp_path / 'bad', misshape)
  with pytest.raises(ValueError, match='encoder.layers.0.self_attn.v_proj.weight.*shape'):
    vision.load_vision_tower(bad)
