"""Audio connectors: transformers -> mmproj 'qwen2_audio', 'voxtral', 'granite_speech', 'audio_flamingo3'.

Registered converters (`mmproj.convert.from_transformers(module)`), same input and output as the module; x is the
audio encoder's output [B, T, Dv], called with grid=(T,):
  Qwen2AudioMultiModalProjector      -> qwen2_audio(pool_stride=1, norm='none')            module(x)
  AudioFlamingo3MultiModalProjector  -> audio_flamingo3(pool_stride=1, norm='none')        module(x)
  VoxtralMultiModalProjector         -> voxtral(stack_factor=k)   module(x.reshape(-1, k*Dv)) as [B, T/k, Dt]
      the module does not know k (its linear_1 takes k*Dv): pass stack_factor, which is Voxtral's
      config.audio_config.intermediate_size // config.audio_config.hidden_size (4; the default here)
  GraniteSpeechEncoderProjector      -> granite_speech                                     module(x)
      window_size / downsample_rate from the module, the Q-Former through mmproj/convert/blip2.py's readers

Encoder tail + projector (not registered: two modules in, one connector out). Qwen2-Audio's and Audio Flamingo
3's encoders end with avg_pooler (AvgPool1d(2, 2) over time) and layer_norm; the mmproj connectors own those two
steps, so an mmproj encoder for these towers stops before them:
  qwen2_audio_connector(encoder, projector)      Qwen2AudioEncoder, Qwen2AudioMultiModalProjector
  audio_flamingo3_connector(encoder, projector)  AudioFlamingo3Encoder, AudioFlamingo3MultiModalProjector
      -> the connector with pool_stride = the avg_pooler's stride, norm='layernorm' (the encoder's layer_norm)
      torch:  projector(encoder.layer_norm(encoder.avg_pooler(h.transpose(1, 2)).transpose(1, 2)))
      mmproj: flax.apply({'params': p}, h, grid=(T,))     h [B, T, Dv], the encoder's last layer output
  Only avg_pooler and layer_norm are read from the encoder (its other weights belong to the tower).
"""

from __future__ import annotations

from typing import Any

from mmproj import projectors
from mmproj.convert.base import StateDict, activation, converter
from mmproj.convert.blip2 import qformer_config, qformer_in_dim, qformer_params


def _encoder_tail(encoder: Any) -> tuple[dict, dict]:
  """(connector fields, norm params) from an encoder's avg_pooler (an AvgPool1d with kernel = stride, no padding,
  floor mode) and layer_norm (affine, with bias); ValueError naming the attribute for anything else."""
  name, pool, ln = type(encoder).__name__, encoder.avg_pooler, encoder.layer_norm
  if type(pool).__name__ != 'AvgPool1d' or pool.kernel_size != pool.stride or pool.padding[0] or pool.ceil_mode:
    raise ValueError(f'{name}.avg_pooler: {pool} is not an AvgPool1d with kernel = stride, no padding, floor mode')
  if type(ln).__name__ != 'LayerNorm' or not ln.elementwise_affine or ln.bias is None:
    raise ValueError(f'{name}.layer_norm: {ln} is not a LayerNorm with weight and bias')
  sd = StateDict.of(ln)
  scale = sd.take('weight')
  norm = {'scale': scale, 'bias': sd.take('bias', scale.shape)}
  sd.finish()
  return dict(pool_stride=int(pool.stride[0]), norm='layernorm', norm_eps=float(ln.eps)), norm


def _with_tail(converted: tuple[Any, dict], encoder: Any) -> tuple[Any, dict]:
  """A projector-only conversion (pool_stride=1, norm='none') -> the same connector with the encoder's pool and norm."""
  module, params = converted
  fields, norm = _encoder_tail(encoder)
  width = norm['scale'].shape[0]
  if width != module.in_dim:
    raise ValueError(f'{type(encoder).__name__}.layer_norm has width {width} but the projector takes {module.in_dim}')
  module = module.clone(parent=None, **fields)
  module.check()
  return module, {'norm': norm, **params}


@converter('Qwen2AudioMultiModalProjector')
def qwen2_audio_projector(module: Any):
  """HF Qwen2AudioMultiModalProjector (one Linear) -> (qwen2_audio projector with pool_stride=1, norm='none',
  params)."""
  sd = StateDict.of(module)
  params = {'linear': sd.dense('linear')}
  sd.finish()
  in_dim, out_dim = params['linear']['kernel'].shape
  cfg = dict(name='qwen2_audio', pool_stride=1, norm='none')
  return projectors.build(cfg, in_dim=in_dim, out_dim=out_dim), params


def qwen2_audio_connector(encoder: Any, projector: Any):
  """Qwen2AudioEncoder's avg_pooler + layer_norm, then Qwen2AudioMultiModalProjector -> (qwen2_audio projector with
  pool_stride=2, norm='layernorm', params); its input is the encoder's last layer output (module docstring)."""
  return _with_tail(qwen2_audio_projector(projector), encoder)


@converter('AudioFlamingo3MultiModalProjector')
def audio_flamingo3_projector(module: Any):
  """HF AudioFlamingo3MultiModalProjector (Linear-act-Linear) -> (audio_flamingo3 projector with pool_stride=1,
  norm='none', params)."""
  bias = module.linear_1.bias is not None
  sd = StateDict.of(module)
  params = {'linear_1': sd.dense('linear_1', bias), 'linear_2': sd.dense('linear_2', bias)}
  sd.finish()
  in_dim, out_dim = params['linear_1']['kernel'].shape
  cfg = dict(name='audio_flamingo3', pool_stride=1, norm='none', use_bias=bias,
             act=activation(module.act, 'AudioFlamingo3MultiModalProjector.act (projector_hidden_act)'))
  return projectors.build(cfg, in_dim=in_dim, out_dim=out_dim), params


def audio_flamingo3_connector(encoder: Any, projector: Any):
  """AudioFlamingo3Encoder's avg_pooler + layer_norm, then AudioFlamingo3MultiModalProjector -> (audio_flamingo3
  projector with pool_stride=2, norm='layernorm', params); its input is the encoder's last layer output."""
  return _with_tail(audio_flamingo3_projector(projector), encoder)


@converter('VoxtralMultiModalProjector')
def voxtral_projector(module: Any, stack_factor: int = 4):
  """HF VoxtralMultiModalProjector -> (voxtral projector, params). linear_1 takes stack_factor * Dv stacked frames;
  ValueError when stack_factor does not divide its input width."""
  bias = module.linear_1.bias is not None
  sd = StateDict.of(module)
  params = {'linear_1': sd.dense('linear_1', bias), 'linear_2': sd.dense('linear_2', bias)}
  sd.finish()
  stacked, out_dim = params['linear_1']['kernel'].shape
  if stacked % stack_factor:
    raise ValueError(f'VoxtralMultiModalProjector.linear_1 takes {stacked} features, not a multiple of '
                     f'stack_factor={stack_factor}')
  cfg = dict(name='voxtral', stack_factor=stack_factor, use_bias=bias,
             act=activation(module.act, 'VoxtralMultiModalProjector.act (projector_hidden_act)'))
  return projectors.build(cfg, in_dim=stacked // stack_factor, out_dim=out_dim), params


@converter('GraniteSpeechEncoderProjector')
def granite_speech_projector(module: Any):
  """HF GraniteSpeechEncoderProjector (query, Blip2QFormerModel, linear) -> (granite_speech projector, params)."""
  qformer = module.qformer
  if type(qformer).__name__ != 'Blip2QFormerModel':
    raise ValueError(f'GraniteSpeechEncoderProjector.qformer is a {type(qformer).__name__}; only Blip2QFormerModel '
                     '(the default projector_config) has an mmproj equivalent')
  qcfg = qformer_config(qformer)
  q, d = int(module.num_queries), qcfg['hidden_dim']
  sd = StateDict.of(module)
  params = {'query': sd.take('query', (1, q, d))[0],
            'qformer': qformer_params(sd, 'qformer.', qcfg['num_layers'], qcfg['num_heads'], 'qformer.layernorm',
                                      text=False),
            'linear': sd.dense('linear')}
  # A Blip2QFormerModel built with use_qformer_text_input=True also holds text feed-forwards that only text
  # tokens run through; the projector passes none (as in mmproj/convert/blip2.py's blip2_qformer).
  sd.finish(ignore=tuple(f'qformer.encoder.layer.{i}.{n}.' for i in range(qcfg['num_layers'])
                         for n in ('intermediate', 'output')))
  cfg = dict(name='granite_speech', window_size=int(module.window_size), downsample_rate=int(module.downsample_rate),
             **qcfg)
  return projectors.build(cfg, in_dim=qformer_in_dim(qformer), out_dim=params['linear']['kernel'].shape[1]), params

