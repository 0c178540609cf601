"""Perceiver resamplers: transformers Idefics2PerceiverResampler, Idefics2Connector and Idefics v1's
IdeficsPerceiverResampler -> mmproj `perceiver`.

  Idefics2PerceiverResampler  -> perceiver(variant='idefics2', proj='none'); called as
                                 apply(params, context [B, N, D], grid=(h, w), mask=attention_mask [B, N])
  Idefics2Connector           -> perceiver(variant='idefics2', proj='swiglu'); called as
                                 apply(params, image_hidden_states [B, N, Dv], grid=(h, w), mask=attention_mask)
  IdeficsPerceiverResampler   -> perceiver(variant='flamingo', act='relu', proj='none', qk_norm=...); called as
                                 apply(params, context [B, N, D], grid=(h, w))  (no mask: the reference has none)

The perceiver reads x as F frames of grid (h, w) (F = N / (h*w)); for an input whose tokens are not a grid (e.g.
Idefics v1's vision states with a CLS token, N = 1 + h*w) pass grid=(1, N).

Weights map one to one (HF Linear (out, in) -> flax kernels with heads as axes); the config is inferred from the
weights and the modules' attributes, every key must be used.
"""

from __future__ import annotations

from typing import Any

from mmproj import projectors
from mmproj.convert.base import StateDict, activation, converter


def _attention(sd: StateDict, prefix: str, d: int, h: int, hkv: int, dh: int, out_name: str = 'o_proj') -> dict:
  """q/k/v/o Linear weights (no biases) at `prefix` -> mmproj CrossAttention params."""
  return {
      'q_proj': {'kernel': sd.kernel(f'{prefix}.q_proj', d, h * dh).reshape(d, h, dh)},
      'k_proj': {'kernel': sd.kernel(f'{prefix}.k_proj', d, hkv * dh).reshape(d, hkv, dh)},
      'v_proj': {'kernel': sd.kernel(f'{prefix}.v_proj', d, hkv * dh).reshape(d, hkv, dh)},
      'o_proj': {'kernel': sd.kernel(f'{prefix}.{out_name}', h * dh, d).reshape(h, dh, d)},
  }


def _gated_mlp(sd: StateDict, prefix: str) -> dict:
  """HF Idefics2MLP (gate_proj/up_proj/down_proj, no biases) -> mmproj SwiGLU params."""
  return {k: {'kernel': sd.kernel(f'{prefix}.{k}')} for k in ('gate_proj', 'up_proj', 'down_proj')}


def _ff_mult(hidden: int, d: int, where: str) -> int:
  if hidden % d:
    raise ValueError(f'{where}: MLP hidden width {hidden} is not a multiple of the width {d}')
  return hidden // d


def _idefics2_resampler(module: Any, sd: StateDict, prefix: str) -> tuple[dict, dict]:
  """Idefics2PerceiverResampler at `prefix` of `sd` -> (perceiver cfg fields, params)."""
  m, d = sd.take(f'{prefix}latents').shape
  layers = list(module.layers)
  attn = layers[0].self_attn
  h, hkv, dh = attn.num_heads, attn.num_key_value_heads, attn.head_dim
  eps = module.norm.variance_epsilon
  act = activation(layers[0].mlp.act_fn, 'Idefics2PerceiverResampler mlp act_fn (hidden_act)')
  ff_mult = _ff_mult(layers[0].mlp.gate_proj.out_features, d, 'Idefics2PerceiverResampler')
  params = {'latents': sd.take(f'{prefix}latents')}
  for i, layer in enumerate(layers):
    for norm in (layer.input_latents_norm, layer.input_context_norm, layer.post_attention_layernorm):
      if norm.variance_epsilon != eps:
        raise ValueError(f'Idefics2PerceiverResampler layer {i}: norm eps {norm.variance_epsilon} != {eps}')
    p = f'{prefix}layers.{i}'
    params[f'layers_{i}'] = {
        'input_latents_norm': sd.norm(f'{p}.input_latents_norm', bias=False),
        'input_context_norm': sd.norm(f'{p}.input_context_norm', bias=False),
        'self_attn': _attention(sd, f'{p}.self_attn', d, h, hkv, dh),
        'post_attention_layernorm': sd.norm(f'{p}.post_attention_layernorm', bias=False),
        'mlp': _gated_mlp(sd, f'{p}.mlp'),
    }
  params['norm'] = sd.norm(f'{prefix}norm', bias=False)
  cfg = dict(name='perceiver', variant='idefics2', num_latents=m, depth=len(layers), num_heads=h,
             num_kv_heads=hkv, head_dim=dh, ff_mult=ff_mult, act=act, norm_eps=eps, qk_norm=False)
  return cfg, params


@converter('Idefics2PerceiverResampler')
def idefics2_perceiver_resampler(module: Any):
  sd = StateDict.of(module)
  cfg, params = _idefics2_resampler(module, sd, '')
  sd.finish()
  d = params['latents'].shape[1]
  return projectors.build(dict(cfg, proj='none'), in_dim=d, out_dim=d), params


@converter('Idefics2Connector')
def idefics2_connector(module: Any):
  sd = StateDict.of(module)
  cfg, params = _idefics2_resampler(module.perceiver_resampler, sd, 'perceiver_resampler.')
  params['modality_projection'] = _gated_mlp(sd, 'modality_projection')
  sd.finish()
  proj_act = activation(module.modality_projection.act_fn, 'Idefics2Connector modality_projection act_fn')
  if proj_act != cfg['act']:
    raise ValueError(f'Idefics2Connector: modality projection activation {proj_act!r} (text_config.hidden_act) '
                     f'differs from the resampler\'s {cfg["act"]!r}; mmproj perceiver uses one `act` for both')
  in_dim, hidden = params['modality_projection']['gate_proj']['kernel'].shape
  out_dim = params['latents'].shape[1]
  return projectors.build(dict(cfg, proj='swiglu', proj_hidden=hidden), in_dim=in_dim, out_dim=out_dim), params


@converter('IdeficsPerceiverResampler')
def idefics_perceiver_resampler(module: Any):
  """Idefics v1 (Flamingo-style): LayerNorms, ReLU FF without biases, optional per-head q/k LayerNorms."""
  sd = StateDict.of(module)
  m, d = sd.take('latents').shape
  h, dh, qk_norm = module.n_heads, module.head_dim, bool(module.qk_layer_norms)
  eps = module.layer_norm.eps
  blocks = list(module.blocks)
  act = activation(blocks[0][1].act, 'IdeficsMLP.act')
  ff_mult = _ff_mult(blocks[0][1].fc.out_features, d, 'IdeficsPerceiverResampler')
  params = {'latents': sd.take('latents')}
  for i, (attn, mlp) in enumerate(blocks):
    norms = [attn.context_layer_norm, attn.latents_layer_norm, mlp.ln]
    norms += [attn.q_layer_norm, attn.k_layer_norm] if qk_norm else []
    if any(n.eps != eps for n in norms):
      raise ValueError(f'IdeficsPerceiverResampler block {i}: LayerNorm eps differ from {eps}')
    p = f'blocks.{i}'
    self_attn = _attention(sd, f'{p}.0', d, h, h, dh, out_name='output_proj')
    if qk_norm:
      self_attn['q_norm'] = sd.norm(f'{p}.0.q_layer_norm')
      self_attn['k_norm'] = sd.norm(f'{p}.0.k_layer_norm')
    params[f'layers_{i}'] = {
        'input_latents_norm': sd.norm(f'{p}.0.latents_layer_norm'),
        'input_context_norm': sd.norm(f'{p}.0.context_layer_norm'),
        'self_attn': self_attn,
        'post_attention_layernorm': sd.norm(f'{p}.1.ln'),
        'mlp': {'fc1': {'kernel': sd.kernel(f'{p}.1.fc')}, 'fc2': {'kernel': sd.kernel(f'{p}.1.c_proj')}},
    }
  params['norm'] = sd.norm('layer_norm')
  sd.finish()
  cfg = dict(name='perceiver', variant='flamingo', num_latents=m, depth=len(blocks), num_heads=h, head_dim=dh,
             ff_mult=ff_mult, act=act, norm_eps=eps, qk_norm=qk_norm, proj='none')
  return projectors.build(cfg, in_dim=d, out_dim=d), params
