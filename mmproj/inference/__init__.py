"""Using a trained or released model: `load` a checkpoint, `generate` answers about images.

  bundle = mmproj.load('runs/quickstart')               # an mmproj workdir (latest step) or WORKDIR/checkpoints/N
  bundle = mmproj.load('/models/llava-1.5-7b-hf')       # an HF LLaVA directory (config.json + safetensors)
  bundle = mmproj.load('/models/vicuna-7b-v1.5')        # an HF causal LM: text-only generation
  bundle = mmproj.load('/models/clip-vit-large-patch14-336')   # a CLIP / SigLIP tower: bundle.model is the ViT
  texts = mmproj.generate(bundle, images, ['<image> what color is the circle ?'], max_new_tokens=8)

`images` are uint8 [H, W, 3] arrays, one per prompt; `<image>` in a prompt marks where the image's visual tokens go
(expanded to num_image_tokens(cfg.model) placeholders, as HF's LlavaProcessor does).

How a prompt becomes tokens depends on where the bundle came from (`Bundle.prompt_format`):
  'shapes'  an mmproj run in the shapes world: `<bos> <image>*M question <sep>`, the layout it trained on; the
            image goes first when the prompt has no `<image>`. The answer is decoded as space-joined words.
  'hf'      an HF directory (or a run on LLaVA-format data): the prompt string is tokenized as is by its
            tokenizer.json (with the tokenizer's own special tokens, e.g. Llama's <s>), so the caller writes the
            chat template, e.g. LLaVA-1.5's
            'USER: <image>\\nWhat is shown? ASSISTANT:'. Images go through the directory's image processor
            (resize, crop, normalise, equal to CLIPImageProcessor / SiglipImageProcessor).
Generation stops at any of `Bundle.stop_ids` (<eos>; an HF generation_config's eos_token_id, one id or a list).

A model with an output side (model.output: signal tokens, an output projector and a generator; configs/draw.py)
answers in text and pictures: `generate` then returns `Reply(text, image)` per prompt, image a uint8 [S, S, 3]
drawn by the generator wherever the LM emitted [IMG0] (the other signal tokens are appended after it, as GILL
does, and the conditioning comes from the LM's hidden states at all K), else None:

  replies = mmproj.generate(mmproj.load('runs/draw/transformer'), None, ['draw large red circle top left'])
  replies[0].image   # uint8 [32, 32, 3]
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

PROMPT_FORMATS = ('shapes', 'hf')


@dataclasses.dataclass
class Reply:
  """A reply of a model with an output side: the text (signal tokens left out) and the picture it drew (uint8
  [S, S, 3], or None when it emitted no [IMG0])."""
  text: str
  image: np.ndarray | None = None


@dataclasses.dataclass
class Bundle:
  """What a notebook needs to use a model: model + params, tokenizer, config (cfg.model under .model), and how
  prompts and images are prepared for it."""
  model: Any
  params: Any
  tokenizer: Any                         # tokenizers.Tokenizer, or None when the HF directory has none
  config: ml_collections.ConfigDict
  step: int | None = None                # the Orbax step restored (None for an HF directory)
  prompt_format: str = 'shapes'
  stop_ids: tuple[int, ...] = ()
  pad_id: int = 0
  image_processor: Any = None            # mmproj.data.preprocess.ImageProcessor for HF models, else None
  path: str = ''

  @property
  def num_image_tokens(self) -> int:
    from mmproj.model import num_image_tokens
    return num_image_tokens(self.config.model)


def _is_hf_dir(path: str) -> bool:
  config = os.path.join(path, 'config.json')
  if not os.path.isfile(config):
    return False
  try:
    with open(config) as f:
      content = json.load(f)
  except (OSError, ValueError):
    return False
  return isinstance(content, dict) and ('model_type' in content or 'architectures' in content)


def load(path: str, step: int | None = None) -> Bundle:
  """An mmproj Orbax workdir (latest step, or `step`), one of its step directories, or an HF directory holding a
  LLaVA checkpoint (config.json + safetensors; never pickle) -> Bundle with .model, .params, .tokenizer, .config."""
  path = os.fspath(path)
  if '://' in path:        # a workdir in cloud storage (gs://...): read through etils.epath and Orbax
    return _load_workdir(path.rstrip('/'), step)
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} does not exist: it is not an mmproj workdir or an HF directory')
  if _is_hf_dir(path):
    if step is not None:
      raise ValueError(f'step={step}: {path} is an HF directory, which holds one set of weights')
    return _load_hf(path)
  return _load_workdir(path, step)


def restore_for_inference(path: str, step: int | None = None, *, mesh: Mapping[str, int] | None = None,
                          devices: Sequence[jax.Device] | None = None):
  """An Orbax workdir (latest step, or `step`) or one of its step directories -> (model, params, tokenizer, cfg,
  step), params placed on `devices` (default: all of this process's devices) laid out as `mesh` ({data, fsdp,
  tensor} sizes, one may be -1; default data-parallel over all of them, {'data': -1}). The checkpoint may have
  been written by any number of processes on any mesh. `load` wraps this."""
  from mmproj.train import checkpoint, state

  path, step = checkpoint.split_step_path(path, step)
  cfg, tokenizer = checkpoint.read_run_files(path)
  cfg.mesh = ml_collections.ConfigDict({'data': 1, 'fsdp': 1, 'tensor': 1, **(mesh or {'data': -1})})
  s = state.setup(cfg, list(jax.local_devices() if devices is None else devices))
  restored, step = checkpoint.restore_state(path, s.abstract_state, step)
  return s.model, restored.params, tokenizer, cfg, step


def _load_workdir(path: str, step: int | None) -> Bundle:
  from mmproj.data import llava_json, worlds
  from mmproj.data import tokenizer as tokenizer_lib

  model, params, tokenizer, cfg, step = restore_for_inference(path, step)
  if worlds.name_of(cfg.data) in worlds.WORLDS:
    return Bundle(model=model, params=params, tokenizer=tokenizer, config=cfg, step=step, prompt_format='shapes',
                  stop_ids=(tokenizer_lib.EOS_ID,), pad_id=tokenizer_lib.PAD_ID, path=path)
  eos = tokenizer.token_to_id(llava_json.config_value(cfg.data, 'eos_token'))
  return Bundle(model=model, params=params, tokenizer=tokenizer, config=cfg, step=step, prompt_format='hf',
                stop_ids=() if eos is None else (eos,), image_processor=_data_image_processor(cfg), path=path)


def _data_image_processor(cfg):
  """The image steps of a run's LLaVA-format data (mmproj.data.llava_json: pad/crop/resize to data.image_size),
  as a callable images -> uint8 [B, S, S, 3]; the model normalises uint8 input itself."""
  from mmproj.data import llava_json
  size, aspect = int(cfg.data.image_size), str(llava_json.config_value(cfg.data, 'image_aspect'))
  mean = llava_json.config_value(cfg.data, 'image_mean')

  def process(images):
    return np.stack([llava_json.resize_image(image, size=size, aspect=aspect, mean=mean) for image in images])
  return process


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    try:
      return json.load(f)
    except ValueError as e:
      raise ValueError(f'{path}: malformed JSON ({e})') from None


def _ids(value) -> tuple[int, ...]:
  if value is None:
    return ()
  return tuple(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))


VISION_TYPES = ('clip_vision_model', 'siglip_vision_model', 'clip', 'siglip')
LM_TYPES = ('llama', 'mistral', 'qwen2')


def hf_kind(hf_config: dict, path: str = 'config.json') -> str:
  """'llava', 'vision' (CLIP / SigLIP, vision or full model) or 'lm' (Llama / Mistral / Qwen2) from config.json."""
  model_type = hf_config.get('model_type')
  if model_type == 'llava':
    return 'llava'
  if model_type in VISION_TYPES:
    return 'vision'
  if model_type in LM_TYPES:
    return 'lm'
  raise ValueError(f'{path}: model_type {model_type!r} is not supported by mmproj.load; supported: '
                   f"['llava'] + {list(VISION_TYPES)} + {list(LM_TYPES)}")


def _load_hf(path: str) -> Bundle:
  """An HF directory -> Bundle. LLaVA: the whole MultimodalLM. A causal LM: a MultimodalLM without images
  (model.use_image=False), so generate works on text prompts. A CLIP / SigLIP tower: bundle.model is the ViT
  (image [B, H, W, 3] -> (tokens [B, N, D], grid); all layers, output_layer=-1) and generate does not apply."""
  from tokenizers import Tokenizer

  from mmproj import config_lib
  from mmproj.convert import hf_dir, llama, llava, vision
  from mmproj.data import preprocess
  from mmproj.model import build_model

  hf_config = hf_dir.read_config(path)
  kind = hf_kind(hf_config, os.path.join(path, 'config.json'))
  processor_config = llava.read_preprocessor_config(path)     # preprocessor_config.json or processor_config.json

  def image_processor(cfg_encoder):
    family = 'clip' if cfg_encoder['cls_token'] else 'siglip'
    if processor_config is not None:
      return preprocess.ImageProcessor.from_hf_config(processor_config, kind=family)
    size = int(cfg_encoder['image_size'])
    return (preprocess.ImageProcessor.clip(size=size, crop_size=(size, size)) if family == 'clip'
            else preprocess.ImageProcessor.siglip(size=(size, size)))
  if kind == 'vision':
    from mmproj.convert import StateDict
    from mmproj.train import pretrained
    cfg_encoder = vision.encoder_config_from_hf(hf_config)
    sd = StateDict(hf_dir.read_safetensors(path), where=path)
    prefix = vision.find_prefix(sd)
    params = vision.encoder_params_from_hf(sd, cfg_encoder, prefix)
    sd.finish(ignore=vision.skipped_prefixes(cfg_encoder, prefix) + pretrained.OTHER_TOWERS)
    cfg = ml_collections.ConfigDict({'model': {'encoder': cfg_encoder}})
    from mmproj.encoders import build_encoder
    return Bundle(model=build_encoder(cfg_encoder), params=jax.device_put(params),
                  tokenizer=None, config=cfg, prompt_format='none', image_processor=image_processor(cfg_encoder),
                  path=path)
  if kind == 'llava':
    cfg_model, params = llava.load_llava(path)
  else:
    cfg_model = config_lib.model_config(use_image=False, lm=llama.lm_config_from_hf(hf_config))
    _, lm_params = llama.load_lm(path)
    params = {'lm': lm_params}
  cfg = ml_collections.ConfigDict({'model': cfg_model})
  model = build_model(cfg.model)
  tok_file = os.path.join(path, 'tokenizer.json')
  tokenizer = Tokenizer.from_file(tok_file) if os.path.isfile(tok_file) else None
  text_config = hf_config.get('text_config') or {}
  generation = _read_json(os.path.join(path, 'generation_config.json'))
  stop_ids = (_ids(generation.get('eos_token_id')) or _ids(text_config.get('eos_token_id'))
              or _ids(hf_config.get('eos_token_id')))
  if not stop_ids and tokenizer is not None and tokenizer.token_to_id('</s>') is not None:
    stop_ids = (tokenizer.token_to_id('</s>'),)
  pad = generation.get('pad_token_id', text_config.get('pad_token_id', hf_config.get('pad_token_id')))
  processor = image_processor(cfg_model['encoder']) if kind == 'llava' else None
  return Bundle(model=model, params=jax.device_put(params), tokenizer=tokenizer, config=cfg, step=None,
                prompt_format='hf', stop_ids=stop_ids, pad_id=int(pad or 0), image_processor=processor, path=path)


def _expand_images(ids: list[int], image_id: int, count: int, where: str) -> list[int]:
  """Each image placeholder id -> `count` copies (a prompt holds at most one image)."""
  n = ids.count(image_id)
  if n > 1:
    raise ValueError(f'{where} has {n} <image> markers; generate takes one image per prompt')
  out = []
  for i in ids:
    out.extend([i] * count if i == image_id else [i])
  return out


def encode_prompt(bundle: Bundle, prompt: str, where: str = 'prompt') -> list[int]:
  """A prompt string -> token ids with the image block expanded (see the module docstring for the formats)."""
  cfg = bundle.config.model
  m = bundle.num_image_tokens if cfg.use_image else 0
  image_id = int(cfg.image_token_id)
  if bundle.tokenizer is None:
    raise ValueError(f'{bundle.path} has no tokenizer.json: generate needs one to encode prompts')
  if bundle.prompt_format == 'shapes':
    from mmproj.data import tokenizer as tokenizer_lib
    encoding = bundle.tokenizer.encode(prompt, add_special_tokens=False)
    ids = encoding.ids
    bad = [prompt[a:b] for (a, b), i in zip(encoding.offsets, ids) if i == tokenizer_lib.UNK_ID]
    if bad:
      raise ValueError(f'{where}: words {bad} are not in the vocabulary of {bundle.path}')
    if cfg.use_image and image_id not in ids:
      ids = [image_id] + ids
    if not cfg.use_image:
      ids = [i for i in ids if i != image_id]
    return [tokenizer_lib.BOS_ID] + _expand_images(ids, image_id, m, where) + [tokenizer_lib.SEP_ID]
  if bundle.prompt_format == 'hf':
    ids = bundle.tokenizer.encode(prompt, add_special_tokens=True).ids
    if not cfg.use_image:
      return ids
    if '<image>' in prompt and image_id not in ids:
      raise ValueError(f'{where}: the tokenizer does not map <image> to model.image_token_id={image_id}')
    return _expand_images(ids, image_id, m, where)
  raise ValueError(f'Bundle.prompt_format={bundle.prompt_format!r} is not one of {PROMPT_FORMATS}')


def prepare_images(bundle: Bundle, images: Sequence[np.ndarray]) -> np.ndarray:
  """uint8 [H, W, 3] images -> the model's image input [B, S, S, 3] (uint8, or float32 already normalised)."""
  size = int(bundle.config.model.encoder.image_size)
  arrays = []
  for i, image in enumerate(images):
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
      raise ValueError(f'images[{i}]: expected a uint8 [H, W, 3] array, got {image.dtype} {image.shape}')
    arrays.append(image)
  if bundle.image_processor is not None:
    return np.asarray(bundle.image_processor(arrays))
  for i, image in enumerate(arrays):
    if image.shape[:2] != (size, size):
      raise ValueError(f'images[{i}] is {image.shape[0]}x{image.shape[1]}; this model takes {size}x{size}')
  return np.stack(arrays)


def prepare_media(bundle: Bundle, media: Sequence[np.ndarray]) -> tuple[str, np.ndarray]:
  """One item per prompt -> (batch key, the model's input): images uint8 [H, W, 3] (prepare_images), audio float
  waveforms [S] at 16 kHz (cut or zero-padded to the encoder's clip, as in training), videos uint8 [F, H, W, 3]."""
  from mmproj.encoders import build_encoder
  from mmproj.model import modality
  kind = modality(bundle.config.model)
  if kind == 'image':
    return kind, prepare_images(bundle, media)
  arrays = [np.asarray(m) for m in media]
  if kind == 'audio':
    n = build_encoder(bundle.config.model.encoder).num_samples()
    out = np.zeros((len(arrays), n), np.float32)
    for i, wave in enumerate(arrays):
      if wave.ndim != 1 or not np.issubdtype(wave.dtype, np.floating):
        raise ValueError(f'audio[{i}]: expected a float waveform [S] at 16 kHz, got {wave.dtype} {wave.shape}')
      out[i, :min(n, len(wave))] = wave[:n]
    return kind, out
  size = int(bundle.config.model.encoder.image_size)
  frames = int(bundle.config.model.num_frames)
  for i, video in enumerate(arrays):
    if video.dtype != np.uint8 or video.shape != (frames, size, size, 3):
      raise ValueError(f'videos[{i}]: expected uint8 [{frames}, {size}, {size}, 3] (model.num_frames frames of '
                       f'model.encoder.image_size), got {video.dtype} {video.shape}')
  return kind, np.stack(arrays)


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def generate(bundle: Bundle, images: Sequence[np.ndarray] | np.ndarray | None, prompts: Sequence[str], *,
             max_new_tokens: int = 32, temperature: float = 0.0, seed: int = 0, rng=None,
             return_ids: bool = False, image_steps: int | None = None, guidance: float | None = None
             ) -> list[str] | list[Reply] | tuple[list, np.ndarray]:
  """Answers `prompts` about `images`, one media item per prompt in the model's modality (model.modality): a uint8
  [H, W, 3] image, a float waveform [S] at 16 kHz, or a uint8 video [F, H, W, 3]. Batched greedy (temperature 0) or
  sampled decoding with the model's KV cache, in one jitted program, stopping at the bundle's stop ids.

  Prompts are left-padded to a common length (rounded up to a multiple of 16, so similar batches reuse the
  compiled program). Returns the decoded continuations (special tokens dropped) and, with return_ids, also the
  generated ids int32 [B, max_new_tokens] (pad_id after a row's stop id). A model with an output side returns a
  Reply (text, image) per prompt instead (module docstring); its pictures take image_steps Euler steps at
  classifier-free guidance `guidance` (defaults: the run's eval.draw_steps / eval.draw_guidance), from noise
  drawn from `seed`.
  """
  from mmproj.data import pipeline
  from mmproj.eval.generate import generate_tokens

  if bundle.prompt_format not in PROMPT_FORMATS:
    raise ValueError(f'{bundle.path} holds a {type(bundle.model).__name__}, which does not generate text')
  if isinstance(prompts, str):
    raise TypeError('prompts must be a list of strings (one per image), not a single string')
  prompts = list(prompts)
  if not prompts:
    return ([], np.zeros((0, max_new_tokens), np.int32)) if return_ids else []
  cfg = bundle.config.model
  if cfg.use_image:
    if images is None or len(images) != len(prompts):
      raise ValueError(f'{len(prompts)} prompts need {len(prompts)} images, got '
                       f'{0 if images is None else len(images)}')
  rows = [encode_prompt(bundle, p, where=f'prompts[{i}]') for i, p in enumerate(prompts)]
  length = _round_up(max(len(r) for r in rows), 16)
  if length + max_new_tokens - 1 > int(cfg.lm.max_len):
    raise ValueError(f'prompt ({length} tokens after padding) + max_new_tokens={max_new_tokens} exceeds '
                     f'model.lm.max_len={cfg.lm.max_len}')
  tokens = np.full((len(rows), length), bundle.pad_id, np.int32)                  # [B, L] left-padded
  mask = np.zeros((len(rows), length), np.int32)                                  # [B, L]
  for b, row in enumerate(rows):
    tokens[b, length - len(row):] = row
    mask[b, length - len(row):] = 1
  batch = {'tokens': tokens, 'input_mask': mask, 'positions': np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)}
  if cfg.use_image:
    key, batch[key] = prepare_media(bundle, images)
  if temperature > 0 and rng is None:
    rng = jax.random.key(seed)
  if not bundle.stop_ids:
    raise ValueError(f'{bundle.path}: no stop token known (no eos_token_id in generation_config.json / config.json '
                     'and no </s> in the tokenizer)')
  ids = np.asarray(jax.device_get(generate_tokens(
      bundle.model, bundle.params, batch, max_new_tokens=max_new_tokens, eos_id=list(bundle.stop_ids),
      pad_id=bundle.pad_id, temperature=temperature, rng=rng)))                  # [B, max_new_tokens]
  if _has_output(cfg):
    replies = _draw_replies(bundle, batch, ids, seed=seed, steps=image_steps, guidance=guidance)
    return (replies, ids) if return_ids else replies
  texts = []
  for row in ids:
    cut = [int(i) for i in row]
    for k, i in enumerate(cut):
      if i in bundle.stop_ids:
        cut = cut[:k]
        break
    if bundle.prompt_format == 'shapes':
      texts.append(pipeline.decode(bundle.tokenizer, cut))
    else:
      texts.append(bundle.tokenizer.decode(cut, skip_special_tokens=True))
  return (texts, ids) if return_ids else texts


def _has_output(cfg_model) -> bool:
  from mmproj.model import has_output
  return has_output(cfg_model)


def _draw_replies(bundle: Bundle, batch: dict, ids: np.ndarray, *, seed: int, steps: int | None,
                  guidance: float | None) -> list[Reply]:
  """Replies of an output-side model: each row's text up to its stop id without signal tokens, and for the rows
  that emitted [IMG0] the picture drawn from the hidden states at [IMG0]..[IMGk-1] (appended after the prompt
  and the tokens before [IMG0])."""
  from mmproj.data import pipeline
  from mmproj.model import DTYPES, output_modules

  cfg = bundle.config
  out = cfg.model.output
  k, first = int(out.num_signal_tokens), int(out.signal_token_id)
  signal = list(range(first, first + k))
  evals = cfg.get('eval') or {}
  steps = int(steps if steps is not None else evals.get('draw_steps', 25))
  guidance = float(guidance if guidance is not None else evals.get('draw_guidance', 3.0))
  texts, drawing = [], []                          # drawing: (row, ids of the prompt + reply up to [IMG0] + signals)
  for b, row in enumerate(ids):
    cut = [int(i) for i in row]
    stop = next((j for j, i in enumerate(cut) if i in bundle.stop_ids), len(cut))
    cut = cut[:stop]
    texts.append(pipeline.decode(bundle.tokenizer, [i for i in cut if i not in signal]))
    if first in cut:
      prompt = [int(t) for t, m in zip(batch['tokens'][b], batch['input_mask'][b]) if m]
      drawing.append((b, prompt + cut[:cut.index(first)] + signal))
  replies = [Reply(text) for text in texts]
  if not drawing:
    return replies
  length = _round_up(max(len(r) for _, r in drawing), 16)
  tokens = np.full((len(drawing), length), bundle.pad_id, np.int32)
  mask = np.zeros((len(drawing), length), np.int32)
  for j, (_, row) in enumerate(drawing):
    tokens[j, length - len(row):] = row
    mask[j, length - len(row):] = 1
  rows = {'tokens': tokens, 'input_mask': mask, 'positions': np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)}
  generator = output_modules(cfg.model, DTYPES[cfg.model.dtype])[1]
  images = np.asarray(jax.device_get(_draw(bundle.model, generator, bundle.params, rows, jax.random.key(seed),
                                           steps=steps, guidance=guidance)))
  for j, (b, _) in enumerate(drawing):
    replies[b].image = images[j]
  return replies


@functools.partial(jax.jit, static_argnames=('model', 'generator', 'steps', 'guidance'))
def _draw(model, generator, params, rows, rng, *, steps: int, guidance: float):
  from mmproj import generators
  hidden = model.apply({'params': params}, rows, return_hidden=True)                # [B, T, Dt]
  cond, _ = model.apply({'params': params}, hidden, rows['tokens'], method='signal_condition')
  return generators.sample(generator, params['generator'], cond, rng, steps=steps, guidance=guidance)


def export_hf(bundle: Bundle, out_dir: str) -> str:
  """Writes a LLaVA-style bundle (ViT + 2-layer MLP projector + Llama-family LM, e.g. a run of
  configs/llava15_stage2.py) as an HF LLaVA directory that `transformers.LlavaForConditionalGeneration` loads:
  weights, config, image processor, generation config (the bundle's stop and pad ids) and tokenizer.json.
  Returns out_dir. See mmproj.convert.llava.export_llava for what can be exported."""
  from mmproj.convert import llava
  from mmproj.data import llava_json

  if bundle.prompt_format != 'hf' or not bundle.config.model.use_image:
    raise ValueError(f'{bundle.path}: only LLaVA-style models (trained on LLaVA-format data, or loaded from an HF '
                     'LLaVA directory) export to an HF LLaVA directory')
  tokenizer_file = os.path.join(bundle.path, 'tokenizer.json')
  bos = None
  if bundle.tokenizer is not None:      # a run's data config names it; an HF directory's bundle has none: <s>
    bos = bundle.tokenizer.token_to_id(llava_json.config_value(bundle.config.data, 'bos_token')
                                       if 'data' in bundle.config else '<s>')
  stops = list(bundle.stop_ids)
  from mmproj.convert import unstack_model_params
  params = unstack_model_params(jax.device_get(bundle.params), bundle.config.model)   # scanned towers -> layers_{i}
  return llava.export_llava(bundle.config.model.to_dict(), params, out_dir,
                            tokenizer_file=tokenizer_file if os.path.isfile(tokenizer_file) else None,
                            eos_token_id=stops[0] if len(stops) == 1 else (stops or None), bos_token_id=bos,
                            pad_token_id=bundle.pad_id)
