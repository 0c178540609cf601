"""Attention maps over the image: where a projector's queries look, and where the LM looks.

  maps = projector_attention(bundle, images)                  # [B, Q, h, w]  queries of an attention projector
  maps = lm_attention_to_image(bundle, images, prompts)       # [B, gh, gw]   LM, last prompt token -> image

Both read the softmax probabilities that `mmproj.layers.Attention` and `mmproj.layers.CrossAttention` sow into the
'intermediates' collection (name 'attention_probs', [B, H, T, S] float32, one entry per call) when the model is
applied with `mutable=['intermediates']`; applied without it, nothing is sown and nothing extra is computed:

  _, state = bundle.model.apply({'params': bundle.params}, image, method=lambda m, x: m.encode(x),
                                mutable=['intermediates'])
  sown_attention(state['intermediates'])   # {'projector/attn_0': [B, H, M, N], 'encoder/...': ..., ...}

projector_attention: for the projectors whose queries attend over the encoder's patch grid (h, w) =
`mmproj.model.encoder_grid`. Each map is one query's attention over the grid, averaged over heads, and over the
projector's attention layers that read the grid (layer=None, the default) or taken from one of them (layer=i,
-1 = the last):
  cross_attention    M learned queries, every block (attn_i)
  perceiver          M latents, every block; the keys are concat(grid, latents), only the grid part is kept, so a
                     map sums to the latent's attention mass on the image (<= 1), not to 1
  qformer            Q query tokens, the cross-attention layers (every cross_attention_frequency-th)
  qwen_vl_resampler  Q queries, its one cross-attention
  tokenpacker        one query per s x s region; it attends only inside its region (zero elsewhere)
  d_abstractor       M queries with deformable attention: the softmax weights of the H*P sampling points spread
                     onto the grid by their bilinear weights (points outside the map lose their mass)
  gated_xattn        through its resampler, when that is one of the above
Every map (except the perceiver's and d_abstractor's, see above) sums to 1 over the grid.

lm_attention_to_image: the LM's last-layer (or `layer`) self-attention from the last prompt token (the position
that predicts the first answer token) to the visual tokens in its input, averaged over heads: probabilities over
the whole prompt, so a map sums to the share of attention that goes to the image. For projectors that keep the
grid (`GRID_KEEPING_PROJECTORS`: one token per patch, or per s x s window of patches, row-major) the M visual
tokens are laid out on their grid (gh, gw); with as_grid=False any merging projector gives [B, M].

Images are uint8 [H, W, 3] arrays (as for mmproj.generate); prompts go through mmproj.inference.encode_prompt.
"""
from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmproj import inference, projectors
from mmproj.layers.feature_map import bilinear_sample
from mmproj.model import encoder_grid, injects_into_lm, num_image_tokens

PROBS = 'attention_probs'   # the sow name in mmproj.layers.Attention / CrossAttention

# Projector -> does a module path (below the projector) hold an attention over the encoder grid?
_GRID_ATTENTION = {
    'cross_attention': lambda path: len(path) == 1 and path[0].startswith('attn_'),
    'perceiver': lambda path: path[-1:] == ('self_attn',),
    'qformer': lambda path: 'cross_attention' in path,
    'qwen_vl_resampler': lambda path: path == ('attn',),
    'tokenpacker': lambda path: path == ('attn',),
}
GRID_ATTENTION_PROJECTORS = tuple(sorted(_GRID_ATTENTION)) + ('d_abstractor',)


def _scaled_grid(field: str):
  return lambda p, h, w: (h // getattr(p, field), w // getattr(p, field))


def _output_grid(p, h, w):
  og = p.output_grid
  return (og, og) if isinstance(og, int) else tuple(og)


# Projector -> (its module, encoder grid h, w) -> the grid (gh, gw) its visual tokens keep, row-major.
_TOKEN_GRID = {
    'linear': lambda p, h, w: (h, w),
    'mlp': lambda p, h, w: (h, w),
    'pixel_shuffle': _scaled_grid('scale_factor'),
    'patch_merger': _scaled_grid('spatial_merge_size'),
    'tokenpacker': _scaled_grid('scale'),
    'ldp': lambda p, h, w: (-(-h // 2), -(-w // 2)),
    'ldpv2': lambda p, h, w: (-(-h // p.pool), -(-w // p.pool)),
    'avg_pool': _output_grid,
    'c_abstractor': lambda p, h, w: (math.isqrt(p.num_queries),) * 2,
}
GRID_KEEPING_PROJECTORS = tuple(sorted(_TOKEN_GRID))


def _projector_module(cfg_projector):
  """The projector module cfg.model.projector describes (for its fields; the module's defaults filled in)."""
  return projectors.registry.instantiate(cfg_projector, parent=None)


def _grid_projector(cfg_model) -> tuple[str, Any, tuple[str, ...]]:
  """(name, module, path of its params/intermediates) of the projector whose attention over the grid is read:
  cfg.projector itself, or a gated_xattn's resampler."""
  proj = _projector_module(cfg_model.projector)
  if cfg_model.projector.name == 'gated_xattn':
    sub = {'name': proj.resampler} if isinstance(proj.resampler, str) else dict(proj.resampler)
    return sub['name'], _projector_module(sub), ('projector', 'resampler')
  return cfg_model.projector.name, proj, ('projector',)


def attends_to_grid(cfg_model) -> bool:
  """True when projector_attention supports cfg.model's projector (its queries attend over the patch grid)."""
  return bool(cfg_model.use_image) and _grid_projector(cfg_model)[0] in GRID_ATTENTION_PROJECTORS


def _natural_key(path: tuple[str, ...]):
  """'layers_10' after 'layers_9': compare the numbers in module names as numbers."""
  return [[int(t) if t.isdigit() else t for t in re.split(r'(\d+)', part)] for part in path]


def sown_attention(intermediates) -> dict[str, Any]:
  """The 'intermediates' collection -> {'module/path': probs [B, H, T, S]} for every sown attention, in
  natural module order; a module called k > 1 times gives 'module/path#0' .. '#k-1'."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(intermediates))
  out = {}
  for path in sorted((p for p in flat if p[-1] == PROBS), key=lambda p: _natural_key(p[:-1])):
    calls = flat[path]
    name = '/'.join(path[:-1])
    for i, probs in enumerate(calls):
      out[name if len(calls) == 1 else f'{name}#{i}'] = probs
  return out


def _check_images(bundle, images) -> np.ndarray:
  cfg = bundle.config.model
  if not cfg.use_image:
    raise ValueError(f'{bundle.path or "this model"} is the blind baseline (model.use_image=False): '
                     'it has no attention over an image')
  if images is None or len(images) == 0:
    raise ValueError('images: expected a non-empty list of uint8 [H, W, 3] arrays')
  return inference.prepare_images(bundle, list(images))


def _capture_deformable(module, method_name: str) -> bool:
  """capture_intermediates filter: the sampling offsets and point logits of deformable attention."""
  return method_name == '__call__' and module.name in ('sampling_offsets', 'attention_weights')


@functools.partial(jax.jit, static_argnames=('model', 'prefix', 'capture'))
def _projector_intermediates(model, params, image, prefix: tuple[str, ...], capture: bool):
  """encoder + projector with the 'intermediates' collection mutable -> that collection under `prefix`."""
  _, state = model.apply({'params': params}, image, method=lambda m, x: m.encode(x),
                         mutable=['intermediates'], capture_intermediates=_capture_deformable if capture else False)
  tree = state['intermediates']
  for key in prefix:
    tree = tree.get(key, {})
  return tree


def _deformable_layers(tree, proj, ref: np.ndarray, grid: tuple[int, int]) -> list[np.ndarray]:
  """d_abstractor's captured deformable attention -> per layer [B, M, h*w]: per head, each sampling point's
  softmax weight spread over the cells by its bilinear weights, summed over points; then the mean over heads.
  Locations as in mmproj.layers.DeformableAttention: loc = ref + offsets / (w, h), normalised (x, y)."""
  h, w = grid
  heads, points = proj.num_heads, proj.num_points
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))
  suffix = ('encoder_attn', 'sampling_offsets', '__call__')
  layers = sorted({p[:-len(suffix)] for p in flat if p[-len(suffix):] == suffix}, key=_natural_key)
  identity = jnp.eye(h * w, dtype=jnp.float32).reshape(1, h, w, h * w)     # bilinear_sample of it = cell weights
  out = []
  for layer in layers:
    offsets = np.asarray(flat[layer + suffix][0], np.float32)                # [B, M, H*P*2] pixels
    b, m = offsets.shape[:2]
    offsets = offsets.reshape(b, m, heads, points, 2)                        # [B, M, H, P, 2]
    logits = np.asarray(flat[layer + ('encoder_attn', 'attention_weights', '__call__')][0], np.float32)
    weights = np.asarray(jax.nn.softmax(logits.reshape(b, m, heads, points), axis=-1))  # [B, M, H, P]
    loc = ref[None, :, None, None, :] + offsets / np.asarray([w, h], np.float32)      # [B, M, H, P, 2]
    cells = np.asarray(bilinear_sample(identity, jnp.asarray(loc.reshape(1, -1, 2))))  # [1, B*M*H*P, h*w]
    cells = cells.reshape(b, m, heads, points, h * w)                        # [B, M, H, P, h*w]
    out.append(np.einsum('bmhpn,bmhp->bmn', cells, weights) / heads)         # [B, M, h*w]
  return out


def _grid_map(name: str, proj, probs: np.ndarray, batch: int, grid: tuple[int, int]) -> np.ndarray:
  """One sown attention of a grid-attending projector, probs [B', H, Q, S] -> [B, Q, h*w] (mean over heads)."""
  h, w = grid
  if name == 'tokenpacker':                                                  # probs [B*M, H, 1, s*s]
    s = proj.scale
    hc, wc = h // s, w // s
    region = probs.mean(axis=1)[:, 0].reshape(batch, hc, wc, s, s)           # [B, h/s, w/s, s, s]
    out = np.zeros((batch, hc, wc, h, w), np.float32)
    for i in range(hc):
      for j in range(wc):
        out[:, i, j, i * s:(i + 1) * s, j * s:(j + 1) * s] = region[:, i, j]
    return out.reshape(batch, hc * wc, h * w)
  if name == 'perceiver':
    probs = probs[..., :h * w]                                               # keys: concat(grid, latents)
  if probs.shape[-1] != h * w:
    raise ValueError(f'{name} projector: attention over {probs.shape[-1]} keys, expected the {h}x{w} grid')
  return probs.mean(axis=1)                                                  # [B, Q, h*w]


def projector_attention(bundle, images: Sequence[np.ndarray], *, layer: int | None = None) -> np.ndarray:
  """Each projector query's attention over the encoder's patch grid: float32 [B, Q, h, w].

  images: uint8 [H, W, 3] arrays (one per row). Heads are averaged; layer=None averages the projector's attention
  layers that read the grid, layer=i takes one (-1 = the last). See the module docstring for what each projector's
  maps mean. ValueError naming the projector when its tokens come from no attention over the grid (mlp, linear,
  pixel_shuffle, ...): use lm_attention_to_image for those.
  """
  cfg = bundle.config.model
  pixels = _check_images(bundle, images)                                     # [B, S, S, 3]
  name, proj, prefix = _grid_projector(cfg)
  if name not in GRID_ATTENTION_PROJECTORS:
    what = f'model.projector.name={cfg.projector.name!r}' + (
        f' (resampler {name!r})' if cfg.projector.name != name else '')
    instead = ('' if injects_into_lm(cfg) else
               '. Use lm_attention_to_image(bundle, images, prompts) to see where the LM looks instead')
    raise ValueError(f'{what} has no queries attending over the image grid; projector_attention supports '
                     f'{list(GRID_ATTENTION_PROJECTORS)}{instead}')
  h, w = encoder_grid(cfg)
  tree = _projector_intermediates(bundle.model, bundle.params, jnp.asarray(pixels), prefix,
                                  name == 'd_abstractor')
  if name == 'd_abstractor':
    params = bundle.params
    for key in prefix:
      params = params[key]
    ref = np.asarray(nn.unbox(params['reference_points']), np.float32)       # [M, 2] normalised (x, y)
    per_layer = _deformable_layers(tree, proj, ref, (h, w))
  else:
    per_layer = []
    for path, probs in sown_attention(tree).items():
      if _GRID_ATTENTION[name](tuple(path.split('#')[0].split('/'))):
        per_layer.append(_grid_map(name, proj, np.asarray(probs, np.float32), len(pixels), (h, w)))
  if not per_layer:
    raise ValueError(f'{name} projector: no attention over the grid was recorded (model.projector={cfg.projector})')
  if layer is None:
    maps = np.mean(per_layer, axis=0)                                        # [B, Q, h*w]
  else:
    if not -len(per_layer) <= layer < len(per_layer):
      raise ValueError(f'layer={layer}: the {name} projector has {len(per_layer)} attention layer(s) over the grid')
    maps = per_layer[layer]
  return maps.reshape(maps.shape[0], maps.shape[1], h, w).astype(np.float32)  # [B, Q, h, w]


def visual_token_grid(cfg_model) -> tuple[int, int]:
  """(gh, gw): the grid the LM's M visual tokens keep (row-major), for the projectors in GRID_KEEPING_PROJECTORS;
  ValueError naming the projector for the others (their tokens are queries, not places)."""
  name = cfg_model.projector.name
  if not cfg_model.use_image or injects_into_lm(cfg_model):
    raise ValueError(f'model.projector.name={name!r}: the LM input holds no visual tokens'
                     + ('' if cfg_model.use_image else ' (model.use_image=False)'))
  if name not in _TOKEN_GRID:
    raise ValueError(f'model.projector.name={name!r} does not keep the patch grid (its tokens are not places on '
                     f'the image); grid-keeping projectors: {list(GRID_KEEPING_PROJECTORS)}. Pass as_grid=False '
                     'for one value per visual token, or use projector_attention')
  h, w = encoder_grid(cfg_model)
  gh, gw = (int(v) for v in _TOKEN_GRID[name](_projector_module(cfg_model.projector), h, w))
  m = num_image_tokens(cfg_model)
  if gh * gw != m:
    raise ValueError(f'model.projector.name={name!r}: grid {gh}x{gw} does not hold its {m} visual tokens')
  return gh, gw


@functools.partial(jax.jit, static_argnames=('model', 'layer'))
def _last_token_attention(model, params, batch, layer: int):
  """Full forward with 'intermediates' mutable -> LM block `layer`'s attention of the last column, mean over
  heads: [B, L]."""
  _, state = model.apply({'params': params}, batch, mutable=['intermediates'])
  lm = state['intermediates']['lm']
  if 'layers' in lm:                                    # scanned LM (model.lm.scan_layers): stacked [depth, ...]
    probs = lm['layers']['self_attn'][PROBS][0][layer]                             # [B, H, L, L]
  else:
    probs = lm[f'layers_{layer}']['self_attn'][PROBS][0]                           # [B, H, L, L]
  return jnp.mean(probs[:, :, -1, :], axis=1)                                      # [B, L]


def lm_attention_to_image(bundle, images: Sequence[np.ndarray], prompts: Sequence[str], *, layer: int = -1,
                          as_grid: bool = True) -> np.ndarray:
  """The LM's attention from each prompt's last token to its visual tokens, mean over heads, LM block `layer`
  (-1 = the last): float32 [B, gh, gw] on the grid the visual tokens keep (`visual_token_grid`), or [B, M] with
  as_grid=False (any projector whose tokens enter the LM sequence).

  images: uint8 [H, W, 3] arrays, one per prompt; prompts as for mmproj.generate (the shapes format puts the image
  first when a prompt has no <image>; an HF prompt needs its <image>). Values are probabilities over the whole
  prompt: a map sums to the share of that token's attention that goes to the image.
  """
  cfg = bundle.config.model
  if isinstance(prompts, str):
    raise TypeError('prompts must be a list of strings (one per image), not a single string')
  prompts = list(prompts)
  if images is None or len(images) != len(prompts):
    raise ValueError(f'{len(prompts)} prompts need {len(prompts)} images, got {0 if images is None else len(images)}')
  if injects_into_lm(cfg):
    raise ValueError(f'model.projector.name={cfg.projector.name!r} injects the image through cross-attention: '
                     'the LM sequence holds no visual tokens to attend to (projector_attention reads its resampler)')
  image = _check_images(bundle, images)
  depth = int(cfg.lm.depth)
  if not -depth <= layer < depth:
    raise ValueError(f'layer={layer}: the LM has {depth} blocks (model.lm.depth)')
  grid = visual_token_grid(cfg) if as_grid else None
  rows = [inference.encode_prompt(bundle, p, where=f'prompts[{i}]') for i, p in enumerate(prompts)]
  length = -(-max(len(r) for r in rows) // 16) * 16          # as mmproj.generate: similar batches share a program
  if length > int(cfg.lm.max_len):
    raise ValueError(f'prompts of {length} tokens (padded) exceed model.lm.max_len={cfg.lm.max_len}')
  tokens = np.full((len(rows), length), bundle.pad_id, np.int32)                  # [B, L] left-padded
  mask = np.zeros((len(rows), length), np.int32)                                  # [B, L]
  for b, row in enumerate(rows):
    tokens[b, length - len(row):] = row
    mask[b, length - len(row):] = 1
  positions = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)
  batch = {'image': image, 'tokens': tokens, 'input_mask': mask, 'positions': positions}
  attention = np.asarray(_last_token_attention(bundle.model, bundle.params, batch, layer % depth))  # [B, L]
  m = bundle.num_image_tokens
  is_image = (tokens == int(cfg.image_token_id)) & (mask == 1)                   # [B, L]
  for b, count in enumerate(is_image.sum(axis=1)):
    if count != m:
      raise ValueError(f'prompts[{b}] holds {count} visual tokens, expected {m} (one <image>)')
  visual = attention[is_image].reshape(len(rows), m).astype(np.float32)         # [B, M], in token order
  return visual if grid is None else visual.reshape(len(rows), *grid)           # [B, gh, gw]
