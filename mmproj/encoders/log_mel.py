"""Whisper's log-mel spectrogram front end in JAX (Radford et al. 2022, "Robust Speech Recognition via Large-Scale
Weak Supervision", arXiv:2212.04356), equal to transformers' `WhisperFeatureExtractor`.

  waveform float32 [B, S] at 16 kHz
  pad with zeros / truncate to the clip, n = chunk_length * 16000 samples    -> [B, n]
  reflect-pad n_fft // 2 on both sides (a centred STFT)                    -> [B, n + n_fft]
  frames of n_fft samples every hop samples, the last one dropped          -> [B, F, n_fft]      F = n / hop
  x periodic Hann window, real FFT, power |X|^2                             -> [B, F, n_fft/2 + 1]
  x slaney mel filter bank (slaney scale, slaney area norm, 0 - 8 kHz)      -> [B, F, M]
  log10(max(mel, 1e-10)); per example max(x, max(x) - 8); (x + 4) / 4       -> [B, M, F]  (HF's layout)

Whisper: n_fft 400, hop 160, chunk 30 s -> F = 3000 frames; M = 80 mel bins (128 for large-v3, Qwen2-Audio,
Voxtral). The FFT is jnp.fft.rfft rather than a DFT matmul, so its float32 accuracy does not depend on the
backend's matmul precision (TF32 on GPUs, bf16 passes on TPUs); the mel matmul asks for full precision for the
same reason. The filters are computed once in numpy (float64, stored float32), never traced.

Padding and the per-example maximum. HF pads every clip with zeros to its 30 s chunk first and then takes the
maximum over the whole padded spectrogram. A frame of zeros has log-mel log10(1e-10) = -10, the lowest possible
value, so the padding never raises the maximum: the maximum is that of the clip's own frames (or -10 for a
silent clip, whose features are then all (-10 + 4) / 4 = -1.5). The padded frames are clamped up to max - 8 like
every other low value. So a clip shorter than `chunk_length` gets, frame for frame, the same features here as HF
computes for it at any longer chunk (tests/test_audio_encoder.py checks a 1.3 s clip at chunk 2 s against HF's
30 s); only a clip that reaches the chunk's end differs in its last frames, whose reflect padding then mirrors
audio instead of zeros.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

SAMPLING_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
LOG_FLOOR = 1e-10          # mel power floor before log10
DYNAMIC_RANGE = 8.0        # decades kept below each example's maximum


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
  """Slaney's mel scale: linear below 1 kHz (3 mels per 200 Hz), logarithmic above (27 mels per factor 6.4)."""
  hz = np.asarray(hz, np.float64)
  linear = 3.0 * hz / 200.0
  log = 15.0 + np.log(np.maximum(hz, 1e-12) / 1000.0) * (27.0 / np.log(6.4))
  return np.where(hz >= 1000.0, log, linear)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
  mel = np.asarray(mel, np.float64)
  linear = 200.0 * mel / 3.0
  log = 1000.0 * np.exp((mel - 15.0) * (np.log(6.4) / 27.0))
  return np.where(mel >= 15.0, log, linear)


@functools.lru_cache(maxsize=None)
def mel_filters(num_mel_bins: int, n_fft: int = N_FFT, sampling_rate: int = SAMPLING_RATE,
                max_frequency: float = 8000.0) -> np.ndarray:
  """Slaney mel filter bank, float32 [n_fft // 2 + 1, num_mel_bins] (frequency bin -> mel band).

  Band m is a triangle over FFT bin frequencies rising from edge m to edge m + 1 and falling to edge m + 2, where
  the num_mel_bins + 2 edges are equally spaced in mel between 0 Hz and max_frequency; each triangle is scaled by
  2 / (its width in Hz) so that every band has the same area (slaney norm)."""
  edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(max_frequency), num_mel_bins + 2))  # [M + 2]
  freqs = np.linspace(0, sampling_rate // 2, n_fft // 2 + 1)                                         # [K]
  offset = edges[None, :] - freqs[:, None]                                                           # [K, M + 2]
  width = np.diff(edges)                                                                             # [M + 1]
  rising = -offset[:, :-2] / width[:-1]                                                              # [K, M]
  falling = offset[:, 2:] / width[1:]                                                                # [K, M]
  triangles = np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)
  area_norm = (2.0 / (edges[2:] - edges[:-2])).astype(np.float32)                                    # [M]
  filters = triangles * area_norm[None, :]
  filters.flags.writeable = False
  return filters


@functools.lru_cache(maxsize=None)
def hann_window(length: int) -> np.ndarray:
  """Periodic Hann window (torch.hann_window's default): 0.5 - 0.5 cos(2 pi k / length), k < length."""
  window = (0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(length) / length)).astype(np.float32)
  window.flags.writeable = False
  return window


def clip_samples(chunk_length: float, field: str = 'model.encoder.chunk_length') -> int:
  """Samples in a clip of `chunk_length` seconds at 16 kHz; ValueError naming `field` unless that is a whole,
  even number of hops (so the stride-2 convolution of the encoder sees an even frame count)."""
  samples = float(chunk_length) * SAMPLING_RATE
  if not samples > 0 or samples != round(samples) or round(samples) % (2 * HOP_LENGTH):
    raise ValueError(f'{field}={chunk_length!r}: the clip must be a positive multiple of {2 * HOP_LENGTH} samples '
                     f'({2 * HOP_LENGTH / SAMPLING_RATE} s) at {SAMPLING_RATE} Hz')
  return int(round(samples))


def num_frames(chunk_length: float, field: str = 'model.encoder.chunk_length') -> int:
  """Spectrogram frames of one clip: samples / hop (Whisper: 30 s -> 3000)."""
  return clip_samples(chunk_length, field) // HOP_LENGTH


def log_mel_spectrogram(waveform, *, num_mel_bins: int = 80, chunk_length: float = 30.0):
  """float waveforms [B, S] at 16 kHz -> normalised log-mel features float32 [B, num_mel_bins, F], F = 100 per s
  of chunk_length (see the module docstring). Clips are zero-padded or truncated to chunk_length seconds."""
  if waveform.ndim != 2:
    raise ValueError(f'audio waveform must be [B, S], got shape {waveform.shape}')
  n = clip_samples(chunk_length)
  frames = n // HOP_LENGTH
  x = jnp.asarray(waveform, jnp.float32)[:, :n]
  x = jnp.pad(x, ((0, 0), (0, n - x.shape[1])))                                    # [B, n]
  x = jnp.pad(x, ((0, 0), (N_FFT // 2, N_FFT // 2)), mode='reflect')                 # [B, n + n_fft]
  starts = np.arange(frames)[:, None] * HOP_LENGTH + np.arange(N_FFT)[None, :]     # [F, n_fft]
  windowed = x[:, starts] * jnp.asarray(hann_window(N_FFT))                         # [B, F, n_fft]
  spectrum = jnp.fft.rfft(windowed, axis=-1)                                         # [B, F, n_fft/2 + 1] complex
  power = jnp.real(spectrum) ** 2 + jnp.imag(spectrum) ** 2                          # [B, F, K]
  mel = jnp.matmul(power, jnp.asarray(mel_filters(num_mel_bins)),
                   precision=jax.lax.Precision.HIGHEST)                              # [B, F, M]
  log_mel = jnp.log10(jnp.maximum(mel, LOG_FLOOR))                                   # [B, F, M]
  peak = jnp.max(log_mel, axis=(1, 2), keepdims=True)                                # [B, 1, 1]
  log_mel = (jnp.maximum(log_mel, peak - DYNAMIC_RANGE) + 4.0) / 4.0                 # [B, F, M]
  return jnp.swapaxes(log_mel, 1, 2)                                                 # [B, M, F]
