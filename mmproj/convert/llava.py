"""LLaVA-1.5 (llava-hf `LlavaForConditionalGeneration`) <-> mmproj: config, weights, whole HF directories.

  cfg_model, params = load_llava('/path/to/llava-hf-dir')        # config.json + safetensors (+ preprocessor config)
  model = mmproj.build_model(ml_collections.ConfigDict(cfg_model))
  logits = model.apply({'params': params}, batch)                  # == HF logits on the same images / tokens
  model, params = mmproj.convert.from_transformers(llava_module)   # a live LlavaForConditionalGeneration
  export_llava(cfg_model, params, out_dir, tokenizer_file=...)     # -> a directory HF from_pretrained loads
  module, params = mmproj.convert.from_transformers(llava_module.model.multi_modal_projector)  # projector alone

Config (HF LlavaConfig dict -> cfg.model, `llava_model_config`):
  vision_config (CLIP / SigLIP) -> encoder (vision.encoder_config_from_hf) with output_layer = vision_feature_layer
      (a non-negative index k into HF's depth+1 hidden_states is k - depth - 1) and final_norm=False: LLaVA reads
      hidden_states[k], which HF never passes through post_layernorm (CLIP or SigLIP alike).
      image_mean / image_std from the preprocessor config (else the family's defaults), applied in the model to
      uint8 images as (x / 255 - mean) / std, exactly HF's rescale + normalise.
  projector_hidden_act, multimodal_projector_bias -> projector mlp, depth 2 (linear_1, act, linear_2)
  text_config (llama / mistral / qwen2) -> lm (llama.lm_config_from_hf); tied embeddings when the top-level or the
      text config's tie_word_embeddings is set (LlavaConfig copies the text flag up)
  image_token_index (attribute image_token_id) -> image_token_id; image_seq_length must equal the patch count.
  Refused with a ValueError naming the HF field: a list vision_feature_layer (concatenated layers), and a
  vision_feature_select_strategy that does not yield exactly the patch tokens -- mmproj's ViT returns the patches
  without CLS, which is HF's 'default' for CLIP (it drops the CLS token) but 'full' for SigLIP (no CLS, and
  'default' would drop the first patch).
  Saved configs may be diff-only (transformers 4): absent fields take LlavaConfig's defaults (`LLAVA_DEFAULTS`;
  no vision_config is the llava-1.5 CLIP ViT-L/14-336, no text_config a default Llama).

Weights (`llava_params_from_hf`); two key layouts are accepted and told apart by their keys:
  saved  vision_tower[.vision_model].*        multi_modal_projector.*          language_model.model.*
         language_model.lm_head.weight        (what llava-hf released -- with '.vision_model' -- and what
                                               transformers 5.23 save_pretrained writes -- without it)
  live   model.vision_tower[.vision_model].*  model.multi_modal_projector.*    model.language_model.*
         lm_head.weight                       (state_dict() of the transformers >= 4.52 module; 5.x drops
                                               '.vision_model')
  The tower's blocks above output_layer, its post_layernorm and SigLIP's pooling head are skipped on purpose
  (`llava_skipped_prefixes`); any other key left unused, a missing key or a wrong shape raises ValueError naming it.
  Projector: torch Linear (out, in) -> kernel (in, out): linear_1 [Dv, Dt], linear_2 [Dt, Dt].

Export (`export_llava`) writes the *saved* layout as llava-hf released it (`vision_tower.vision_model.*`): it loads in
transformers 4.x (natively before 4.52, through _checkpoint_conversion_mapping after) and in 5.x (whose conversion
mapping renames it on load), while 5.x's own save layout (no '.vision_model') does not load in 4.x. Only the blocks up
to output_layer exist in mmproj params, so the exported tower has num_hidden_layers = those blocks and
vision_feature_layer = -1: HF's hidden_states[-1] of the truncated tower is the same tensor (pre post_layernorm, for
CLIP and SigLIP). post_layernorm is written as the identity, SigLIP gets vision_use_head=False. Reloading an export
therefore gives encoder depth = built blocks and output_layer = -1 with identical params. Refused: an encoder with
final_norm=True (LLaVA never normalises the selected layer), projectors other than mlp depth 2, LM fields HF cannot
hold (see llama.lm_config_to_hf).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, NamedTuple

import numpy as np

from mmproj import config_lib, projectors
from mmproj.convert.base import ParamReader, StateDict, activation, converter, hf_activation
from mmproj.convert import llama, vision
from mmproj.encoders import encoder_fields
from mmproj.lm import lm_fields

# LlavaConfig (transformers 5) defaults for the fields read here; a diff-only config.json omits fields equal to these.
LLAVA_DEFAULTS = dict(image_token_index=32000, image_seq_length=576, projector_hidden_act='gelu',
                      vision_feature_select_strategy='default', vision_feature_layer=-2,
                      multimodal_projector_bias=True, tie_word_embeddings=False)
# LlavaConfig's vision_config when the file has none (llava-1.5's CLIP ViT-L/14 at 336 px).
DEFAULT_VISION_CONFIG = dict(model_type='clip_vision_model', intermediate_size=4096, hidden_size=1024, patch_size=14,
                             image_size=336, num_hidden_layers=24, num_attention_heads=16, projection_dim=768)
# The vision_feature_select_strategy whose output is exactly the patch tokens (what mmproj's ViT returns).
PATCH_STRATEGY = {'clip': 'default', 'siglip': 'full'}
IMAGE_PROCESSOR_TYPES, PREPROCESSOR_FILE = vision.IMAGE_PROCESSOR_TYPES, vision.PREPROCESSOR_FILE
image_processor_for = vision.image_processor_for
PROCESSOR_FILE = 'processor_config.json'        # transformers 5 processors nest the image processor in here


@converter('LlavaMultiModalProjector')
def llava_projector(module: Any):
  """A live LlavaMultiModalProjector -> (mmproj mlp projector, params)."""
  sd = StateDict.of(module)
  bias = 'linear_1.bias' in sd
  p = {'linear_1': sd.dense('linear_1', bias), 'linear_2': sd.dense('linear_2', bias)}
  sd.finish()
  in_dim, out_dim = p['linear_1']['kernel'].shape
  act = activation(module.act, 'LlavaMultiModalProjector.act (projector_hidden_act)')
  cfg = dict(name='mlp', depth=2, act=act, use_bias=bias)
  return projectors.build(cfg, in_dim=in_dim, out_dim=out_dim), p


# -- config -------------------------------------------------------------------------------------------------------


def _output_layer(layer: Any, depth: int) -> int:
  """HF vision_feature_layer (an index into the depth+1 hidden_states) -> ViT output_layer in [-depth, -1]."""
  if isinstance(layer, (list, tuple)):
    raise ValueError(f'vision_feature_layer={list(layer)}: several concatenated layers are not supported (the ViT '
                     'returns one layer); use a single int')
  if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
    raise ValueError(f'vision_feature_layer={layer!r} must be an int')
  layer = int(layer)
  out = layer - depth - 1 if layer >= 0 else layer
  if not -depth <= out <= -1:
    raise ValueError(f'vision_feature_layer={layer} selects no block output of the {depth}-layer vision tower '
                     f'(hidden_states[0] is the embeddings); use one of [-{depth}, -1] or [1, {depth}]')
  return out


def _image_normalisation(preprocessor_config: dict | None, family: str, image_size: int):
  """(image_mean, image_std) the model applies to uint8 images, from a preprocessor config or the family default."""
  from mmproj.data.preprocess import ImageProcessor

  if preprocessor_config is None:
    proc = ImageProcessor.clip() if family == 'clip' else ImageProcessor.siglip()
    return list(proc.image_mean), list(proc.image_std)
  pp = dict(preprocessor_config)
  named = 'image_processor_type' in pp or 'feature_extractor_type' in pp
  proc = ImageProcessor.from_hf_config(pp, kind=None if named else family)
  if not proc.do_rescale or abs(proc.rescale_factor * 255 - 1) > 1e-9:
    raise ValueError(f'preprocessor config do_rescale={proc.do_rescale}, rescale_factor={proc.rescale_factor}: '
                     'the model normalises uint8 images as x / 255 (do_rescale with rescale_factor 1/255 only)')
  if proc.do_center_crop:
    if proc.crop_size != (image_size, image_size):
      raise ValueError(f'preprocessor config crop_size={proc.crop_size} does not give the vision tower\'s '
                       f'{image_size}x{image_size} images')
  elif proc.do_resize and proc.size not in (image_size, (image_size, image_size)):
    raise ValueError(f'preprocessor config size={proc.size} does not give the vision tower\'s '
                     f'{image_size}x{image_size} images')
  if not proc.do_normalize:
    return [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
  return list(proc.image_mean), list(proc.image_std)


def llava_model_config(hf_config: dict, preprocessor_config: dict | None = None) -> dict:
  """An HF LlavaConfig dict (config.json) -> a complete cfg.model dict for `mmproj.build_model` (see the module
  docstring for the mapping and what is refused, always with a ValueError naming the HF field)."""

  from mmproj import model as mm

  hf = {**LLAVA_DEFAULTS, **{k: v for k, v in dict(hf_config).items() if v is not None}}
  if hf.get('model_type', 'llava') != 'llava':
    raise ValueError(f"model_type={hf['model_type']!r} is not 'llava'")
  vision_cfg = dict(hf.get('vision_config') or DEFAULT_VISION_CONFIG)
  vision_cfg.setdefault('model_type', 'clip_vision_model')
  family, filled = vision._vision_config(vision_cfg)
  output_layer = _output_layer(hf['vision_feature_layer'], int(filled['num_hidden_layers']))
  strategy = hf['vision_feature_select_strategy']
  if strategy != PATCH_STRATEGY[family]:
    raise ValueError(f'vision_feature_select_strategy={strategy!r} is not supported for a {family} tower: only '
                     f'{PATCH_STRATEGY[family]!r} selects exactly the patch tokens (no CLS) that the mmproj ViT '
                     'returns')
  encoder = vision.encoder_config_from_hf(vision_cfg, output_layer=output_layer, final_norm=False)
  encoder['image_mean'], encoder['image_std'] = _image_normalisation(preprocessor_config, family,
                                                                     encoder['image_size'])

  text_cfg = dict(hf.get('text_config') or {})
  text_cfg.setdefault('model_type', 'llama')
  lm = llama.lm_config_from_hf(text_cfg)
  lm['tie_embeddings'] = bool(hf['tie_word_embeddings'] or lm['tie_embeddings'])

  raw = dict(hf_config)                   # image_token_index; LlavaConfig's attribute_map calls it image_token_id
  image_token_id = raw.get('image_token_index', raw.get('image_token_id'))
  image_token_id = LLAVA_DEFAULTS['image_token_index'] if image_token_id is None else image_token_id
  if not 0 <= int(image_token_id) < lm['vocab_size']:
    raise ValueError(f'image_token_index={image_token_id} is not in [0, text_config.vocab_size={lm["vocab_size"]})')
  projector = dict(name='mlp', depth=2, act=activation(hf['projector_hidden_act'], 'projector_hidden_act'),
                   use_bias=bool(hf['multimodal_projector_bias']))
  cfg = config_lib.model_config(image_token_id=int(image_token_id), encoder=encoder, projector=projector, lm=lm)
  mm.validate(cfg)
  if dict(hf_config).get('image_seq_length') is not None:
    n = mm.num_image_tokens(cfg)
    if int(hf_config['image_seq_length']) != n:
      raise ValueError(f"image_seq_length={hf_config['image_seq_length']} differs from the {n} patch tokens of the "
                       f"vision tower ({encoder['image_size']}/{encoder['patch_size']} px)")
  return cfg.to_dict()


def model_fields_from_dirs(vision_dir: str, lm_dir: str, tokenizer_path: str, *, output_layer: int = -2,
                           image_token: str = '<image>') -> tuple[dict, dict, int]:
  """(cfg.model.encoder, cfg.model.lm, image_token_id) describing a vision tower and an LM in HF directories and a
  tokenizer.json holding <image>: the fields a config for those towers sets (configs/llava15_*.py describe
  LLaVA-1.5's; a run checks its init directories against them). The LM's vocabulary is the larger of the
  checkpoint's and the tokenizer's, rounded up to a multiple of 64 (32000 + <image> + <pad> -> 32064, as llava-hf);
  the rows added start at the mean embedding (train/pretrained.py). Image mean / std come from the tower's
  preprocessor_config.json, else CLIP's (a tower with a CLS token) or SigLIP's."""
  from mmproj.convert import hf_dir
  from mmproj.data import preprocess

  vision_dir, lm_dir, tokenizer_path = (os.path.expanduser(p) for p in (vision_dir, lm_dir, tokenizer_path))
  encoder = vision.encoder_config_from_hf(hf_dir.read_config(vision_dir), output_layer=output_layer)
  clip = encoder['cls_token']
  encoder['image_mean'] = list(preprocess.OPENAI_CLIP_MEAN if clip else preprocess.IMAGENET_STANDARD_MEAN)
  encoder['image_std'] = list(preprocess.OPENAI_CLIP_STD if clip else preprocess.IMAGENET_STANDARD_STD)
  if os.path.isfile(os.path.join(vision_dir, 'preprocessor_config.json')):
    processor = preprocess.ImageProcessor.from_dir(vision_dir)
    encoder['image_mean'], encoder['image_std'] = list(processor.image_mean), list(processor.image_std)
  lm = llama.lm_config_from_hf(hf_dir.read_config(lm_dir))
  tok_file = os.path.join(tokenizer_path, 'tokenizer.json') if os.path.isdir(tokenizer_path) else tokenizer_path
  with open(tok_file) as f:
    tok = json.load(f)
  ids = dict(tok['model'].get('vocab') or {})
  ids.update({t['content']: t['id'] for t in tok.get('added_tokens', [])})
  if image_token not in ids:
    raise ValueError(f'{tok_file}: no {image_token} token (use a LLaVA tokenizer.json, e.g. llava-hf/llava-1.5-7b-hf\'s, '
                     'or add it as a special token)')
  lm['vocab_size'] = -(-max(lm['vocab_size'], max(ids.values()) + 1) // 64) * 64
  return encoder, lm, ids[image_token]


# -- weights: HF -> mmproj ----------------------------------------------------------------------------------------


class Layout(NamedTuple):
  """Key prefixes of the LLaVA parts in one state-dict layout."""
  name: str
  vision: tuple[str, ...]      # candidate tower prefixes, tried in order
  projector: str
  lm: str
  lm_head: str


LAYOUTS = (
    Layout('saved', ('vision_tower.vision_model.', 'vision_tower.'), 'multi_modal_projector.',
           *llama.PREFIXES['llava_legacy']),
    Layout('live', ('model.vision_tower.vision_model.', 'model.vision_tower.'), 'model.multi_modal_projector.',
           *llama.PREFIXES['llava']),
)
EXPORT_LAYOUT = LAYOUTS[0]
EXPORT_VISION_PREFIX = 'vision_tower.vision_model.'      # llava-hf's released files


def find_layout(sd: StateDict) -> tuple[Layout, str]:
  """(layout, vision tower prefix) of a LLaVA state dict, told apart by the projector and embedding keys."""
  found = [lay for lay in LAYOUTS
           if f'{lay.projector}linear_1.weight' in sd or f'{lay.lm}embed_tokens.weight' in sd]
  if len(found) != 1:
    wanted = [k for lay in LAYOUTS for k in (f'{lay.projector}linear_1.weight', f'{lay.lm}embed_tokens.weight')]
    what = 'no' if not found else 'more than one'
    raise ValueError(f'{sd.where}: {what} LLaVA key layout found (looked for {wanted})')
  layout = found[0]
  for prefix in layout.vision:
    if f'{prefix}embeddings.patch_embedding.weight' in sd:
      return layout, prefix
  raise ValueError(f'{sd.where}: no vision tower in the {layout.name} layout (no key '
                   f'{[p + "embeddings.patch_embedding.weight" for p in layout.vision]})')


def llava_skipped_prefixes(cfg_model: Any, vision_prefix: str) -> tuple[str, ...]:
  """Keys deliberately left: the tower's blocks above output_layer, post_layernorm, SigLIP's head, position_ids."""
  return vision.skipped_prefixes(dict(cfg_model['encoder']), vision_prefix)


def _llava_projector(cfg_projector: Any, dv: int, dt: int):
  """The projector module of cfg.model.projector; ValueError unless it is LLaVA's (mlp, depth 2)."""
  proj = projectors.build(cfg_projector, in_dim=dv, out_dim=dt) if cfg_projector['name'] == 'mlp' else None
  if proj is None or proj.depth != 2:
    raise ValueError(f"model.projector.name={cfg_projector['name']!r}, depth={getattr(proj, 'depth', None)}: "
                     "LLaVA's projector is mlp with depth 2")
  return proj


def _projector_params(sd: StateDict, prefix: str, cfg_projector: dict, dv: int, dt: int) -> dict:
  proj = _llava_projector(cfg_projector, dv, dt)
  p = {'linear_1': {'kernel': sd.kernel(f'{prefix}linear_1', dv, dt)},                 # [Dv, Dt]
       'linear_2': {'kernel': sd.kernel(f'{prefix}linear_2', dt, dt)}}                 # [Dt, Dt]
  if proj.use_bias:
    p['linear_1']['bias'] = sd.take(f'{prefix}linear_1.bias', (dt,))
    p['linear_2']['bias'] = sd.take(f'{prefix}linear_2.bias', (dt,))
  return p


def llava_params_from_hf(sd: StateDict, cfg_model: Any) -> dict:
  """A LLaVA state dict (either layout) -> {'encoder', 'projector', 'lm'} params for `cfg_model`; finishes `sd`."""
  layout, vision_prefix = find_layout(sd)
  cfg_encoder, cfg_lm = dict(cfg_model['encoder']), dict(cfg_model['lm'])
  params = {'encoder': vision.encoder_params_from_hf(sd, cfg_encoder, vision_prefix),
            'projector': _projector_params(sd, layout.projector, dict(cfg_model['projector']),
                                           cfg_encoder['width'], cfg_lm['width']),
            'lm': llama.lm_params_from_hf(sd, cfg_lm, layout.lm, layout.lm_head)}
  sd.finish(ignore=llava_skipped_prefixes(cfg_model, vision_prefix))
  return params


def _read_json(file: str) -> dict:
  try:
    with open(file) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f'{file}: malformed JSON ({e})') from None


def read_preprocessor_config(path: str) -> dict | None:
  """The image processor config of an HF directory: preprocessor_config.json, else the 'image_processor' entry of
  a transformers 5 processor_config.json, else None."""
  file = os.path.join(path, PREPROCESSOR_FILE)
  if os.path.isfile(file):
    return _read_json(file)
  file = os.path.join(path, PROCESSOR_FILE)
  if os.path.isfile(file):
    nested = _read_json(file).get('image_processor')
    if isinstance(nested, dict):
      return nested
  return None


def load_llava(path: str) -> tuple[dict, dict]:
  """An HF LLaVA directory (config.json + safetensors, preprocessor config when present) -> (cfg_model, params).
  Safetensors only; every tensor must be used (or deliberately skipped), else ValueError naming the key."""
  from mmproj.convert import hf_dir

  config = hf_dir.read_config(path)
  archs = config.get('architectures') or []
  if archs and 'LlavaForConditionalGeneration' not in archs:
    raise ValueError(f'{path}/config.json: architectures {archs} do not include LlavaForConditionalGeneration')
  cfg_model = llava_model_config(config, read_preprocessor_config(path))
  sd = StateDict(hf_dir.read_safetensors(path), where=path)
  return cfg_model, llava_params_from_hf(sd, cfg_model)


@converter('LlavaForConditionalGeneration')
def llava(module: Any):
  """A live transformers LlavaForConditionalGeneration -> (mmproj MultimodalLM, params). Images are normalised with
  the tower family's default mean/std (a module carries no preprocessor config)."""
  import ml_collections

  from mmproj.model import build_model

  cfg_model = llava_model_config(module.config.to_dict())
  params = llava_params_from_hf(StateDict.of(module), cfg_model)
  return build_model(ml_collections.ConfigDict(cfg_model)), params


# -- export: mmproj -> HF -----------------------------------------------------------------------------------------


def _check_exportable(cfg_model: Any) -> tuple[dict, dict, dict]:
  if not cfg_model['use_image']:
    raise ValueError('model.use_image=False: a blind LM is not a LLaVA model (export the LM with llama.py)')
  enc, lm = encoder_fields(cfg_model['encoder']), lm_fields(cfg_model['lm'])
  proj = _llava_projector(cfg_model['projector'], enc['width'], lm['width'])
  if enc['final_norm']:
    raise ValueError('model.encoder.final_norm=True: LLaVA feeds the projector hidden_states[k], which HF never '
                     'passes through post_layernorm')
  return enc, proj, lm


def llava_config_to_hf(cfg_model: Any, *, bos_token_id: int | None = None, eos_token_id: Any = None,
                       pad_token_id: int | None = None) -> dict:
  """cfg.model -> an HF LlavaConfig dict (config.json) describing the exported (truncated) tower."""
  import ml_collections

  from mmproj import model as mm

  enc, proj, lm = _check_exportable(cfg_model)
  family = vision.encoder_family(enc)
  text_config = llama.lm_config_to_hf(lm)
  text_config.update(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
  image_token_id = int(cfg_model['image_token_id'])
  if not 0 <= image_token_id < int(lm['vocab_size']):
    raise ValueError(f'model.image_token_id={image_token_id} is not in [0, model.lm.vocab_size={lm["vocab_size"]})')
  return dict(
      architectures=['LlavaForConditionalGeneration'], model_type='llava', dtype='float32',
      vision_config=vision.encoder_config_to_hf(enc), text_config=text_config,
      image_token_index=image_token_id,
      image_seq_length=mm.num_image_tokens(ml_collections.ConfigDict(dict(cfg_model))),
      projector_hidden_act=hf_activation(proj.act, 'model.projector.act'),
      multimodal_projector_bias=bool(proj.use_bias),
      vision_feature_layer=-1,                        # the exported tower ends at the selected block
      vision_feature_select_strategy=PATCH_STRATEGY[family],
      tie_word_embeddings=bool(lm['tie_embeddings']))


def llava_params_to_hf(params: Any, cfg_model: Any) -> dict[str, np.ndarray]:
  """{'encoder', 'projector', 'lm'} params -> {HF key: float32 array} in llava-hf's released layout (EXPORT_LAYOUT).
  Every param must be used and have the configured shape, else ValueError naming its path."""
  enc, proj, lm = _check_exportable(cfg_model)
  extra = sorted(set(params) - {'encoder', 'projector', 'lm'})
  if extra:
    raise ValueError(f'params: top-level subtree(s) {extra} have no place in a LLaVA checkpoint')
  out = vision.encoder_params_to_hf(params['encoder'], enc, EXPORT_VISION_PREFIX)
  dv, dt = int(enc['width']), int(lm['width'])
  r = ParamReader(params['projector'], where='projector params')
  pp = EXPORT_LAYOUT.projector
  for name, d_in in (('linear_1', dv), ('linear_2', dt)):
    out[f'{pp}{name}.weight'] = np.ascontiguousarray(r.take(f'{name}/kernel', (d_in, dt)).T)   # [Dt, D_in]
    if proj.use_bias:
      out[f'{pp}{name}.bias'] = r.take(f'{name}/bias', (dt,))
  r.finish()
  out.update(llama.lm_params_to_hf(params['lm'], lm, EXPORT_LAYOUT.lm, EXPORT_LAYOUT.lm_head))
  return out


def export_llava(cfg_model: Any, params: Any, out_dir: str, *, tokenizer_file: str | None = None,
                 eos_token_id: Any = None, bos_token_id: int | None = None, pad_token_id: int | None = None,
                 image_processor: Any = None) -> str:
  """Writes an HF LLaVA directory that `LlavaForConditionalGeneration.from_pretrained(out_dir)` loads with no
  missing or unexpected keys: config.json, model.safetensors (float32, released llava-hf layout),
  preprocessor_config.json (`image_processor`, default `image_processor_for(encoder)`; its mean/std must be the
  encoder's), generation_config.json (when a token id is given) and tokenizer.json (a copy of `tokenizer_file`).
  Returns out_dir."""
  from safetensors.numpy import save_file

  config = llava_config_to_hf(cfg_model, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                              pad_token_id=pad_token_id)
  tensors = llava_params_to_hf(params, cfg_model)
  enc = dict(cfg_model['encoder'])
  expected = image_processor_for(enc)
  proc = expected if image_processor is None else image_processor
  if (tuple(proc.image_mean), tuple(proc.image_std)) != (expected.image_mean, expected.image_std):
    raise ValueError(f'image_processor mean/std {proc.image_mean}/{proc.image_std} differ from '
                     f'model.encoder.image_mean/image_std {expected.image_mean}/{expected.image_std}')
  if tokenizer_file is not None and not os.path.isfile(tokenizer_file):
    raise ValueError(f'tokenizer_file {tokenizer_file!r} does not exist')
  from mmproj.convert.hf_dir import INDEX_FILE
  if os.path.isfile(os.path.join(out_dir, INDEX_FILE)):      # readers would follow the stale shards, not our file
    raise ValueError(f'{out_dir} already holds a sharded checkpoint ({INDEX_FILE}); export into an empty directory')

  os.makedirs(out_dir, exist_ok=True)

  def dump(name: str, obj: dict) -> None:
    with open(os.path.join(out_dir, name), 'w') as f:
      json.dump(obj, f, indent=2, sort_keys=True)
      f.write('\n')

  dump('config.json', config)
  save_file(tensors, os.path.join(out_dir, 'model.safetensors'), metadata={'format': 'pt'})
  dump(PREPROCESSOR_FILE, {'image_processor_type': IMAGE_PROCESSOR_TYPES[vision.encoder_family(enc)],
                           **proc.to_hf_config()})
  ids = {k: v for k, v in (('bos_token_id', bos_token_id), ('eos_token_id', eos_token_id),
                           ('pad_token_id', pad_token_id)) if v is not None}
  if ids:
    dump('generation_config.json', ids)
  if tokenizer_file is not None:
    shutil.copyfile(tokenizer_file, os.path.join(out_dir, 'tokenizer.json'))
  return out_dir
