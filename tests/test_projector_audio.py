"""Audio connectors (qwen2_audio, voxtral, granite_speech, audio_flamingo3) and 1-D (audio) grids, grid=(T,), in
every projector family.

Generic checks for the connectors (output shape = num_output_tokens, exact param_count, logical axis names, which
frames each output token reads, bad configs), parity against the transformers modules through mmproj.convert at
odd widths and lengths, and one test over the whole registry: each projector either runs on a 1-D grid or refuses
it, before any compile, with a ValueError that names it and asks for a 2-D (h, w) grid.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parity_utils import assert_close, randomize_, seeded, to_torch

from mmproj import convert, projectors
from mmproj.convert import audio
from mmproj.layers import token_grid

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

DV, DT, B = 7, 11, 2
TEXT = dict(hidden_size=DT, num_attention_heads=1, num_key_value_heads=1)  # only the width reaches the projectors
QFORMER = dict(hidden_dim=18, num_layers=3, num_heads=2, mlp_dim=37, cross_attention_frequency=2)

# (cfg, grid): the connectors on audio grids (odd lengths) and on an image grid (tokens read row-major).
CASES = {
    'qwen2_audio': (dict(name='qwen2_audio'), (13,)),
    'qwen2_audio_s3_none': (dict(name='qwen2_audio', pool_stride=3, norm='none'), (3, 5)),
    'voxtral_k3': (dict(name='voxtral', stack_factor=3), (15,)),
    'voxtral_bias': (dict(name='voxtral', stack_factor=4, use_bias=True, act='silu'), (4, 6)),
    'granite_speech': (dict(name='granite_speech', window_size=6, downsample_rate=2, **QFORMER), (17,)),
    'granite_speech_image': (dict(name='granite_speech', window_size=5, downsample_rate=5, **QFORMER), (3, 4)),
    'audio_flamingo3': (dict(name='audio_flamingo3'), (13,)),
    'audio_flamingo3_s1': (dict(name='audio_flamingo3', pool_stride=1, norm='none', use_bias=False), (2, 3)),
}


def _init(cfg, grid, seed=0):
  """(module, params, boxed abstract params, x); params are N(0, 0.5) draws in init's shapes."""
  module = projectors.build(cfg, in_dim=DV, out_dim=DT)
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(B, int(np.prod(grid)), DV)).astype(np.float32))
  boxed = jax.eval_shape(lambda x: module.init(jax.random.key(0), x, grid=grid), x)['params']
  params = jax.tree.map(lambda s: jnp.asarray(0.5 * rng.normal(size=s.shape), s.dtype), nn.unbox(boxed))
  return module, params, boxed, x


@pytest.mark.parametrize('case', sorted(CASES))
def test_shape_params_axes(case):
  cfg, grid = CASES[case]
  module, params, boxed, x = _init(cfg, grid)
  y = jax.jit(lambda p, x: module.apply({'params': p}, x, grid=grid))(params, x)
  assert y.shape == (B, projectors.num_output_tokens(cfg, grid), DT)
  assert bool(jnp.all(jnp.isfinite(y)))
  assert sum(p.size for p in jax.tree.leaves(params)) == projectors.param_count(cfg, DV, DT)
  for leaf in jax.tree.leaves(boxed, is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned)):
    assert isinstance(leaf, nn.LogicallyPartitioned), 'every param carries logical axis names'
    assert len(leaf.names) == leaf.value.ndim and len(set(leaf.names)) == len(leaf.names), leaf.names


def _expected_frames(cfg, n):
  """The input tokens each output token may read, from the module docstrings."""
  if cfg['name'] in ('qwen2_audio', 'audio_flamingo3'):
    s = cfg.get('pool_stride', 2)
    return [range(i * s, i * s + s) for i in range(n // s)]
  if cfg['name'] == 'voxtral':
    k = cfg['stack_factor']
    return [range(i * k, i * k + k) for i in range(n // k)]
  w, q = cfg['window_size'], cfg['window_size'] // cfg['downsample_rate']
  return [range(j * w, min(j * w + w, n)) for j in range(-(-n // w)) for _ in range(q)]


@pytest.mark.parametrize('case', sorted(CASES))
def test_receptive_field(case):
  """d y[0, k] / d x is non-zero exactly on output token k's frames (pool run, stacked frames or window), and zero
  for the other example."""
  cfg, grid = CASES[case]
  module, params, _, x = _init(cfg, grid)
  jac = jax.jit(jax.jacrev(lambda x: module.apply({'params': params}, x, grid=grid)[0]))(x)  # [M, Dt, B, N, Dv]
  touched = np.asarray(jnp.any(jac != 0, axis=(1, 4)))                                      # [M, B, N]
  expected = _expected_frames(cfg, x.shape[1])
  assert len(expected) == touched.shape[0] and not touched[:, 1].any()
  for k, frames in enumerate(expected):
    np.testing.assert_array_equal(np.nonzero(touched[k, 0])[0], np.asarray(frames), err_msg=f'output token {k}')


# ------------------------------------------------------------------------------------------------------ parity

def _hidden(rng, t, d=DV):
  return rng.normal(size=(B, t, d)).astype(np.float32)


def _apply(module, params, x):
  return module.apply({'params': params}, jnp.asarray(x), grid=(x.shape[1],))


def _hf_projector(family):
  """A random Qwen2AudioMultiModalProjector / AudioFlamingo3MultiModalProjector from DV to DT."""
  if family == 'qwen2_audio':
    from transformers import Qwen2AudioConfig
    from transformers.models.qwen2_audio import modeling_qwen2_audio as hf_module
    config = Qwen2AudioConfig(audio_config=dict(d_model=DV), text_config=dict(hidden_size=DT))
    return randomize_(hf_module.Qwen2AudioMultiModalProjector(config))
  from transformers import AudioFlamingo3Config
  from transformers.models.audioflamingo3 import modeling_audioflamingo3 as hf_module
  config = AudioFlamingo3Config(audio_config=dict(hidden_size=DV), text_config=dict(hidden_size=DT))
  return randomize_(hf_module.AudioFlamingo3MultiModalProjector(config))


@pytest.mark.parametrize('family', ['qwen2_audio', 'audio_flamingo3'])
def test_parity_projector_alone(family):
  rng = seeded(0)
  hf = _hf_projector(family)
  module, params = convert.from_transformers(hf)
  assert (module.pool_stride, module.norm) == (1, 'none')
  x = _hidden(rng, 13)
  with torch.no_grad():
    ref = hf(to_torch(x))
  assert_close(_apply(module, params, x), ref)


def _tiny_encoder(family):
  """A random one-layer Qwen2AudioEncoder / AudioFlamingo3Encoder of width DV (only its tail is converted)."""
  if family == 'qwen2_audio':
    from transformers import Qwen2AudioEncoderConfig
    from transformers.models.qwen2_audio.modeling_qwen2_audio import Qwen2AudioEncoder as Encoder
    config = Qwen2AudioEncoderConfig(d_model=DV, encoder_layers=1, encoder_attention_heads=1, encoder_ffn_dim=9,
                                     num_mel_bins=5, max_source_positions=16)
  else:
    from transformers import AudioFlamingo3EncoderConfig
    from transformers.models.audioflamingo3.modeling_audioflamingo3 import AudioFlamingo3Encoder as Encoder
    config = AudioFlamingo3EncoderConfig(hidden_size=DV, num_hidden_layers=1, num_attention_heads=1,
                                         intermediate_size=9, num_mel_bins=5, max_source_positions=16)
  return randomize_(Encoder(config), seed=1)


@pytest.mark.parametrize('family', ['qwen2_audio', 'audio_flamingo3'])
@pytest.mark.parametrize('t', [13, 10])
def test_parity_with_encoder_tail(family, t):
  """HF avg_pooler -> layer_norm -> multi_modal_projector on random hidden states == the converted connector (odd
  lengths drop the last frame, as AvgPool1d does)."""
  rng = seeded(0)
  encoder, hf = _tiny_encoder(family), _hf_projector(family)
  connector = audio.qwen2_audio_connector if family == 'qwen2_audio' else audio.audio_flamingo3_connector
  module, params = connector(encoder, hf)
  assert (module.pool_stride, module.norm, module.norm_eps) == (2, 'layernorm', encoder.layer_norm.eps)
  h = _hidden(rng, t)
  with torch.no_grad():
    pooled = encoder.avg_pooler(to_torch(h).transpose(1, 2)).transpose(1, 2)
    ref = hf(encoder.layer_norm(pooled))
  assert_close(_apply(module, params, h), ref)


def _voxtral(stack, bias_act='gelu'):
  from transformers import VoxtralConfig
  from transformers.models.voxtral.modeling_voxtral import VoxtralMultiModalProjector
  config = VoxtralConfig(audio_config=dict(hidden_size=DV, intermediate_size=stack * DV),
                         text_config=TEXT, projector_hidden_act=bias_act)
  return randomize_(VoxtralMultiModalProjector(config))


@pytest.mark.parametrize('stack,t', [(3, 15), (4, 20)])
def test_parity_voxtral(stack, t):
  """HF get_audio_features: encoder output reshaped to intermediate_size (k frames stacked), then the projector."""
  rng = seeded(0)
  hf = _voxtral(stack)
  module, params = convert.from_transformers(hf) if stack == 4 else audio.voxtral_projector(hf, stack_factor=stack)
  assert module.stack_factor == stack and not module.use_bias
  x = _hidden(rng, t)
  with torch.no_grad():
    ref = hf(to_torch(x).reshape(-1, stack * DV)).reshape(B, t // stack, DT)
  assert_close(_apply(module, params, x), ref)


def test_voxtral_indivisible_tokens_and_widths():
  module = projectors.build(dict(name='voxtral', stack_factor=4), in_dim=DV, out_dim=DT)
  with pytest.raises(ValueError, match=r'14 encoder tokens .* model\.projector\.stack_factor=4'):
    module.init(jax.random.key(0), jnp.zeros((1, 14, DV)), grid=(14,))
  with pytest.raises(ValueError, match=r'model\.projector\.stack_factor=4'):
    module.num_output_tokens((14,))
  with pytest.raises(ValueError, match=r'not a multiple of stack_factor=2'):
    audio.voxtral_projector(_voxtral(3), stack_factor=2)


@pytest.mark.parametrize('window,rate,t', [(6, 2, 17), (5, 5, 10), (4, 1, 3)])
def test_parity_granite_speech(window, rate, t):
  """GraniteSpeechEncoderProjector: windows (the last zero-padded), shared queries, the BLIP-2 Q-Former, linear."""
  from transformers import GraniteSpeechConfig
  from transformers.models.granite_speech.modeling_granite_speech import GraniteSpeechEncoderProjector
  rng = seeded(0)
  qformer = dict(hidden_size=18, num_hidden_layers=3, num_attention_heads=2, intermediate_size=37,
                 encoder_hidden_size=DV, cross_attention_frequency=2)
  config = GraniteSpeechConfig(projector_config=qformer, text_config=TEXT, window_size=window,
                               downsample_rate=rate)
  hf = randomize_(GraniteSpeechEncoderProjector(config))
  module, params = convert.from_transformers(hf)
  assert (module.window_size, module.downsample_rate, module.cross_attention_frequency) == (window, rate, 2)
  x = _hidden(rng, t)
  with torch.no_grad():
    ref = hf(to_torch(x))
  assert_close(_apply(module, params, x), ref)


def test_encoder_tail_must_be_a_plain_pool_and_layernorm():
  encoder, hf = _tiny_encoder('qwen2_audio'), _hf_projector('qwen2_audio')
  encoder.avg_pooler = torch.nn.AvgPool1d(3, stride=2)
  with pytest.raises(ValueError, match=r'Qwen2AudioEncoder\.avg_pooler'):
    audio.qwen2_audio_connector(encoder, hf)
  encoder.avg_pooler, encoder.layer_norm = torch.nn.AvgPool1d(2), torch.nn.LayerNorm(DV, bias=False)
  with pytest.raises(ValueError, match=r'Qwen2AudioEncoder\.layer_norm'):
    audio.qwen2_audio_connector(encoder, hf)


# ------------------------------------------------------------------------------------------------------ configs

@pytest.mark.parametrize('cfg,field', [
    (dict(name='qwen2_audio', pool_stride=0), 'pool_stride'),
    (dict(name='qwen2_audio', norm='rmsnorm'), 'norm'),
    (dict(name='qwen2_audio', norm_eps=0.0), 'norm_eps'),
    (dict(name='audio_flamingo3', act='tanh'), 'act'),
    (dict(name='audio_flamingo3', pool_stride=1.5), 'pool_stride'),
    (dict(name='voxtral', stack_factor=0), 'stack_factor'),
    (dict(name='voxtral', act='nope'), 'act'),
    (dict(name='granite_speech', window_size=15, downsample_rate=4), 'downsample_rate'),
    (dict(name='granite_speech', hidden_dim=10, num_heads=4), 'num_heads'),
    (dict(name='granite_speech', dropout=1.0), 'dropout'),
    (dict(name='avg_pool', output_grid=(2,), depth=0), 'depth'),
    (dict(name='avg_pool', output_grid=()), 'output_grid'),
])
def test_bad_config_names_field(cfg, field):
  with pytest.raises(ValueError, match=rf'model\.projector\.{field}'):
    projectors.build(cfg, in_dim=DV, out_dim=DT)


def test_pool_needs_enough_tokens():
  with pytest.raises(ValueError, match=r'3 encoder tokens are fewer than model\.projector\.pool_stride=4'):
    projectors.num_output_tokens(dict(name='qwen2_audio', pool_stride=4), (3,))


def test_param_count_formulas():
  """The docstring formulas written out (Dv=96, Dt=128)."""
  assert projectors.param_count(dict(name='qwen2_audio'), 96, 128) == 2 * 96 + 96 * 128 + 128
  assert projectors.param_count(dict(name='audio_flamingo3', norm='none'), 96, 128) \
      == (96 * 128 + 128) + (128 * 128 + 128)
  assert projectors.param_count(dict(name='voxtral'), 96, 128) == 4 * 96 * 128 + 128 * 128
  d, f, q = 32, 64, 3
  qf = 2 * d + 3 * (4 * d * d + 6 * d) + 2 * (2 * d * d + 2 * 96 * d + 6 * d) + 3 * (2 * d * f + f + 3 * d)
  assert projectors.param_count(dict(name='granite_speech', hidden_dim=d, num_layers=3, num_heads=4, mlp_dim=f,
                                     cross_attention_frequency=2), 96, 128) == q * d + qf + d * 128 + 128


# -------------------------------------------------------------------------------------------- 1-D grids, registry

# A small config for every registered projector; a new projector must be added here (the first test checks).
REGISTRY_CFGS = {
    'linear': dict(name='linear'),
    'mlp': dict(name='mlp'),
    'gated_xattn': dict(name='gated_xattn'),
    'qformer': dict(name='qformer', num_query_tokens=3, **QFORMER),
    'pixel_shuffle': dict(name='pixel_shuffle'),
    'patch_merger': dict(name='patch_merger'),
    'avg_pool': dict(name='avg_pool', output_grid=4, adaptive=True),
    'perceiver': dict(name='perceiver', num_latents=3, depth=1, num_heads=2, head_dim=5),
    'qwen_vl_resampler': dict(name='qwen_vl_resampler', num_queries=4, num_heads=2, width=12),
    'cross_attention': dict(name='cross_attention', num_queries=3, num_heads=1),
    'tokenpacker': dict(name='tokenpacker', num_heads=1),
    'c_abstractor': dict(name='c_abstractor', num_queries=4, depth=1),
    'd_abstractor': dict(name='d_abstractor', num_queries=4, depth=1, num_heads=1),
    'ldp': dict(name='ldp'),
    'ldpv2': dict(name='ldpv2'),
    'qwen2_audio': dict(name='qwen2_audio'),
    'voxtral': dict(name='voxtral', stack_factor=3),
    'granite_speech': dict(name='granite_speech', window_size=6, downsample_rate=2, **QFORMER),
    'audio_flamingo3': dict(name='audio_flamingo3'),
    'llava_next_video': dict(name='llava_next_video', num_frames=3),
    'llava_onevision_video': dict(name='llava_onevision_video', num_frames=3),
    'frame_concat': dict(name='frame_concat', num_frames=3),
}
ACCEPTS_1D = {'linear', 'mlp', 'gated_xattn', 'qformer', 'avg_pool', 'perceiver', 'cross_attention', 'qwen2_audio',
              'voxtral', 'granite_speech', 'audio_flamingo3'}
T = 15


def test_every_registered_projector_is_covered():
  assert set(REGISTRY_CFGS) == set(projectors.REGISTRY), 'add new projectors to REGISTRY_CFGS (and ACCEPTS_1D)'
  assert ACCEPTS_1D <= set(REGISTRY_CFGS)
  doc = ' '.join(projectors.__doc__.split())
  accepts = doc.split('accepts 1-D (audio) grids:')[1].split('needs a 2-D (h, w) grid:')[0]
  needs = doc.split('needs a 2-D (h, w) grid:')[1]
  for name in REGISTRY_CFGS:  # the package docstring's lists are the truth this test checks
    assert (name in accepts.replace(',', ' ').split()) == (name in ACCEPTS_1D), name
    assert (name in needs.replace(',', ' ').split()) == (name not in ACCEPTS_1D), name


@pytest.mark.parametrize('name', sorted(projectors.REGISTRY))
def test_one_d_grid(name):
  """A projector either maps x [B, T, Dv] with grid=(T,) to num_output_tokens((T,)) tokens, or refuses the grid from
  num_output_tokens and from tracing (no compile) with a ValueError naming itself and asking for a 2-D grid."""
  cfg = REGISTRY_CFGS[name]
  module = projectors.build(cfg, in_dim=DV, out_dim=12)
  x = jnp.zeros((B, T, DV))
  run = lambda: jax.eval_shape(lambda x: module.init_with_output(jax.random.key(0), x, grid=(T,)), x)
  if name in ACCEPTS_1D:
    y, _ = run()
    assert y.shape == (B, projectors.num_output_tokens(cfg, (T,)), 12)
  else:
    message = rf'{name} projector( \([^)]*\))? needs a 2-D \(h, w\) grid'
    with pytest.raises(ValueError, match=message):
      projectors.num_output_tokens(cfg, (T,))
    with pytest.raises(ValueError, match=message):
      run()


@pytest.mark.parametrize('t,m', [(15, 5), (13, 5), (7, 7), (9, 1)])
def test_avg_pool_one_d_matches_torch(t, m):
  """avg_pool on an audio grid: AvgPool1d(t/m) when m divides t, AdaptiveAvgPool1d bins otherwise."""
  rng = seeded(0)
  x = _hidden(rng, t)
  ref = torch.nn.functional.adaptive_avg_pool1d(to_torch(x).transpose(1, 2), m).transpose(1, 2)
  assert_close(token_grid.avg_pool_1d(jnp.asarray(x), m), ref)
  module, params, _, _ = _init(dict(name='avg_pool', output_grid=(m,), adaptive=True, depth=1), (t,))
  y = module.apply({'params': params}, jnp.asarray(x), grid=(t,))
  ref_y = ref.numpy() @ np.asarray(params['mlp']['linear_1']['kernel']) + np.asarray(params['mlp']['linear_1']['bias'])
  assert_close(y, ref_y)


@pytest.mark.parametrize('output_grid,grid,match', [
    ((2, 2), (12,), r'output_grid=\(2, 2\) is for an image grid'),
    ((2,), (3, 4), r'output_grid=\(2,\) is for an audio grid'),
    (5, (12,), r'encoder grid 12 is not divisible by model\.projector\.output_grid.*AdaptiveAvgPool1d'),
    (13, (12,), r'output_grid is larger than the encoder grid 12'),
])
def test_avg_pool_grid_rank_and_divisibility(output_grid, grid, match):
  with pytest.raises(ValueError, match=match):
    projectors.num_output_tokens(dict(name='avg_pool', output_grid=output_grid), grid)


def test_check_grid_keeps_its_two_d_contract():
  x = jnp.zeros((1, 12, 3))
  assert token_grid.check_grid(x, (3, 4), 'p') == (3, 4)
  with pytest.raises(ValueError, match=r'p needs a 2-D \(h, w\) grid .*a 1-D audio grid'):
    token_grid.check_grid(x, (12,), 'p')
  with pytest.raises(ValueError, match=r'do not hold the grid 2x4'):
    token_grid.check_grid(x, (2, 4), 'p')
  assert token_grid.check_tokens(x, (12,), 'p') == token_grid.check_tokens(x, (3, 4), 'p') == 12
  with pytest.raises(ValueError, match=r'grid \(11,\) has 11 cells but x has 12 tokens'):
    token_grid.check_tokens(x, (11,), 'p')
