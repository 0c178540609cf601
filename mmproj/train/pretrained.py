"""Starting a run from released weights or an earlier run: `cfg.init` names where each part's params come from.

  cfg.init = dict(
      encoder='/models/clip-vit-large-patch14-336',  # HF dir: CLIPVisionModel / SiglipVisionModel, or a full
                                                     #   CLIPModel / SiglipModel (its text tower is skipped)
      lm='/models/vicuna-7b-v1.5',                   # HF dir: Llama / Mistral / Qwen2 causal LM
      projector='runs/llava15_stage1',               # an mmproj workdir: params['projector'] of its latest step
                                                     #   (and the gated blocks an injecting connector put in its LM)
      generator='~/.cache/mmproj/stage0/<key>/generator',   # a generator directory (mmproj.generators.save):
                                                     #   params['generator'] of a model with an output side
      output='runs/draw_align',                      # an mmproj workdir: params['output'] (signal rows and output
  )                                                  #   projector) of its latest step, e.g. a stage-1 run

Missing entries (or None) keep the random initialisation. Weights are read from safetensors only (never pickle).
`check(cfg)` runs before anything is compiled: every named path must exist and its architecture must equal
cfg.model's (a ValueError names the differing cfg.model field and the file). The LM may have a larger
vocabulary than the checkpoint (LLaVA appends <image> and <pad> to Vicuna's 32000 tokens): the new embedding and
lm_head rows start at the mean of the checkpoint's rows, as transformers' resize_token_embeddings does.
Loaded params are only used on a fresh start; a resumed run restores everything from its own checkpoint.
HF weights come out of the converters as layers_{i}; for a model that scans its blocks (model.lm.scan_layers,
model.encoder.scan_layers) `load` stacks them into the scanned layout (layers/... with a leading layer axis,
mmproj.convert.stack_layers). A projector from a workdir is taken as saved; a connector that injects blocks into
the LM (gated_xattn) brings them too (lm/xattn_layers_*), placed over whatever init.lm gave the rest of the LM, so
a second stage continues the first one's connector whole.
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from etils import epath

from mmproj.train import paths

PARTS = ('encoder', 'lm', 'projector', 'output', 'generator')
# Keys of a full CLIPModel / SiglipModel that are not its vision tower.
OTHER_TOWERS = ('text_model.', 'visual_projection.', 'text_projection.', 'logit_scale', 'logit_bias')
# cfg.model.lm fields that may legitimately differ from the HF checkpoint's config.
_LM_FREE_FIELDS = ('vocab_size', 'max_len')
# cfg.model.encoder fields the HF vision config does not describe.
_ENCODER_FREE_FIELDS = ('name', 'image_mean', 'image_std')


def _sources(cfg) -> dict[str, str]:
  init = cfg.init
  unknown = sorted(set(init) - set(PARTS))  # (a config without init.output / init.generator: neither is loaded)
  if unknown:
    raise ValueError(f'init.{unknown[0]}: unknown part; cfg.init takes {list(PARTS)}')
  out = {}
  for part in PARTS:
    path = init.get(part)
    if path == 'stage0':
      raise ValueError(f"init.{part}='stage0' is resolved by mmproj.experiment.run (or mmproj.stage0.resolve_init), "
                       'which builds the stage-0 towers of cfg.stage0 and names their directories')
    if path:
      path = paths.resolve(str(path))                         # a projector's workdir may be a URL (gs://...)
      if not epath.Path(path).exists():
        raise FileNotFoundError(f'init.{part}={init[part]!r}: {path} does not exist')
      out[part] = path
  if out and not cfg.model.use_image and set(out) & {'encoder', 'projector'}:
    raise ValueError('cfg.init names encoder/projector weights but model.use_image is False')
  from mmproj.model import has_output  # pylint: disable=g-import-not-at-top
  if set(out) & {'output', 'generator'} and not has_output(cfg.model):
    raise ValueError('cfg.init names output/generator weights but cfg.model has no output side (model.output)')
  return out


def _same(a: Any, b: Any) -> bool:
  if hasattr(a, 'to_dict'):
    a = a.to_dict()
  if isinstance(a, dict) or isinstance(b, dict):
    a, b = dict(a or {}), dict(b or {})
    return set(a) == set(b) and all(_same(a[k], b[k]) for k in a)
  if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
    a, b = list(a or []), list(b or [])
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
  if isinstance(a, float) or isinstance(b, float):
    return a is not None and b is not None and bool(np.isclose(float(a), float(b), rtol=1e-6))
  return a == b


def _compare(field_prefix: str, ours: Any, theirs: dict, where: str, skip: tuple[str, ...]) -> None:
  for key, value in theirs.items():
    if key in skip:
      continue
    mine = ours.get(key, None)
    if not _same(mine, value):
      raise ValueError(f'{field_prefix}.{key}={mine!r} but {where} gives {value!r}')


def _encoder_config(cfg, path: str) -> dict:
  from mmproj.convert import hf_dir, vision
  enc = cfg.model.encoder
  return vision.encoder_config_from_hf(hf_dir.read_config(path), output_layer=int(enc.output_layer),
                                       final_norm=bool(enc.get('final_norm', True)))


def _lm_config(path: str) -> dict:
  from mmproj.convert import hf_dir, llama
  return llama.lm_config_from_hf(hf_dir.read_config(path))


def _workdir_config(path: str, part: str = 'projector') -> dict:
  config = epath.Path(paths.join(path, 'config.json'))
  if not config.is_file():
    raise FileNotFoundError(f'init.{part}: {config} not found ({path} is not an mmproj workdir)')
  return json.loads(config.read_text())


def _generator_config(path: str) -> dict:
  from mmproj import generators
  return generators.load_config(path)


def check(cfg) -> None:
  """Every cfg.init path exists and describes the architecture in cfg.model (ValueError naming the field)."""
  sources = _sources(cfg)
  if 'generator' in sources:
    from mmproj import generators
    ours = generators.check_config(cfg.model.output.generator)
    _compare('model.output.generator', ours, _generator_config(sources['generator']),
             f'init.generator ({sources["generator"]})', ())
  if 'output' in sources:
    theirs = _workdir_config(sources['output'], 'output').get('model', {})
    _compare('model.output', {k: v for k, v in cfg.model.output.items() if k != 'generator'},
             {k: v for k, v in theirs.get('output', {}).items() if k != 'generator'},
             f'init.output ({sources["output"]}/config.json model.output)', ())
    if int(theirs.get('lm', {}).get('width', -1)) != int(cfg.model.lm.width):
      raise ValueError(f'model.lm.width={cfg.model.lm.width} but init.output ({sources["output"]}) was trained for '
                       f'an LM of width {theirs.get("lm", {}).get("width")}')
  if 'encoder' in sources:
    _compare('model.encoder', cfg.model.encoder, _encoder_config(cfg, sources['encoder']),
             f'init.encoder ({sources["encoder"]}/config.json)', _ENCODER_FREE_FIELDS)
    if os.path.isfile(os.path.join(sources['encoder'], 'preprocessor_config.json')):
      from mmproj.data import preprocess
      processor = preprocess.ImageProcessor.from_dir(sources['encoder'])
      _compare('model.encoder', cfg.model.encoder, dict(image_mean=list(processor.image_mean),
                                                         image_std=list(processor.image_std)),
               f'init.encoder ({sources["encoder"]}/preprocessor_config.json)', ())
  if 'lm' in sources:
    theirs = _lm_config(sources['lm'])
    _compare('model.lm', cfg.model.lm, theirs, f'init.lm ({sources["lm"]}/config.json)', _LM_FREE_FIELDS)
    if int(cfg.model.lm.vocab_size) < int(theirs['vocab_size']):
      raise ValueError(f'model.lm.vocab_size={cfg.model.lm.vocab_size} is smaller than the vocabulary of init.lm '
                       f'({sources["lm"]}: {theirs["vocab_size"]})')
  if 'projector' in sources:
    theirs = _workdir_config(sources['projector']).get('model', {})
    for section in ('projector', 'encoder'):
      _compare(f'model.{section}', cfg.model[section], theirs.get(section, {}),
               f'init.projector ({sources["projector"]}/config.json model.{section})', ())
    if int(theirs.get('lm', {}).get('width', -1)) != int(cfg.model.lm.width):
      raise ValueError(f'model.lm.width={cfg.model.lm.width} but init.projector ({sources["projector"]}) '
                       f'was trained for an LM of width {theirs.get("lm", {}).get("width")}')


def _pad_vocab(lm: dict, vocab_size: int) -> dict:
  """Grows embed_tokens [V0, D] (and an untied lm_head kernel [D, V0]) to vocab_size rows, new rows = mean."""
  embed = lm['embed_tokens']['embedding']
  extra = vocab_size - embed.shape[0]
  if extra <= 0:
    return lm
  lm['embed_tokens']['embedding'] = np.concatenate(
      [embed, np.repeat(embed.mean(0, keepdims=True), extra, 0)], 0)                 # [V, D]
  if 'lm_head' in lm:
    kernel = lm['lm_head']['kernel']                                                    # [D, V0]
    lm['lm_head']['kernel'] = np.concatenate([kernel, np.repeat(kernel.mean(1, keepdims=True), extra, 1)], 1)
  return lm


def _load_encoder(cfg, path: str) -> dict:
  from mmproj.convert import StateDict, hf_dir, vision
  sd = StateDict(hf_dir.read_safetensors(path), where=path)
  prefix = vision.find_prefix(sd)
  params = vision.encoder_params_from_hf(sd, _encoder_config(cfg, path), prefix)
  sd.finish(ignore=vision.skipped_prefixes(_encoder_config(cfg, path), prefix) + OTHER_TOWERS)
  return params


def _load_lm(cfg, path: str) -> dict:
  from mmproj.convert import StateDict, hf_dir, llama
  sd = StateDict(hf_dir.read_safetensors(path), where=path)
  params = llama.lm_params_from_hf(sd, _lm_config(path))
  sd.finish()
  return _pad_vocab(params, int(cfg.model.lm.vocab_size))


def _load_projector(path: str) -> dict:
  """{'projector': params['projector'], INJECTED: the LM's connector blocks} of the latest step of a workdir; for a
  BLIP-2 stage-1 workdir (objective 'qformer_stage1') its Q-Former's query side, marked PARTIAL."""
  import jax
  import ml_collections
  import orbax.checkpoint as ocp

  from mmproj.train import checkpoint, state
  cfg, _ = checkpoint.read_run_files(path)
  if cfg.get('objective') == QFORMER_STAGE1:
    with ocp.CheckpointManager(checkpoint.checkpoint_dir(path)) as manager:
      step = manager.latest_step()
      if step is None:
        raise FileNotFoundError(f'init.projector: {path} (a Q-Former stage-1 run) has no checkpoint')
      params = manager.restore(step, args=ocp.args.StandardRestore())['params']
    return {'projector': {k: params[k] for k in QFORMER_STAGE1_KEYS if k in params}, PARTIAL: True}
  cfg.mesh = ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'tensor': 1})
  restored, _ = checkpoint.restore_state(path, state.setup(cfg, jax.local_devices()).abstract_state)
  lm = restored.params.get('lm', {})
  return jax.device_get({'projector': restored.params['projector'],
                         INJECTED: {k: v for k, v in lm.items() if k.startswith(CONNECTOR_IN_LM)}})


def _load_output(path: str) -> dict:
  """params['output'] of the latest step of a workdir."""
  import jax
  import ml_collections

  from mmproj.train import checkpoint, state
  cfg, _ = checkpoint.read_run_files(path)
  cfg.mesh = ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'tensor': 1})
  restored, _ = checkpoint.restore_state(path, state.setup(cfg, jax.local_devices()).abstract_state)
  return jax.device_get(restored.params['output'])


def _load_generator(path: str) -> dict:
  from mmproj import generators
  _, params, _ = generators.load(path)
  return params


def load(cfg) -> dict[str, Any]:
  """{part: numpy params subtree} for every part cfg.init names (after `check`), in the layout cfg.model builds
  (HF encoder / LM layers stacked when that part scans its layers)."""
  from mmproj.convert import stack_layers, scanned_depths
  check(cfg)
  loaders = {'encoder': lambda p: _load_encoder(cfg, p), 'lm': lambda p: _load_lm(cfg, p),
             'output': _load_output, 'generator': _load_generator}
  loaded = {}
  for part, path in _sources(cfg).items():
    loaded.update(_load_projector(path) if part == 'projector' else {part: loaders[part](path)})
  for part, depth in scanned_depths(cfg.model).items():
    if part in loaded:
      loaded[part] = stack_layers(loaded[part], depth)
  return loaded


# The gated cross-attention blocks an injecting projector (Flamingo's gated_xattn) puts between the LM's blocks
# (mmproj/lm/llama.py): a pretrained LM does not have them (they start fresh), a workdir's connector does.
CONNECTOR_IN_LM = 'xattn_layers_'
NEW_IN_PRETRAINED = {'lm': (CONNECTOR_IN_LM,)}
INJECTED = 'lm:connector'   # the key of `load`'s result holding a workdir connector's blocks in the LM
# A BLIP-2 stage-1 run (mmproj/qformer_stage1.py) gives the 'qformer' connector these subtrees; its text embeddings
# and ITC / ITM / ITG heads are left out, and language_projection (which it lacks) keeps its initialisation.
QFORMER_STAGE1 = 'qformer_stage1'
QFORMER_STAGE1_KEYS = ('query_tokens', 'ln_vision', 'qformer')
PARTIAL = 'projector:partial'   # set in `load`'s result when the projector came from such a run
STAGE1_FRESH = ('language_projection',)


def place(params: dict, loaded: dict[str, Any], shardings: dict) -> dict:
  """Replaces params[part] by loaded[part] on the same shardings (NEW_IN_PRETRAINED params keep their fresh
  values, or take loaded[INJECTED]'s); ValueError naming a param whose path or shape differs from the model's."""
  import jax
  from mmproj.train.optimizer import path_str

  out = dict(params)
  injected = loaded.get(INJECTED) or {}
  if injected:
    # The connector's blocks: every one the model has, over the LM from init.lm (or its fresh init).
    lm = dict(loaded.get('lm', params['lm']))
    lm = {k: v for k, v in lm.items() if not k.startswith(CONNECTOR_IN_LM)}
    loaded = {**loaded, 'lm': {**lm, **injected}}
  for part, tree in loaded.items():
    if part in (INJECTED, PARTIAL):
      continue
    want = jax.tree_util.tree_flatten_with_path(params[part])[0]
    got = dict((path_str(p), v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0])
    fresh = NEW_IN_PRETRAINED.get(part, ()) if not injected else ()
    if part == 'projector' and loaded.get(PARTIAL):
      fresh = STAGE1_FRESH
      model_paths = {path_str(p) for p, _ in want}
      got = {k: v for k, v in got.items() if k in model_paths}     # the stage-1 text side and heads stay behind
    got.update({path_str(p): v for p, v in want if path_str(p) not in got and path_str(p).startswith(fresh)})
    missing = [path_str(p) for p, _ in want if path_str(p) not in got]
    extra = sorted(set(got) - {path_str(p) for p, _ in want})
    if missing or extra:
      source = 'init.projector' if part == 'lm' and injected else f'init.{part}'
      raise ValueError(f'{source}: params {part}/{(missing or extra)[0]} '
                       f'{"missing from" if missing else "not in the model but in"} the loaded weights')
    leaves = []
    for (p, ref), sharding in zip(want, jax.tree.leaves(shardings[part])):
      value = np.asarray(got[path_str(p)])
      if value.shape != ref.shape:
        raise ValueError(f'init.{part}: {part}/{path_str(p)} has shape {value.shape}, the model expects {ref.shape}')
      leaves.append(jax.device_put(value.astype(ref.dtype), sharding))
    out[part] = jax.tree.unflatten(jax.tree.structure(params[part]), leaves)
  return out
