"""Whisper-shaped audio towers: transformers weights -> mmproj `WhisperEncoder` (mmproj/encoders/whisper.py).

  cfg_encoder = encoder_config_from_hf(config_dict, output_layer=-1)   # -> cfg.model.encoder (name='whisper')
  params = encoder_params_from_hf(StateDict(tensors), cfg_encoder, prefix='model.encoder.')
  encoder, params = load_audio_encoder('/path/to/hf_dir')              # config.json + safetensors, no pickle
  encoder, params = mmproj.convert.from_transformers(whisper_encoder)  # live torch module
  tokens, grid = encoder.apply({'params': params}, waveforms)          # [B, S] (or features [B, M, F]) -> [B, T, D]

Towers and configs (`encoder_config_from_hf` takes the audio config itself or a full config holding it):
  whisper                WhisperConfig (WhisperModel, WhisperForConditionalGeneration, a bare WhisperEncoder);
                         d_model / encoder_layers / encoder_attention_heads / encoder_ffn_dim
  qwen2_audio_encoder    Qwen2-Audio's tower, `audio_config` of a 'qwen2_audio' config; same names as Whisper.
                         Its forward average-pools pairs of tokens after the blocks, before layer_norm:
                         pool_stride=2
  voxtral_encoder        Voxtral's tower, `audio_config` of a 'voxtral' config; hidden_size / num_hidden_layers /
                         num_attention_heads / intermediate_size. VoxtralEncoder builds an avg_pooler too but its
                         forward never calls it (Voxtral's projector groups 4 frames instead): pool_stride=1
All three: conv1 (k 3) + GELU, conv2 (k 3, stride 2) + GELU, + embed_positions, pre-LN blocks whose k_proj has no
bias, layer_norm (torch LayerNorm, eps 1e-5), and they require exactly 2 * max_source_positions input frames, so
chunk_length defaults to max_source_positions / 50 s (1500 -> 30 s). Their configs' scale_embedding is read by none
of the three encoder forwards (only Whisper's decoder scales), so it is ignored here too; dropout and layerdrop act
in training only.

What the encoder computes, and the HF tensor it equals (f32), out = module(input_features, output_hidden_states=True):
  output_layer=-1 (final_norm)          == out.last_hidden_state (Qwen2-Audio: pooled, then normalised)
  output_layer=k<-1, final_norm=False   == out.hidden_states[k] (HF never normalises or pools those; with
                                           Qwen2-Audio's pool_stride=2, ours is their average-pooled version)
  Blocks above output_layer are not built, so their weights are skipped, like layer_norm when final_norm is off.
  Everything else must be taken: a missing, mis-shaped or unexpected key raises ValueError naming it.

Weight layout: conv weight [D, C_in, 3] -> [3, C_in, D] -> [3 C_in, D]; q/v Linear [D, D] -> kernel [D, H, Dh],
bias [H, Dh]; k_proj has no bias; out_proj [D, D] -> o_proj kernel [H, Dh, D]; fc1 / fc2 -> mlp/fc1, mlp/fc2.
State-dict prefixes (`find_prefix`): '' (a bare encoder), 'encoder.' (WhisperModel), 'model.encoder.'
(WhisperForConditionalGeneration), 'audio_tower.' (Qwen2-Audio / Voxtral as saved), 'model.audio_tower.' (their
in-memory names). A directory of a full model is read for the tower's keys only.
"""

from __future__ import annotations

from typing import Any

from mmproj.convert.base import StateDict, activation, converter
from mmproj.encoders import encoder_fields

# model_type -> (pool_stride, config key of each field, HF defaults for keys a saved (diff-only) config may omit).
_WHISPER_KEYS = dict(width='d_model', depth='encoder_layers', num_heads='encoder_attention_heads',
                     mlp_dim='encoder_ffn_dim')
_FAMILIES = {
    'whisper': (1, _WHISPER_KEYS, dict(d_model=384, encoder_layers=4, encoder_attention_heads=6, encoder_ffn_dim=1536,
                                       num_mel_bins=80, max_source_positions=1500, activation_function='gelu')),
    'qwen2_audio_encoder': (2, _WHISPER_KEYS, dict(d_model=1280, encoder_layers=32, encoder_attention_heads=20,
                                                   encoder_ffn_dim=5120, num_mel_bins=128, max_source_positions=1500,
                                                   activation_function='gelu')),
    'voxtral_encoder': (1, dict(width='hidden_size', depth='num_hidden_layers', num_heads='num_attention_heads',
                                mlp_dim='intermediate_size'),
                        dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=20, intermediate_size=5120,
                             num_mel_bins=128, max_source_positions=1500, activation_function='gelu')),
}
# Top-level model_type of a full config -> model_type of its audio_config (when the nested dict omits it).
_PARENT_TYPES = {'qwen2_audio': 'qwen2_audio_encoder', 'voxtral': 'voxtral_encoder'}

KNOWN_PREFIXES = ('', 'encoder.', 'model.encoder.', 'audio_tower.', 'model.audio_tower.')
_ANCHOR = 'conv1.weight'
_FRAMES_PER_SECOND = 100        # 16 kHz / hop 160


def _audio_config(hf_config: dict) -> tuple[str, dict]:
  """(model_type, audio config dict with HF defaults filled in) of an audio or full config dict."""
  cfg = dict(hf_config)
  if 'audio_config' in cfg:
    parent = cfg.get('model_type')
    cfg = dict(cfg['audio_config'] or {})
    cfg.setdefault('model_type', _PARENT_TYPES.get(parent))
  model_type = cfg.get('model_type')
  if model_type not in _FAMILIES:
    raise ValueError(f'audio config model_type {model_type!r} is not supported; supported: {sorted(_FAMILIES)} '
                     f'(or a full {sorted(_PARENT_TYPES)} config holding one under audio_config)')
  defaults = _FAMILIES[model_type][2]
  return model_type, {**defaults, **{k: v for k, v in cfg.items() if v is not None}}


def encoder_config_from_hf(hf_config: dict, output_layer: int = -1, final_norm: bool | None = None,
                           pool_stride: int | None = None, chunk_length: float | None = None) -> dict:
  """HF Whisper / Qwen2-Audio / Voxtral (audio) config dict -> cfg.model.encoder for the WhisperEncoder.

  final_norm defaults to output_layer == -1 (HF normalises last_hidden_state only), pool_stride to the family's
  (see the module docstring), chunk_length to the clip HF requires (max_source_positions / 50 s); a shorter clip
  keeps the stored position table and uses its first rows.
  """
  model_type, c = _audio_config(hf_config)
  family_pool, keys, _ = _FAMILIES[model_type]
  fields = {ours: int(c[theirs]) for ours, theirs in keys.items()}
  depth = fields['depth']
  if not -depth <= output_layer <= -1:
    raise ValueError(f'output_layer={output_layer} out of range [-{depth}, -1] for a {depth}-layer tower')
  if fields['width'] % fields['num_heads']:
    raise ValueError(f"audio config width {fields['width']} is not divisible by {fields['num_heads']} heads")
  positions = int(c['max_source_positions'])
  return dict(
      name='whisper', **fields, num_mel_bins=int(c['num_mel_bins']),
      chunk_length=float(chunk_length if chunk_length is not None else 2 * positions / _FRAMES_PER_SECOND),
      max_source_positions=positions, output_layer=int(output_layer),
      final_norm=bool(output_layer == -1 if final_norm is None else final_norm),
      pool_stride=int(family_pool if pool_stride is None else pool_stride), norm_eps=1e-5,
      act=activation(c['activation_function'], f'{model_type} config activation_function'))


def find_prefix(keys) -> str:
  """The key prefix of the audio tower among `keys` (one of KNOWN_PREFIXES); ValueError when there is none."""
  keys = set(keys)
  for prefix in KNOWN_PREFIXES:
    if prefix + _ANCHOR in keys:
      return prefix
  raise ValueError(f'no audio tower found (no key {_ANCHOR!r} under any of {list(KNOWN_PREFIXES)})')


def _num_blocks(cfg: dict) -> int:
  return cfg['depth'] + cfg['output_layer'] + 1


def skipped_prefixes(cfg_encoder: dict, prefix: str = '') -> tuple[str, ...]:
  """Key prefixes of the tower that `encoder_params_from_hf` deliberately leaves: the blocks above output_layer and
  layer_norm when final_norm is off."""
  cfg = encoder_fields(cfg_encoder)
  skipped = [f'{prefix}layers.{i}.' for i in range(_num_blocks(cfg), cfg['depth'])]
  if not cfg['final_norm']:
    skipped.append(f'{prefix}layer_norm.')
  return tuple(skipped)


def _conv(sd: StateDict, key: str, c_in: int, d: int) -> dict:
  w = sd.take(f'{key}.weight', (d, c_in, 3))                                  # [D, C_in, 3]
  return {'kernel': w.transpose(2, 1, 0).reshape(3 * c_in, d),                 # [3 C_in, D] (tap, channel)
          'bias': sd.take(f'{key}.bias', (d,))}


def _norm(sd: StateDict, key: str, d: int) -> dict:
  return {'scale': sd.take(f'{key}.weight', (d,)), 'bias': sd.take(f'{key}.bias', (d,))}


def encoder_params_from_hf(sd: StateDict, cfg_encoder: dict, prefix: str = '') -> dict:
  """Takes the audio tower under `prefix` from `sd` -> WhisperEncoder params. Does not call `sd.finish()`; callers
  finish with `ignore=skipped_prefixes(cfg_encoder, prefix)` (+ their own keys)."""
  cfg = encoder_fields(cfg_encoder)
  d, f, h, m = cfg['width'], cfg['mlp_dim'], cfg['num_heads'], cfg['num_mel_bins']
  dh = d // h
  positions = sd.take(f'{prefix}embed_positions.weight')                      # [P, D]
  if positions.ndim != 2 or positions.shape[1] != d or (
      cfg['max_source_positions'] is not None and positions.shape[0] != cfg['max_source_positions']):
    raise ValueError(f"{sd.where}: {prefix}embed_positions.weight has shape {positions.shape}, expected "
                     f"({cfg['max_source_positions']}, {d})")
  params: dict[str, Any] = {'conv1': _conv(sd, f'{prefix}conv1', m, d), 'conv2': _conv(sd, f'{prefix}conv2', d, d),
                            'embed_positions': positions}
  for i in range(_num_blocks(cfg)):
    b = f'{prefix}layers.{i}.'
    attn = {'q_proj': {'kernel': sd.kernel(f'{b}self_attn.q_proj', d, d).reshape(d, h, dh),      # [D, H, Dh]
                       'bias': sd.take(f'{b}self_attn.q_proj.bias', (d,)).reshape(h, dh)},        # [H, Dh]
            'k_proj': {'kernel': sd.kernel(f'{b}self_attn.k_proj', d, d).reshape(d, h, dh)},
            'v_proj': {'kernel': sd.kernel(f'{b}self_attn.v_proj', d, d).reshape(d, h, dh),
                       'bias': sd.take(f'{b}self_attn.v_proj.bias', (d,)).reshape(h, dh)},
            'o_proj': {'kernel': sd.kernel(f'{b}self_attn.out_proj', d, d).reshape(h, dh, d),    # [H, Dh, D]
                       'bias': sd.take(f'{b}self_attn.out_proj.bias', (d,))}}
    params[f'layers_{i}'] = {
        'self_attn_layer_norm': _norm(sd, f'{b}self_attn_layer_norm', d), 'self_attn': attn,
        'final_layer_norm': _norm(sd, f'{b}final_layer_norm', d),
        'mlp': {'fc1': {'kernel': sd.kernel(f'{b}fc1', d, f), 'bias': sd.take(f'{b}fc1.bias', (f,))},
                'fc2': {'kernel': sd.kernel(f'{b}fc2', f, d), 'bias': sd.take(f'{b}fc2.bias', (d,))}}}
  if cfg['final_norm']:
    params['layer_norm'] = _norm(sd, f'{prefix}layer_norm', d)
  return params


def _build(cfg_encoder: dict):
  from mmproj.encoders import build_encoder
  return build_encoder(cfg_encoder)


def audio_encoder_from_state_dict(sd: StateDict, hf_config: dict, output_layer: int = -1, prefix: str | None = None,
                                  final_norm: bool | None = None, pool_stride: int | None = None,
                                  chunk_length: float | None = None):
  """(WhisperEncoder, params) from a state dict holding the tower's keys under `prefix` (found when None) and
  nothing else: every key not taken must be in `skipped_prefixes`, else ValueError naming it."""
  cfg = encoder_config_from_hf(hf_config, output_layer, final_norm, pool_stride, chunk_length)
  encoder = _build(cfg)
  encoder.check()
  prefix = find_prefix(sd.keys()) if prefix is None else prefix
  params = encoder_params_from_hf(sd, cfg, prefix)
  sd.finish(ignore=skipped_prefixes(cfg, prefix))
  return encoder, params


def load_audio_encoder(path: str, output_layer: int = -1, final_norm: bool | None = None,
                       pool_stride: int | None = None, chunk_length: float | None = None):
  """An HF directory (config.json + safetensors) of a Whisper / Qwen2-Audio / Voxtral model, or of a bare
  encoder -> (WhisperEncoder, params). Only the tower's tensors are loaded (prefix from KNOWN_PREFIXES); safetensors
  only (a pickle-only directory fails naming the file); an unsupported model_type fails naming it."""
  from mmproj.convert import hf_dir
  config = hf_dir.read_config(path)
  _audio_config(config)                                   # an unsupported model_type fails before any tensor is read
  try:
    prefix = find_prefix(hf_dir.safetensors_keys(path))
  except ValueError as e:
    raise ValueError(f'{path}: {e}') from None
  tensors = hf_dir.read_safetensors(path, keep=lambda key: key.startswith(prefix))
  # The tower's keys without its prefix: the decoder / LM / projector keys that share none of it stay unread.
  sd = StateDict({k[len(prefix):]: v for k, v in tensors.items()}, where=f'{path} ({prefix or "no prefix"})')
  return audio_encoder_from_state_dict(sd, config, output_layer, '', final_norm, pool_stride, chunk_length)


@converter('WhisperEncoder', 'Qwen2AudioEncoder', 'VoxtralEncoder')
def audio_encoder(module: Any, output_layer: int = -1, final_norm: bool | None = None,
                  pool_stride: int | None = None, chunk_length: float | None = None):
  """A live transformers WhisperEncoder / Qwen2AudioEncoder / VoxtralEncoder -> (WhisperEncoder, params); see the
  module docstring for which HF output the encoder reproduces."""
  return audio_encoder_from_state_dict(StateDict.of(module), module.config.to_dict(), output_layer, '',
                                       final_norm, pool_stride, chunk_length)
