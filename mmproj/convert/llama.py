"""HF Llama-family causal LMs (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM) -> mmproj `Llama`.

  cfg_lm = lm_config_from_hf(read_config(path))               # dict of cfg.model.lm fields
  params = lm_params_from_hf(StateDict(tensors), cfg_lm)       # the 'lm' params subtree
  lm, params = load_lm(path)                                   # both, from an HF directory (safetensors only)
  lm, params = mmproj.convert.from_transformers(torch_model)   # the same from an in-memory transformers model
  hf_text_config = lm_config_to_hf(cfg_lm)                     # export: the inverse mappings
  tensors = lm_params_to_hf(params, cfg_lm, prefix='model.', head_prefix='lm_head.')

Config mapping (HF -> cfg.model.lm): vocab_size, hidden_size -> width, num_hidden_layers -> depth,
num_attention_heads -> num_heads, num_key_value_heads -> num_kv_heads, head_dim, intermediate_size -> mlp_dim,
rope_theta, rms_norm_eps -> norm_eps, tie_word_embeddings -> tie_embeddings, max_position_embeddings -> max_len,
qkv_bias (Qwen2: always True), rope_scaling (HF `rope_parameters` of transformers >= 5, or the older top-level
`rope_theta` + `rope_scaling`; rope_type 'default', 'linear' and 'llama3'), sliding_window (Mistral; Qwen2 only
when use_sliding_window puts every layer in sliding attention).
Rejected with a ValueError naming the HF field: hidden_act other than silu, attention_bias / mlp_bias (Llama biases
on o_proj / the MLP), partial_rotary_factor != 1, other rope types, Qwen2 sliding windows on only some layers.

Weights: HF Linear (out, in) -> flax kernels with heads as separate axes (q_proj [D, H, Dh], k/v_proj
[D, Hkv, Dh], o_proj [H, Dh, D]); RMSNorm weight -> scale. Tied embeddings: lm_head.weight may be absent or
present (then it must equal embed_tokens.weight). Ignored keys: rotary `inv_freq` buffers (recomputed from the
config), which older transformers versions saved in state dicts.

Saved configs may be diff-only (transformers 4 wrote only non-default fields, e.g. a released LLaVA's text_config):
missing fields take the HF class defaults of the model_type (`HF_DEFAULTS`).

Export (`lm_config_to_hf`, `lm_params_to_hf`) inverts both mappings. The model_type is 'qwen2' when qkv_bias is set,
else 'mistral' when sliding_window is set, else 'llama' (or name one). RoPE goes into transformers 5's `rope_parameters` and
also the older `rope_theta` / `rope_scaling` fields (5 ignores them when rope_parameters is set, 4 reads only them);
a tied head writes no lm_head.weight (as HF's save_pretrained does).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mmproj.convert.base import StateDict, converter
from mmproj.lm import lm_fields
from mmproj.layers.rope import ROPE_SCALING_KEYS

MODEL_TYPES = ('llama', 'mistral', 'qwen2')
# prefix (decoder) and head_prefix (lm_head) of the LM inside common checkpoint layouts
PREFIXES = {
    'causal_lm': ('model.', 'lm_head.'),                       # LlamaForCausalLM & co.
    'llava': ('model.language_model.', 'lm_head.'),            # LlavaForConditionalGeneration (transformers >= 4.52)
    'llava_legacy': ('language_model.model.', 'language_model.lm_head.'),  # older LLaVA checkpoints
}


# HF config class defaults (transformers 5) for the fields `lm_config_from_hf` reads; a diff-only config.json omits
# fields equal to these.
HF_DEFAULTS = {
    'llama': dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=None, hidden_act='silu', max_position_embeddings=2048,
                  rms_norm_eps=1e-6, tie_word_embeddings=False),
    'mistral': dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, hidden_act='silu',
                    max_position_embeddings=4096 * 32, rms_norm_eps=1e-6, tie_word_embeddings=False,
                    sliding_window=4096),
    'qwen2': dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, hidden_act='silu', max_position_embeddings=32768,
                  rms_norm_eps=1e-6, tie_word_embeddings=False, use_sliding_window=False, sliding_window=4096,
                  max_window_layers=28),
}


def _rope(hf: dict) -> tuple[float, dict | None]:
  """HF rope fields -> (rope_theta, rope_scaling or None)."""
  params = dict(hf.get('rope_parameters') or hf.get('rope_scaling') or {})
  if params and all(isinstance(v, dict) for v in params.values()):
    raise ValueError(f'rope_parameters per layer type ({sorted(params)}) are not supported')
  theta = float(params.get('rope_theta', hf.get('rope_theta', 10000.0)) or 10000.0)
  partial = params.get('partial_rotary_factor', hf.get('partial_rotary_factor', 1.0))
  if partial not in (None, 1, 1.0):
    raise ValueError(f'partial_rotary_factor={partial} is not supported (model.lm rotates the whole head_dim)')
  rope_type = params.get('rope_type', params.get('type', 'default'))
  if rope_type == 'default':
    return theta, None
  if rope_type not in ROPE_SCALING_KEYS:
    raise ValueError(f'rope_type {rope_type!r} (HF rope_parameters/rope_scaling) is not supported; supported: '
                     f"['default'] + {sorted(ROPE_SCALING_KEYS)} (model.lm.rope_scaling)")
  if rope_type == 'llama3':
    params.setdefault('original_max_position_embeddings',
                      hf.get('original_max_position_embeddings', hf['max_position_embeddings']))
  scaling = {'rope_type': rope_type}
  for key in ROPE_SCALING_KEYS[rope_type]:
    if params.get(key) is None:
      raise ValueError(f'rope_type {rope_type!r} needs {key!r} in HF rope_parameters/rope_scaling')
    scaling[key] = params[key]
  return theta, scaling


def _sliding_window(hf: dict) -> int | None:
  model_type = hf.get('model_type')
  window = hf.get('sliding_window')
  if model_type == 'qwen2':
    if not hf.get('use_sliding_window', False):
      return None
    layer_types = hf.get('layer_types') or []
    if any(t != 'sliding_attention' for t in layer_types):
      raise ValueError('Qwen2 use_sliding_window with full-attention layers (max_window_layers / layer_types) is '
                       'not supported: model.lm.sliding_window applies to every layer')
  if model_type == 'llama':
    return None
  return None if window is None else int(window)


def lm_config_from_hf(hf_config: dict) -> dict:
  """An HF config dict (config.json of a Llama / Mistral / Qwen2 causal LM, or a VLM's text_config) -> the
  cfg.model.lm fields. ValueError naming the HF field for anything model.lm cannot represent exactly."""
  hf = dict(hf_config)
  model_type = hf.get('model_type')
  if model_type not in MODEL_TYPES:
    raise ValueError(f'model_type {model_type!r} is not supported; supported: {list(MODEL_TYPES)}')
  hf = {**HF_DEFAULTS[model_type], **hf}              # diff-only configs: absent fields are the class defaults
  act = hf.get('hidden_act', 'silu')
  if act not in ('silu', 'swish'):
    raise ValueError(f'hidden_act={act!r} is not supported (model.lm uses a SwiGLU MLP with silu)')
  for field in ('attention_bias', 'mlp_bias'):
    if hf.get(field):
      raise ValueError(f'{field}=True is not supported (model.lm has biases on q/k/v only: qkv_bias)')
  num_heads = hf['num_attention_heads']
  theta, scaling = _rope(hf)
  return dict(
      vocab_size=hf['vocab_size'],
      width=hf['hidden_size'],
      depth=hf['num_hidden_layers'],
      num_heads=num_heads,
      num_kv_heads=hf.get('num_key_value_heads') or num_heads,
      head_dim=hf.get('head_dim') or hf['hidden_size'] // num_heads,
      mlp_dim=hf['intermediate_size'],
      rope_theta=theta,
      norm_eps=float(hf.get('rms_norm_eps', 1e-6)),
      tie_embeddings=bool(hf.get('tie_word_embeddings', False)),
      max_len=hf.get('max_position_embeddings', 2048),
      qkv_bias=model_type == 'qwen2',
      rope_scaling=scaling,
      sliding_window=_sliding_window(hf),
  )


def _heads_in(sd: StateDict, key: str, d: int, h: int, dh: int, bias: bool) -> dict:
  """q/k/v_proj: weight [H*Dh, D] -> kernel [D, H, Dh] (+ bias [H*Dh] -> [H, Dh])."""
  out = {'kernel': sd.take(f'{key}.weight', (h * dh, d)).T.reshape(d, h, dh)}
  if bias:
    out['bias'] = sd.take(f'{key}.bias', (h * dh,)).reshape(h, dh)
  return out


def lm_params_from_hf(sd: StateDict, cfg_lm: Any, prefix: str = 'model.', head_prefix: str = 'lm_head.') -> dict:
  """The decoder under `prefix` and the head at `head_prefix` of an HF state dict -> mmproj Llama params.

  Takes (marks used) every LM key, rotary inv_freq buffers under `prefix` included; does not call
  `sd.finish()`, so a caller converting a larger model (e.g. LLaVA: vision tower + projector + LM) finishes once.
  """
  c = lm_fields(cfg_lm)
  d, h, hkv, dh = c['width'], c['num_heads'], c['num_kv_heads'], c['head_dim']
  f, v = c['mlp_dim'], c['vocab_size']
  bias = bool(c['qkv_bias'])
  embed = sd.take(f'{prefix}embed_tokens.weight', (v, d))
  p: dict[str, Any] = {'embed_tokens': {'embedding': embed}}
  for i in range(c['depth']):
    q = f'{prefix}layers.{i}.'
    p[f'layers_{i}'] = {
        'input_layernorm': {'scale': sd.take(f'{q}input_layernorm.weight', (d,))},
        'self_attn': {
            'q_proj': _heads_in(sd, f'{q}self_attn.q_proj', d, h, dh, bias),
            'k_proj': _heads_in(sd, f'{q}self_attn.k_proj', d, hkv, dh, bias),
            'v_proj': _heads_in(sd, f'{q}self_attn.v_proj', d, hkv, dh, bias),
            'o_proj': {'kernel': sd.take(f'{q}self_attn.o_proj.weight', (d, h * dh)).T.reshape(h, dh, d)},
        },
        'post_attention_layernorm': {'scale': sd.take(f'{q}post_attention_layernorm.weight', (d,))},
        'mlp': {
            'gate_proj': {'kernel': sd.take(f'{q}mlp.gate_proj.weight', (f, d)).T},
            'up_proj': {'kernel': sd.take(f'{q}mlp.up_proj.weight', (f, d)).T},
            'down_proj': {'kernel': sd.take(f'{q}mlp.down_proj.weight', (d, f)).T},
        },
    }
  p['norm'] = {'scale': sd.take(f'{prefix}norm.weight', (d,))}
  head_key = f'{head_prefix}weight'
  if c['tie_embeddings']:
    if head_key in sd:                                   # some checkpoints save the tied head anyway
      head = sd.take(head_key, (v, d))
      if not np.array_equal(head, embed):
        raise ValueError(f'{sd.where}: {head_key!r} differs from {prefix}embed_tokens.weight but '
                         'tie_word_embeddings is set (model.lm.tie_embeddings)')
  else:
    p['lm_head'] = {'kernel': sd.take(head_key, (v, d)).T}
  for key in sd.keys():                                  # non-persistent in current transformers; derived anyway
    if key.startswith(prefix) and key.endswith('rotary_emb.inv_freq'):
      sd.take(key)
  return p


def build_lm_module(cfg_lm: dict, dtype: Any = None):
  from mmproj.lm import build_lm
  return build_lm(cfg_lm) if dtype is None else build_lm(cfg_lm, dtype)


@converter('LlamaForCausalLM', 'MistralForCausalLM', 'Qwen2ForCausalLM')
def causal_lm(module: Any):
  """A transformers Llama / Mistral / Qwen2 causal LM -> (mmproj Llama, params)."""
  cfg_lm = lm_config_from_hf(module.config.to_dict())
  sd = StateDict.of(module)
  params = lm_params_from_hf(sd, cfg_lm)
  sd.finish()
  return build_lm_module(cfg_lm), params


def load_lm(path: str, dtype: Any = None) -> tuple[Any, dict]:
  """An HF directory holding a Llama / Mistral / Qwen2 causal LM (config.json + safetensors) -> (Llama, params).

  Every tensor in the directory must be used (a ValueError names the first unused, missing or mis-shaped key).
  """
  from mmproj.convert.hf_dir import read_config, read_safetensors

  hf = read_config(path)
  archs = hf.get('architectures') or []
  if archs and not set(archs) & {'LlamaForCausalLM', 'MistralForCausalLM', 'Qwen2ForCausalLM'}:
    raise ValueError(f'{path}: architectures {archs} are not a Llama / Mistral / Qwen2 causal LM')
  cfg_lm = lm_config_from_hf(hf)
  sd = StateDict(read_safetensors(path), where=path)
  params = lm_params_from_hf(sd, cfg_lm)
  sd.finish()
  return build_lm_module(cfg_lm, dtype), params


# -- export: mmproj Llama -> HF Llama / Mistral / Qwen2 -----------------------------------------------------------


def lm_config_to_hf(cfg_lm: Any, model_type: str | None = None) -> dict:
  """cfg.model.lm -> an HF LlamaConfig / MistralConfig / Qwen2Config dict (transformers >= 5 field names) that
  `lm_config_from_hf` maps back to the same fields. ValueError naming the model.lm field the chosen model_type
  cannot represent (qkv_bias outside Qwen2, a sliding window on Llama, gated cross-attention)."""
  if dict(cfg_lm).get('cross_attention') is not None:
    raise ValueError('model.lm.cross_attention is set: HF Llama / Mistral / Qwen2 have no gated cross-attention')
  c = lm_fields(cfg_lm)
  bias, window = bool(c['qkv_bias']), c['sliding_window']
  if model_type is None:
    model_type = 'qwen2' if bias else 'mistral' if window is not None else 'llama'
  if model_type not in MODEL_TYPES:
    raise ValueError(f'model_type {model_type!r} is not supported; supported: {list(MODEL_TYPES)}')
  if bias != (model_type == 'qwen2'):
    raise ValueError(f'model.lm.qkv_bias={bias} does not fit model_type {model_type!r} (only qwen2 has q/k/v '
                     'biases, and always)')
  if window is not None and model_type == 'llama':
    raise ValueError(f'model.lm.sliding_window={window}: Llama has no sliding window (use mistral or qwen2)')
  h = int(c['num_heads'])
  rope_parameters = {'rope_type': 'default', 'rope_theta': float(c['rope_theta'])}
  scaling = c['rope_scaling']
  if scaling is not None:
    rope_parameters.update(dict(scaling))
  out = dict(
      model_type=model_type, vocab_size=int(c['vocab_size']), hidden_size=int(c['width']),
      intermediate_size=int(c['mlp_dim']), num_hidden_layers=int(c['depth']), num_attention_heads=h,
      num_key_value_heads=int(c['num_kv_heads']), head_dim=int(c['head_dim']),
      hidden_act='silu', max_position_embeddings=int(c['max_len']),
      rms_norm_eps=float(c['norm_eps']), tie_word_embeddings=bool(c['tie_embeddings']),
      rope_parameters=rope_parameters, rope_theta=rope_parameters['rope_theta'])   # rope_theta: for transformers 4
  if scaling is not None:
    out['rope_scaling'] = dict(scaling)                                            # transformers 4's field
  if model_type == 'llama':
    out.update(attention_bias=False, mlp_bias=False)
  elif model_type == 'mistral':
    out['sliding_window'] = None if window is None else int(window)
  else:                                    # qwen2: one window on every layer, or none
    n = int(c['depth'])
    out.update(use_sliding_window=window is not None, sliding_window=None if window is None else int(window),
               max_window_layers=0 if window is not None else n,
               layer_types=['sliding_attention' if window is not None else 'full_attention'] * n)
  return out


def lm_params_to_hf(params: Any, cfg_lm: Any, prefix: str = 'model.', head_prefix: str = 'lm_head.'
                    ) -> dict[str, np.ndarray]:
  """mmproj Llama params -> {HF key: float32 array}: the decoder under `prefix`, the head at `head_prefix` (absent
  when tied). Inverse of `lm_params_from_hf`; every param must be used and have the configured shape (ValueError
  naming the param path otherwise)."""
  from mmproj.convert.base import ParamReader

  c = lm_fields(cfg_lm)
  d, h, hkv, dh = int(c['width']), int(c['num_heads']), int(c['num_kv_heads']), int(c['head_dim'])
  f, v = int(c['mlp_dim']), int(c['vocab_size'])
  bias = bool(c['qkv_bias'])
  r = ParamReader(params, where='lm params')
  out: dict[str, np.ndarray] = {f'{prefix}embed_tokens.weight': r.take('embed_tokens/embedding', (v, d))}
  for i in range(int(c['depth'])):
    q, k = f'{prefix}layers.{i}.', f'layers_{i}/'
    out[f'{q}input_layernorm.weight'] = r.take(f'{k}input_layernorm/scale', (d,))
    for name, heads in (('q_proj', h), ('k_proj', hkv), ('v_proj', hkv)):
      kernel = r.take(f'{k}self_attn/{name}/kernel', (d, heads, dh))                 # [D, H, Dh]
      out[f'{q}self_attn.{name}.weight'] = kernel.reshape(d, heads * dh).T           # [H*Dh, D]
      if bias:
        out[f'{q}self_attn.{name}.bias'] = r.take(f'{k}self_attn/{name}/bias', (heads, dh)).reshape(-1)
    out[f'{q}self_attn.o_proj.weight'] = r.take(f'{k}self_attn/o_proj/kernel', (h, dh, d)).reshape(h * dh, d).T
    out[f'{q}post_attention_layernorm.weight'] = r.take(f'{k}post_attention_layernorm/scale', (d,))
    out[f'{q}mlp.gate_proj.weight'] = r.take(f'{k}mlp/gate_proj/kernel', (d, f)).T                # [F, D]
    out[f'{q}mlp.up_proj.weight'] = r.take(f'{k}mlp/up_proj/kernel', (d, f)).T                    # [F, D]
    out[f'{q}mlp.down_proj.weight'] = r.take(f'{k}mlp/down_proj/kernel', (f, d)).T                # [D, F]
  out[f'{prefix}norm.weight'] = r.take('norm/scale', (d,))
  if not c['tie_embeddings']:
    out[f'{head_prefix}weight'] = r.take('lm_head/kernel', (d, v)).T                               # [V, D]
  r.finish()
  return {key: np.ascontiguousarray(value, np.float32) for key, value in out.items()}


def export_lm(cfg_lm: Any, params: Any, out_dir: str, *, tokenizer_file: str | None = None,
              bos_token_id: int | None = None, eos_token_id: int | None = None,
              pad_token_id: int | None = None) -> str:
  """Writes Llama params as an HF directory that `AutoModelForCausalLM.from_pretrained(out_dir)` loads with no
  missing or unexpected keys: config.json (+ the token ids), model.safetensors (float32), generation_config.json
  when a token id is given, and tokenizer.json (a copy of `tokenizer_file`). Returns out_dir."""
  from mmproj.convert import hf_dir

  config = lm_config_to_hf(cfg_lm)
  config['architectures'] = [{'llama': 'LlamaForCausalLM', 'mistral': 'MistralForCausalLM',
                              'qwen2': 'Qwen2ForCausalLM'}[config['model_type']]]
  ids = {k: v for k, v in (('bos_token_id', bos_token_id), ('eos_token_id', eos_token_id),
                           ('pad_token_id', pad_token_id)) if v is not None}
  config.update(ids)
  return hf_dir.write_dir(out_dir, config, lm_params_to_hf(params, cfg_lm),
                          json_files={'generation_config.json': ids} if ids else None,
                          copies={'tokenizer.json': tokenizer_file} if tokenizer_file else None)
