"""Whisper's log-mel front end (== transformers' WhisperFeatureExtractor) and the Whisper-shaped audio encoder."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from parity_utils import assert_close, to_torch

from mmproj.convert import stack_layers
from mmproj.encoders import ENCODERS, WhisperEncoder, build_encoder, encoder_fields
from mmproj.encoders import log_mel
from mmproj.train import flops

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

# Normalised features: transformers computes the STFT with torch.stft in float32, we with jnp.fft.rfft in float32.
# Each is within FLOAT64_ATOL of transformers' own algorithm run in float64 (its numpy spectrogram), and ours is
# checked against that too. The hardest signal is the chirp: its quietest frames, near the end of the audio, keep
# powers 1e-8 of the peak after the dynamic-range clamp, where a float32 FFT's absolute error is largest relative to
# the power; elsewhere everything agrees to ~1e-5 or better. The two float32 errors may point opposite ways (FFT
# libraries round differently from release to release), so the two float32 results are compared at twice that.
FLOAT64_ATOL = 1e-4
FEATURE_ATOL = 2 * FLOAT64_ATOL
T = np.arange(24000) / 16000                                         # 1.5 s at 16 kHz


def _signals() -> dict[str, list[np.ndarray]]:
  """name -> two waveforms (float32, lengths may differ)."""
  rng = np.random.default_rng(0)
  sine = np.sin(2 * np.pi * 440 * T)
  return {
      'noise': [0.3 * rng.normal(size=24000), rng.normal(size=24000)],
      'sines': [sine, 0.01 * np.sin(2 * np.pi * 3000 * T) + 0.5 * sine],
      'chirp': [np.sin(2 * np.pi * (100 + 3000 * T) * T), np.sin(2 * np.pi * (6000 - 2000 * T) * T)],
      'silence': [np.zeros(24000), np.zeros(5000)],
      'clipped': [np.clip(3 * sine, -1, 1), np.clip(20 * rng.normal(size=24000), -1, 1)],
      'odd_short': [rng.normal(size=7777), rng.normal(size=1)],        # shorter than the clip
      'odd_long': [rng.normal(size=40001), rng.normal(size=32001)],    # longer than the clip (truncated)
  }


def _batch(waves: list[np.ndarray]) -> np.ndarray:
  """Waveforms of any lengths -> [B, S] zero-padded at the end (the front end pads with zeros anyway)."""
  out = np.zeros((len(waves), max(len(w) for w in waves)), np.float32)
  for i, w in enumerate(waves):
    out[i, :len(w)] = w
  return out


def _hf_features(waves, num_mel_bins: int, chunk_length: float) -> np.ndarray:
  extractor = transformers.WhisperFeatureExtractor(feature_size=num_mel_bins)
  return extractor([np.asarray(w, np.float32) for w in waves], sampling_rate=16000, return_tensors='np',
                   max_length=int(chunk_length * 16000))['input_features']


def _hf_features_float64(waves, num_mel_bins: int, chunk_length: float) -> np.ndarray:
  """WhisperFeatureExtractor's numpy path (_np_extract_fbank_features) with its spectrogram in float64."""
  from transformers.audio_utils import spectrogram, window_function
  extractor = transformers.WhisperFeatureExtractor(feature_size=num_mel_bins)
  n = int(chunk_length * 16000)
  out = []
  for wave in waves:
    wave = np.pad(np.asarray(wave, np.float64)[:n], (0, max(0, n - len(wave))))
    log_spec = spectrogram(wave, window_function(extractor.n_fft, 'hann'), frame_length=extractor.n_fft,
                           hop_length=extractor.hop_length, power=2.0, mel_filters=extractor.mel_filters,
                           log_mel='log10', dtype=np.float64)[:, :-1]
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
    out.append((log_spec + 4.0) / 4.0)
  return np.stack(out)


@pytest.mark.parametrize('num_mel_bins', [80, 128])
@pytest.mark.parametrize('chunk_length', [1.5, 2.0])
def test_log_mel_equals_whisper_feature_extractor(num_mel_bins, chunk_length):
  for name, waves in _signals().items():
    ref = _hf_features(waves, num_mel_bins, chunk_length)                     # [B, M, F]
    ours = log_mel.log_mel_spectrogram(jnp.asarray(_batch(waves)), num_mel_bins=num_mel_bins,
                                       chunk_length=chunk_length)
    assert ours.shape == (2, num_mel_bins, int(chunk_length * 100))
    what = f'{name} ({num_mel_bins} bins, {chunk_length} s)'
    assert_close(ours, ref, FEATURE_ATOL, what)
    assert_close(ours, _hf_features_float64(waves, num_mel_bins, chunk_length), FLOAT64_ATOL, what + ', float64')


def test_silence_is_the_floor():
  ours = log_mel.log_mel_spectrogram(jnp.zeros((1, 100)), num_mel_bins=80, chunk_length=1.0)
  np.testing.assert_array_equal(np.asarray(ours), np.full((1, 80, 100), -1.5, np.float32))   # (log10(1e-10) + 4) / 4


def test_filters_and_window_match_transformers():
  from transformers.audio_utils import mel_filter_bank
  for bins in (80, 128):
    ref = mel_filter_bank(num_frequency_bins=201, num_mel_filters=bins, min_frequency=0.0, max_frequency=8000.0,
                          sampling_rate=16000, norm='slaney', mel_scale='slaney')
    np.testing.assert_allclose(log_mel.mel_filters(bins), ref, rtol=1e-6, atol=1e-9)
  # torch evaluates the cosine in float32, we in float64 (then round): a few ulps apart.
  np.testing.assert_allclose(log_mel.hann_window(400), torch.hann_window(400).numpy(), atol=5e-7)


def test_short_clip_features_do_not_depend_on_the_chunk():
  """HF pads to 30 s and takes the maximum over the padded array; padding adds only the floor value, so a 1.3 s
  clip at chunk 2 s has the same 200 frames as the first 200 of HF's 3000 (see mmproj/encoders/log_mel.py)."""
  waves = [np.sin(2 * np.pi * 440 * T[:20800]), np.random.default_rng(1).normal(size=20800)]
  ref = _hf_features(waves, 80, 30)                                           # [B, 80, 3000]
  ours = log_mel.log_mel_spectrogram(jnp.asarray(_batch(waves)), num_mel_bins=80, chunk_length=2.0)
  assert_close(ours, ref[:, :, :200], FEATURE_ATOL, 'chunk 2 s vs HF 30 s')


@pytest.mark.parametrize('chunk', [0.0, -1.0, 0.01, 1.01, 0.03])
def test_bad_chunk_length_names_the_field(chunk):
  with pytest.raises(ValueError, match='model.encoder.chunk_length'):
    log_mel.log_mel_spectrogram(jnp.zeros((1, 100)), chunk_length=chunk)


# ------------------------------------------------------------------------------------------------- the encoder

# Odd sizes: width 36, 3 heads (Dh 12), mlp 44, 16 mel bins, 0.5 s clips (50 frames, 25 tokens).
TINY = dict(name='whisper', width=36, depth=3, num_heads=3, mlp_dim=44, num_mel_bins=16, chunk_length=0.5)


def _waves(batch: int = 2, samples: int = 7000, seed: int = 0) -> jnp.ndarray:
  return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, samples)).astype(np.float32))


def _init(encoder, x):
  return jax.jit(lambda x: nn.meta.unbox(encoder.init(jax.random.key(0), x)['params']))(x)


def _apply(encoder, params, x):
  """encoder.apply under jit -> (tokens, grid); the grid (Python ints) is read while tracing."""
  grids = []

  def tokens(params, x):
    out, grid = encoder.apply({'params': params}, x)
    grids.append(grid)
    return out

  return jax.jit(tokens)(params, x), grids[0]


def test_build_encoder_and_grid():
  assert ENCODERS['whisper'] is WhisperEncoder
  encoder = build_encoder(dict(TINY, pool_stride=2, remat=None))
  assert isinstance(encoder, WhisperEncoder) and encoder.remat == 'none'
  assert encoder_fields(dict(TINY))['name'] == 'whisper'
  x = _waves()
  params = _init(encoder, x)
  tokens, grid = _apply(encoder, params, x)
  assert grid == encoder.output_grid() == (12,) and tokens.shape == (2, 12, 36)   # 50 frames -> 25 -> 12 (floor)
  assert build_encoder(dict(TINY, chunk_length=30.0)).output_grid() == (1500,)   # Whisper's
  assert params['embed_positions'].shape == (25, 36)
  assert params['conv1']['kernel'].shape == (3 * 16, 36) and 'bias' not in params['layers_0']['self_attn']['k_proj']
  d, m, f, blocks, positions = 36, 16, 44, 3, 25                  # the docstring's parameter count
  block = 4 * d * d + 3 * d + 2 * d * f + f + d + 4 * d
  expected = 3 * m * d + d + 3 * d * d + d + positions * d + blocks * block + 2 * d
  assert sum(np.size(leaf) for leaf in jax.tree.leaves(params)) == expected


def test_position_table_starts_as_whispers_sinusoids():
  from transformers.models.whisper.modeling_whisper import sinusoids
  params = _init(build_encoder(TINY), _waves())
  np.testing.assert_allclose(params['embed_positions'], sinusoids(25, 36).numpy(), atol=1e-6)


def test_waveform_and_features_inputs_agree():
  encoder = build_encoder(TINY)
  x = _waves(samples=9001)
  params = _init(encoder, x)
  from_wave, _ = _apply(encoder, params, x)
  features = log_mel.log_mel_spectrogram(x, num_mel_bins=16, chunk_length=0.5)     # [B, 16, 50]
  from_features, _ = _apply(encoder, params, features)
  np.testing.assert_array_equal(np.asarray(from_wave), np.asarray(from_features))


def test_truncated_position_table_and_output_layer():
  """A 1 s position table on 0.5 s clips uses its first rows; output_layer=-2 builds two blocks."""
  x = _waves()
  long = build_encoder(dict(TINY, max_source_positions=50, output_layer=-2, final_norm=False))
  params = _init(long, x)
  assert params['embed_positions'].shape == (50, 36) and sorted(k for k in params if k.startswith('layers')) == [
      'layers_0', 'layers_1']
  short = build_encoder(dict(TINY, output_layer=-2, final_norm=False))
  cut = dict(params, embed_positions=params['embed_positions'][:25])
  np.testing.assert_array_equal(np.asarray(_apply(long, params, x)[0]),
                                np.asarray(_apply(short, cut, x)[0]))


@pytest.mark.parametrize('field, value, match', [
    ('num_heads', 5, 'model.encoder.width=36 is not divisible'),
    ('output_layer', -4, 'model.encoder.output_layer'),
    ('chunk_length', 0.25, 'model.encoder.chunk_length'),
    ('max_source_positions', 24, 'model.encoder.max_source_positions'),
    ('pool_stride', 0, 'model.encoder.pool_stride'),
    ('remat', 'most', 'model.encoder.remat'),
    ('scan_layers', 'yes', 'model.encoder.scan_layers'),
])
def test_bad_fields_name_the_field(field, value, match):
  encoder = build_encoder(dict(TINY, **{field: value}))
  with pytest.raises(ValueError, match=match):
    encoder.output_grid()
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(lambda x: encoder.init(jax.random.key(0), x), _waves())


def test_bad_inputs_are_refused():
  encoder = build_encoder(TINY)
  params = jax.eval_shape(lambda x: encoder.init(jax.random.key(0), x), _waves())
  for bad, match in ((jnp.zeros((2, 16, 49)), 'frames=50'), (jnp.zeros((2, 3, 16, 50)), 'expected a waveform'),
                     (jnp.zeros((2, 800), jnp.int16), 'dtype int16')):
    with pytest.raises(ValueError, match=match):
      jax.eval_shape(lambda p, x: encoder.apply(p, x), params, bad)


def test_scanned_and_rematerialised_stacks_compute_the_same():
  x = _waves()
  plain = build_encoder(TINY)
  params = _init(plain, x)
  ref, _ = _apply(plain, params, x)
  scanned = build_encoder(dict(TINY, scan_layers=True, remat='full'))
  stacked = stack_layers(params, 3)
  assert jax.tree.map(np.shape, stacked) == jax.tree.map(np.shape, _init(scanned, x))
  out, grid = _apply(scanned, stacked, x)
  assert grid == (25,)
  assert_close(out, np.asarray(ref), 1e-5, 'scan + remat')
  out, _ = _apply(build_encoder(dict(TINY, remat='dots')), params, x)
  assert_close(out, np.asarray(ref), 1e-5, 'remat dots')


def test_bfloat16_compute_follows_float32():
  """model.dtype bfloat16: the front end stays float32, the tower computes in bf16 from the same params."""
  x = _waves()
  params = _init(build_encoder(TINY), x)
  ref, _ = _apply(build_encoder(TINY), params, x)
  out, _ = _apply(build_encoder(TINY, dtype=jnp.bfloat16), params, x)
  assert out.dtype == jnp.bfloat16
  err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref)))
  assert 0 < err < 0.1 * float(jnp.max(jnp.abs(ref)))


@pytest.mark.parametrize('pool_stride, output_layer', [(1, -1), (2, -2)])
def test_matmul_flops_equal_the_traced_forward(pool_stride, output_layer):
  encoder = build_encoder(dict(TINY, pool_stride=pool_stride, output_layer=output_layer))
  x = jax.ShapeDtypeStruct((1, 8000), jnp.float32)
  params = jax.eval_shape(lambda x: nn.meta.unbox(encoder.init(jax.random.key(0), x)['params']), x)
  traced = flops.jaxpr_matmul_flops(lambda p, x: encoder.apply({'params': p}, x)[0], params, x)
  f = encoder.matmul_flops()
  assert f['blocks'] == 3 + output_layer + 1
  assert f['embed'] + f['blocks'] * (f['weights'] + f['attention']) == traced
