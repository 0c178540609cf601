"""CLIP / SigLIP vision towers: transformers weights -> mmproj `ViT` (mmproj/encoders/vit.py).

  cfg_encoder = encoder_config_from_hf(config_dict, output_layer=-2)    # -> cfg.model.encoder (name='vit')
  params = encoder_params_from_hf(StateDict(tensors), cfg_encoder, prefix='vision_model.')
  vit, params = load_vision_tower('/path/to/hf_dir', output_layer=-2)  # config.json + safetensors, no pickle
  vit, params = mmproj.convert.from_transformers(clip_or_siglip_vision_model)   # live torch module
  tokens, grid = vit.apply({'params': params}, image)                  # image [B, H, W, 3] -> [B, N, D] (no CLS)
  hf_vision_config = encoder_config_to_hf(cfg_encoder)                 # export: the inverse mappings
  export_vision_tower(cfg_encoder, params, out_dir)                     # a CLIPVisionModel / SiglipVisionModel dir
  tensors = encoder_params_to_hf(params, cfg_encoder, prefix='vision_tower.vision_model.')

Configs accepted by `encoder_config_from_hf`: a vision config dict (model_type 'clip_vision_model' or
'siglip_vision_model'), or a full config that holds one under 'vision_config' (CLIP, SigLIP, LLaVA, ...). Only the
vision config is read: a LLaVA config's vision_feature_layer / vision_feature_select_strategy are *not* applied;
pass output_layer yourself (LLaVA's vision_feature_layer=-2 is output_layer=-2; strategy 'default' drops CLS, which
is what the ViT returns; 'full' is not supported). SigLIP 2 (NaFlex) towers are not supported.

What the ViT computes, and the HF tensor it equals (f32):
  CLIP   (cls_token, pre_norm=pre_layrnorm, final_norm=False): HF applies post_layernorm only to the pooled CLS
         token, never to last_hidden_state, so
           output_layer=-1  ==  last_hidden_state[:, 1:]        output_layer=k<-1  ==  hidden_states[k][:, 1:]
         post_layernorm is therefore skipped (listed in `skipped_prefixes`).
  SigLIP (no CLS, no pre-norm): HF applies post_layernorm to last_hidden_state only, so final_norm defaults to
         output_layer == -1:
           output_layer=-1  ==  last_hidden_state (final_norm)  output_layer=k<-1  ==  hidden_states[k]
         The attention-pooling head (`head.*`, vision_use_head) is skipped.
  Blocks above output_layer are not built, so their weights are skipped too. Everything else must be taken:
  a missing, mis-shaped or unexpected key raises ValueError naming it.

Weight layout: conv patch weight [D, C, p, p] -> [p, p, C, D] -> [p*p*C, D] (row, col, channel, like the ViT's
patchify); q/k/v Linear [D, D] -> kernel [D, H, Dh]; out_proj [D, D] -> o_proj kernel [H, Dh, D]; CLIP's conv has no
bias (the ViT's patch bias is set to zero). State-dict prefixes: '' (transformers 5 CLIPVisionModel /
SiglipVisionModel), 'vision_model.' (older ones, CLIPModel, SiglipModel), 'vision_tower.vision_model.' or
'model.vision_tower.vision_model.' (LLaVA); `find_prefix` picks it from the keys.

Export (`encoder_config_to_hf`, `encoder_params_to_hf`) inverts the above for a CLIP-shaped (cls_token and pre_norm)
or SigLIP-shaped (neither) ViT. Only the blocks up to output_layer exist in mmproj params, so the exported tower has
num_hidden_layers = the number of built blocks and its last block is the selected one:
  CLIP   hidden_states[-1] (== last_hidden_state) of the export == our output (final_norm=True is refused: HF never
         normalises the patch tokens). post_layernorm (HF always builds it; it only touches the pooled CLS token) is
         written as the identity LayerNorm (weight 1, bias 0). The patch bias must be zero (HF's conv has none).
  SigLIP final_norm=True: last_hidden_state of the export == our output (post_layernorm written from params);
         final_norm=False: hidden_states[-1] == our output, post_layernorm written as the identity. vision_use_head
         is set False (no pooling head in mmproj).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mmproj.convert.base import ParamReader, StateDict, activation, converter, hf_activation
from mmproj.encoders import encoder_fields

# model_type -> (family, HF defaults for fields a saved (diff-only) config may omit).
_FAMILIES = {
    'clip_vision_model': ('clip', dict(image_size=224, patch_size=32, hidden_size=768, intermediate_size=3072,
                                       num_hidden_layers=12, num_attention_heads=12, num_channels=3,
                                       hidden_act='quick_gelu', layer_norm_eps=1e-5)),
    'siglip_vision_model': ('siglip', dict(image_size=224, patch_size=16, hidden_size=768, intermediate_size=3072,
                                           num_hidden_layers=12, num_attention_heads=12, num_channels=3,
                                           hidden_act='gelu_pytorch_tanh', layer_norm_eps=1e-6)),
}
# Top-level model_type of a full config -> model_type of its vision config (when the nested dict omits it).
_PARENT_TYPES = {'clip': 'clip_vision_model', 'siglip': 'siglip_vision_model'}

# Where the tower sits in known checkpoints, tried in order by `find_prefix`.
KNOWN_PREFIXES = ('', 'vision_model.', 'vision_tower.vision_model.', 'model.vision_tower.vision_model.',
                  'vision_tower.', 'model.vision_tower.')
_ANCHOR = 'embeddings.patch_embedding.weight'


def _vision_config(hf_config: dict) -> tuple[str, dict]:
  """(family, vision config dict with HF defaults filled in) of a vision or full config dict."""
  cfg = dict(hf_config)
  if 'vision_config' in cfg:
    parent = cfg.get('model_type')
    cfg = dict(cfg['vision_config'] or {})
    cfg.setdefault('model_type', _PARENT_TYPES.get(parent))
  model_type = cfg.get('model_type')
  if model_type not in _FAMILIES:
    raise ValueError(f'vision config model_type {model_type!r} is not supported; supported: {sorted(_FAMILIES)}')
  family, defaults = _FAMILIES[model_type]
  return family, {**defaults, **{k: v for k, v in cfg.items() if v is not None}}


def _square(value: Any, name: str) -> int:
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or value[0] != value[1]:
      raise ValueError(f'vision config {name}={value!r}: only square sizes are supported')
    value = value[0]
  return int(value)


def encoder_config_from_hf(hf_vision_config: dict, output_layer: int = -1, final_norm: bool | None = None) -> dict:
  """HF CLIP/SigLIP vision config dict (or a full config with 'vision_config') -> cfg.model.encoder for the ViT.

  `final_norm` defaults to HF's semantics (see the module docstring): False for CLIP, output_layer == -1 for
  SigLIP. `output_layer` is checked against the depth.
  """
  family, c = _vision_config(hf_vision_config)
  depth = int(c['num_hidden_layers'])
  if not -depth <= output_layer <= -1:
    raise ValueError(f'output_layer={output_layer} out of range [-{depth}, -1] for a {depth}-layer tower')
  image_size, patch_size = _square(c['image_size'], 'image_size'), _square(c['patch_size'], 'patch_size')
  if image_size % patch_size:
    raise ValueError(f'vision config image_size={image_size} is not a multiple of patch_size={patch_size}')
  width, heads = int(c['hidden_size']), int(c['num_attention_heads'])
  if width % heads:
    raise ValueError(f'vision config hidden_size={width} is not divisible by num_attention_heads={heads}')
  if final_norm is None:
    final_norm = family == 'siglip' and output_layer == -1
  return dict(
      name='vit', image_size=image_size, patch_size=patch_size, width=width, depth=depth, num_heads=heads,
      mlp_dim=int(c['intermediate_size']), output_layer=int(output_layer), cls_token=family == 'clip',
      pre_norm=family == 'clip', final_norm=bool(final_norm), norm_eps=float(c['layer_norm_eps']),
      act=activation(c['hidden_act'], f'{family} vision config hidden_act'))


def find_prefix(sd: StateDict) -> str:
  """The key prefix of the vision tower in `sd` (one of KNOWN_PREFIXES); ValueError when there is none."""
  for prefix in KNOWN_PREFIXES:
    if prefix + _ANCHOR in sd:
      return prefix
  raise ValueError(f'{sd.where}: no vision tower found (no key {_ANCHOR!r} under any of {list(KNOWN_PREFIXES)})')


def _num_blocks(cfg: dict) -> int:
  return cfg['depth'] + cfg['output_layer'] + 1


def skipped_prefixes(cfg_encoder: dict, prefix: str = '') -> tuple[str, ...]:
  """Key prefixes of the tower that `encoder_params_from_hf` deliberately leaves: the blocks above output_layer,
  post_layernorm when final_norm is off, SigLIP's pooling head, and the position_ids buffer of old checkpoints."""
  cfg = encoder_fields(cfg_encoder)
  skipped = [f'{prefix}encoder.layers.{i}.' for i in range(_num_blocks(cfg), cfg['depth'])]
  if not cfg['final_norm']:
    skipped.append(f'{prefix}post_layernorm.')
  skipped += [f'{prefix}head.', f'{prefix}embeddings.position_ids']
  return tuple(skipped)


def encoder_params_from_hf(sd: StateDict, cfg_encoder: dict, prefix: str = '') -> dict:
  """Takes the vision tower under `prefix` from `sd` -> ViT params. Does not call `sd.finish()` (the state dict may
  hold other towers); callers finish with `ignore=skipped_prefixes(cfg_encoder, prefix)` (+ their own keys)."""
  cfg = encoder_fields(cfg_encoder)
  d, p, f, h = cfg['width'], cfg['patch_size'], cfg['mlp_dim'], cfg['num_heads']
  dh = d // h
  e = f'{prefix}embeddings.'
  conv = sd.take(f'{e}patch_embedding.weight')                                # [D, C, p, p]
  if conv.ndim != 4 or conv.shape[0] != d or conv.shape[2:] != (p, p):
    raise ValueError(f'{sd.where}: {e}patch_embedding.weight has shape {conv.shape}, expected ({d}, C, {p}, {p})')
  params: dict[str, Any] = {'patch_embedding': {
      'kernel': conv.transpose(2, 3, 1, 0).reshape(p * p * conv.shape[1], d),  # [p*p*C, D] (row, col, channel)
      'bias': (sd.take(f'{e}patch_embedding.bias', (d,)) if f'{e}patch_embedding.bias' in sd
               else np.zeros((d,), np.float32))}}
  n = (cfg['image_size'] // p) ** 2 + (1 if cfg['cls_token'] else 0)
  if cfg['cls_token']:
    params['class_embedding'] = sd.take(f'{e}class_embedding', (d,))
  params['position_embedding'] = sd.take(f'{e}position_embedding.weight', (n, d))  # [N(+1), D]
  if cfg['pre_norm']:
    params['pre_layernorm'] = _norm(sd, f'{prefix}pre_layrnorm', d)

  for i in range(_num_blocks(cfg)):
    b = f'{prefix}encoder.layers.{i}.'
    attn = {}
    for ours, theirs in (('q_proj', 'q_proj'), ('k_proj', 'k_proj'), ('v_proj', 'v_proj')):
      attn[ours] = {'kernel': sd.kernel(f'{b}self_attn.{theirs}', d, d).reshape(d, h, dh),       # [D, H, Dh]
                    'bias': sd.take(f'{b}self_attn.{theirs}.bias', (d,)).reshape(h, dh)}          # [H, Dh]
    attn['o_proj'] = {'kernel': sd.kernel(f'{b}self_attn.out_proj', d, d).reshape(h, dh, d),     # [H, Dh, D]
                      'bias': sd.take(f'{b}self_attn.out_proj.bias', (d,))}
    params[f'layers_{i}'] = {
        'layer_norm1': _norm(sd, f'{b}layer_norm1', d), 'self_attn': attn,
        'layer_norm2': _norm(sd, f'{b}layer_norm2', d),
        'mlp': {'fc1': {'kernel': sd.kernel(f'{b}mlp.fc1', d, f), 'bias': sd.take(f'{b}mlp.fc1.bias', (f,))},
                'fc2': {'kernel': sd.kernel(f'{b}mlp.fc2', f, d), 'bias': sd.take(f'{b}mlp.fc2.bias', (d,))}}}
  if cfg['final_norm']:
    params['post_layernorm'] = _norm(sd, f'{prefix}post_layernorm', d)
  return params


def _norm(sd: StateDict, prefix: str, d: int) -> dict:
  return {'scale': sd.take(f'{prefix}.weight', (d,)), 'bias': sd.take(f'{prefix}.bias', (d,))}


def _build(cfg_encoder: dict):
  from mmproj.encoders import build_encoder
  return build_encoder(cfg_encoder)


def vision_tower_from_state_dict(sd: StateDict, hf_config: dict, output_layer: int = -1,
                                 prefix: str | None = None, final_norm: bool | None = None):
  """(ViT, params) from a state dict holding *only* a vision tower (under `prefix`, found when None). Every key not
  taken must be in `skipped_prefixes`, else ValueError naming it."""
  cfg = encoder_config_from_hf(hf_config, output_layer, final_norm)
  prefix = find_prefix(sd) if prefix is None else prefix
  params = encoder_params_from_hf(sd, cfg, prefix)
  sd.finish(ignore=skipped_prefixes(cfg, prefix))
  return _build(cfg), params


def load_vision_tower(path: str, output_layer: int = -1, final_norm: bool | None = None):
  """An HF CLIPVisionModel / SiglipVisionModel directory (config.json + safetensors) -> (ViT, params).

  Reads safetensors only (a pickle-only directory fails naming the file). The directory must hold just the vision
  tower (any prefix in KNOWN_PREFIXES); for a full CLIP/LLaVA checkpoint use `encoder_params_from_hf` with the
  prefix and finish the StateDict yourself.
  """
  from mmproj.convert import hf_dir
  config = hf_dir.read_config(path)
  sd = StateDict(hf_dir.read_safetensors(path), where=path)
  return vision_tower_from_state_dict(sd, config, output_layer, final_norm=final_norm)


@converter('CLIPVisionModel', 'SiglipVisionModel')
def vision_tower(module: Any, output_layer: int = -1, final_norm: bool | None = None):
  """A live transformers CLIPVisionModel / SiglipVisionModel -> (ViT, params); see the module docstring for which
  HF output the ViT reproduces."""
  return vision_tower_from_state_dict(StateDict.of(module), module.config.to_dict(), output_layer,
                                      final_norm=final_norm)


# -- export: mmproj ViT -> HF CLIP / SigLIP vision tower ----------------------------------------------------------

# ViT field defaults (mmproj/encoders/vit.py), for cfg.model.encoder dicts that leave fields out.
def _vit_config(cfg_encoder: Any) -> dict:
  cfg = encoder_fields(cfg_encoder)
  if cfg['name'] != 'vit':
    raise ValueError(f"model.encoder.name={cfg['name']!r}: only the 'vit' encoder exports to CLIP / SigLIP")
  if cfg['temporal_patch_size'] != 1:
    raise ValueError(f"model.encoder.temporal_patch_size={cfg['temporal_patch_size']}: CLIP / SigLIP towers embed "
                     'one frame per patch (1)')
  return cfg


def encoder_family(cfg_encoder: Any) -> str:
  """'clip' (cls_token and pre_norm) or 'siglip' (neither) for a ViT config; ValueError naming the fields else."""
  cfg = _vit_config(cfg_encoder)
  if cfg['cls_token'] and cfg['pre_norm']:
    return 'clip'
  if not cfg['cls_token'] and not cfg['pre_norm']:
    return 'siglip'
  raise ValueError(f"model.encoder.cls_token={cfg['cls_token']} with model.encoder.pre_norm={cfg['pre_norm']} is "
                   'neither CLIP-shaped (both True) nor SigLIP-shaped (both False): no HF vision tower matches')


def encoder_config_to_hf(cfg_encoder: Any) -> dict:
  """cfg.model.encoder (ViT) -> an HF CLIPVisionConfig / SiglipVisionConfig dict of the *built* tower
  (num_hidden_layers = blocks up to output_layer); see the module docstring for which HF output equals ours."""
  cfg = _vit_config(cfg_encoder)
  family = encoder_family(cfg)
  if family == 'clip' and cfg['final_norm']:
    raise ValueError('model.encoder.final_norm=True on a CLIP-shaped ViT: HF CLIP applies post_layernorm to the '
                     'pooled CLS token only, so no HF output normalises the patch tokens')
  out = dict(
      model_type=f'{family}_vision_model', hidden_size=int(cfg['width']), intermediate_size=int(cfg['mlp_dim']),
      num_hidden_layers=_num_blocks(cfg), num_attention_heads=int(cfg['num_heads']), num_channels=3,
      image_size=int(cfg['image_size']), patch_size=int(cfg['patch_size']),
      hidden_act=hf_activation(cfg['act'], 'model.encoder.act'), layer_norm_eps=float(cfg['norm_eps']))
  if family == 'siglip':
    out['vision_use_head'] = False
  return out


def encoder_params_to_hf(params: Any, cfg_encoder: Any, prefix: str = '') -> dict[str, np.ndarray]:
  """ViT params -> {HF key: float32 array} of a CLIPVisionModel / SiglipVisionModel under `prefix`, for the tower
  `encoder_config_to_hf(cfg_encoder)` describes. Every param must be used and have the configured shape (ValueError
  naming the param path otherwise)."""
  cfg = _vit_config(cfg_encoder)
  family = encoder_family(cfg)
  encoder_config_to_hf(cfg)                                                  # the same refusals
  r = ParamReader(params, where='encoder params')
  d, p, f, h = int(cfg['width']), int(cfg['patch_size']), int(cfg['mlp_dim']), int(cfg['num_heads'])
  dh = d // h
  e = f'{prefix}embeddings.'
  out: dict[str, np.ndarray] = {}
  kernel = r.take('patch_embedding/kernel', (p * p * 3, d))                 # [p*p*C, D] (row, col, channel)
  out[f'{e}patch_embedding.weight'] = kernel.reshape(p, p, 3, d).transpose(3, 2, 0, 1)  # [D, C, p, p]
  bias = r.take('patch_embedding/bias', (d,))
  if family == 'siglip':
    out[f'{e}patch_embedding.bias'] = bias
  elif np.any(bias != 0):
    raise ValueError('encoder params: patch_embedding/bias is non-zero, but HF CLIP\'s patch conv has no bias')
  n = (int(cfg['image_size']) // p) ** 2 + (1 if family == 'clip' else 0)
  if family == 'clip':
    out[f'{e}class_embedding'] = r.take('class_embedding', (d,))
  out[f'{e}position_embedding.weight'] = r.take('position_embedding', (n, d))   # [N(+1), D]
  if family == 'clip':
    out[f'{prefix}pre_layrnorm.weight'] = r.take('pre_layernorm/scale', (d,))
    out[f'{prefix}pre_layrnorm.bias'] = r.take('pre_layernorm/bias', (d,))
  for i in range(_num_blocks(cfg)):
    b, q = f'{prefix}encoder.layers.{i}.', f'layers_{i}/'
    for norm in ('layer_norm1', 'layer_norm2'):
      out[f'{b}{norm}.weight'] = r.take(f'{q}{norm}/scale', (d,))
      out[f'{b}{norm}.bias'] = r.take(f'{q}{norm}/bias', (d,))
    for name in ('q_proj', 'k_proj', 'v_proj'):
      out[f'{b}self_attn.{name}.weight'] = r.take(f'{q}self_attn/{name}/kernel', (d, h, dh)).reshape(d, d).T
      out[f'{b}self_attn.{name}.bias'] = r.take(f'{q}self_attn/{name}/bias', (h, dh)).reshape(d)
    out[f'{b}self_attn.out_proj.weight'] = r.take(f'{q}self_attn/o_proj/kernel', (h, dh, d)).reshape(d, d).T
    out[f'{b}self_attn.out_proj.bias'] = r.take(f'{q}self_attn/o_proj/bias', (d,))
    out[f'{b}mlp.fc1.weight'] = r.take(f'{q}mlp/fc1/kernel', (d, f)).T                    # [F, D]
    out[f'{b}mlp.fc1.bias'] = r.take(f'{q}mlp/fc1/bias', (f,))
    out[f'{b}mlp.fc2.weight'] = r.take(f'{q}mlp/fc2/kernel', (f, d)).T                    # [D, F]
    out[f'{b}mlp.fc2.bias'] = r.take(f'{q}mlp/fc2/bias', (d,))
  if cfg['final_norm']:
    out[f'{prefix}post_layernorm.weight'] = r.take('post_layernorm/scale', (d,))
    out[f'{prefix}post_layernorm.bias'] = r.take('post_layernorm/bias', (d,))
  else:                                       # HF always builds it; the identity keeps its (unused here) output plain
    out[f'{prefix}post_layernorm.weight'] = np.ones((d,), np.float32)
    out[f'{prefix}post_layernorm.bias'] = np.zeros((d,), np.float32)
  r.finish()
  return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


VISION_ARCHITECTURES = {'clip': 'CLIPVisionModel', 'siglip': 'SiglipVisionModel'}
IMAGE_PROCESSOR_TYPES = {'clip': 'CLIPImageProcessor', 'siglip': 'SiglipImageProcessor'}
PREPROCESSOR_FILE = 'preprocessor_config.json'


def image_processor_for(cfg_encoder: Any):
  """The CLIP / SigLIP ImageProcessor matching a ViT config: the family's resize (shortest edge + center crop for
  CLIP, a square resize for SigLIP) to image_size, and its image_mean / image_std (0.5 when unset: x / 127.5 - 1)."""
  from mmproj.data.preprocess import ImageProcessor

  enc = encoder_fields(cfg_encoder)
  size = int(enc['image_size'])
  mean = enc['image_mean'] or (0.5, 0.5, 0.5)            # unset: the model's x / 127.5 - 1
  std = enc['image_std'] or (0.5, 0.5, 0.5)
  if encoder_family(enc) == 'clip':
    return ImageProcessor.clip(size=size, crop_size=(size, size), image_mean=mean, image_std=std)
  return ImageProcessor.siglip(size=(size, size), image_mean=mean, image_std=std)




def export_vision_tower(cfg_encoder: Any, params: Any, out_dir: str) -> str:
  """Writes ViT params as an HF directory that `CLIPVisionModel` / `SiglipVisionModel.from_pretrained(out_dir)`
  loads with no missing or unexpected keys: config.json, model.safetensors (float32) and preprocessor_config.json
  (the family's resize to image_size, the encoder's image_mean / image_std). Returns out_dir."""
  from mmproj.convert import hf_dir

  family = encoder_family(cfg_encoder)
  config = {**encoder_config_to_hf(cfg_encoder), 'architectures': [VISION_ARCHITECTURES[family]]}
  return hf_dir.write_dir(out_dir, config, encoder_params_to_hf(params, cfg_encoder), json_files={
      PREPROCESSOR_FILE: {'image_processor_type': IMAGE_PROCESSOR_TYPES[family],
                          **image_processor_for(cfg_encoder).to_hf_config()}})
