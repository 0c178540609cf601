"""Audio encoder shaped like Whisper's (Radford et al. 2022, "Robust Speech Recognition via Large-Scale Weak
Supervision", arXiv:2212.04356), which Qwen2-Audio (Chu et al. 2024, arXiv:2407.10759) and Voxtral (Liu et al.
2025, arXiv:2507.13264) reuse as their audio towers.

  waveform float32 [B, S] at 16 kHz --log_mel_spectrogram (mmproj/encoders/log_mel.py)--> [B, M, F]
                                     (a float input [B, M, F] is taken as features already computed)
  conv1: kernel 3, pad 1, M -> D, GELU                      -> [B, F, D]
  conv2: kernel 3, stride 2, pad 1, D -> D, GELU            -> [B, T0, D]      T0 = F / 2
  + embed_positions (a param initialised to Whisper's sinusoids, so imports load the stored table)
  blocks: x + self_attn(self_attn_layer_norm(x)); x + mlp(final_layer_norm(x))   (pre-LN, bidirectional)
    attention: q, v, out projections with bias, k without (mmproj.layers.Attention, k_bias=False)
  output_layer: -1 = last block, -2 = penultimate, ...; only the blocks up to that one are built
  pool_stride p: average of every p consecutive tokens (Qwen2-Audio: p = 2, AvgPool1d(2, 2) after the blocks,
    before its final LayerNorm; a remainder shorter than p is dropped, as torch does)      -> [B, T, D]  T = T0 / p
  layer_norm (final_norm): HF applies it to last_hidden_state only, so for parity with hidden_states[k < -1] set
    final_norm=False (as for the ViT)
  -> tokens [B, T, D] in time order, grid (T,)

Whisper: 30 s clips, F = 3000 frames, T = 1500 tokens; at chunk_length 2 s, F = 200 and T = 100 / p.

Input: the rank tells waveforms from features, unambiguously: a 2-d float array [B, S] is a batch of waveforms
(any S: clips are padded or cut to chunk_length), a 3-d float array must be features [B, num_mel_bins, F] of
exactly this clip's frame count; anything else raises ValueError.

Parameters (D width, M mel bins, Fm mlp_dim, L built blocks, P positions):
  conv1 3 M D + D,  conv2 3 D^2 + D,  embed_positions P D,
  per block 4 D^2 + 3 D (q, v, out biases) + 2 D Fm + Fm + D + 4 D (two LayerNorms),  layer_norm 2 D.
Locality: temporal order is kept (before the attention mixes them, token t sees spectrogram frames 2 t p - 2 ...
2 (t + 1) p, through the two kernel-3 convolutions); the attention is global over the clip.

Parameter names follow HF WhisperEncoder where they can: conv1, conv2, embed_positions [P, D] ('pos', 'embed'),
layers_{i}/{self_attn_layer_norm, self_attn/{q,k,v,o}_proj, final_layer_norm, mlp/{fc1, fc2}}, layer_norm
(HF's out_proj is o_proj, its fc1 / fc2 sit under mlp/). Conv kernels are stored flattened [3 C_in, D]
('patch', 'embed') in (tap, channel) order, i.e. the torch weight [D, C_in, 3] transposed to [3, C_in, D] and
reshaped (as the ViT's patch kernel). With scan_layers the blocks are one stacked tree layers/... with a leading
[num_blocks] axis (mmproj/layers/scan.py); remat wraps each block like the ViT's.
"""

from __future__ import annotations

from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmproj.encoders import log_mel
from mmproj.layers import Attention, GeluMLP, LayerNorm, get_activation
from mmproj.layers.scan import check_remat, check_scan, remat_block, scan_blocks

Dtype = Any


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
  """Whisper's fixed position table float32 [length, channels]: [sin(t w_i) | cos(t w_i)], with channels / 2
  frequencies w_i = max_timescale^(-i / (channels / 2 - 1))."""
  if channels % 2 or channels < 4:
    raise ValueError(f'model.encoder.width={channels}: the sinusoidal position table needs an even width >= 4')
  half = channels // 2
  rates = np.exp(-np.log(max_timescale) / (half - 1) * np.arange(half))                 # [D/2]
  angles = np.arange(length)[:, None] * rates[None, :]                                   # [P, D/2]
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1).astype(np.float32)     # [P, D]


class Conv1d(nn.Module):
  """Kernel-3 convolution over time with padding 1: [B, F, C_in] -> [B, ceil(F / stride), D]."""

  features: int
  stride: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):                                                   # [B, F, C_in]
    c_in = x.shape[-1]
    kernel = self.param('kernel', nn.with_logical_partitioning(nn.initializers.lecun_normal(), ('patch', 'embed')),
                        (3 * c_in, self.features), jnp.float32)            # [3 C_in, D]
    bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros, ('embed',)),
                      (self.features,), jnp.float32)                       # [D]
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), kernel.reshape(3, c_in, self.features).astype(self.dtype),
        window_strides=(self.stride,), padding=((1, 1),), dimension_numbers=('NWC', 'WIO', 'NWC'))
    return y + bias.astype(self.dtype)                                     # [B, F', D]


class WhisperBlock(nn.Module):
  """Pre-LN block: x + attn(LN(x)); x + mlp(LN(x)), k_proj without bias.  [B, T, D] -> [B, T, D]."""

  num_heads: int
  mlp_dim: int
  act: str = 'gelu'
  norm_eps: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):                                                   # [B, T, D]
    d = x.shape[-1]
    h = LayerNorm(self.norm_eps, self.dtype, name='self_attn_layer_norm')(x)
    h, _ = Attention(self.num_heads, self.num_heads, d // self.num_heads, use_bias=True, use_rope=False,
                     k_bias=False, dtype=self.dtype, name='self_attn')(h)  # [B, T, D]
    x = x + h
    h = LayerNorm(self.norm_eps, self.dtype, name='final_layer_norm')(x)
    return x + GeluMLP(self.mlp_dim, act=self.act, dtype=self.dtype, name='mlp')(h)   # [B, T, D]


class ScanWhisperBlock(WhisperBlock):
  """WhisperBlock with nn.scan's (carry) -> (carry, y) signature: x [B, T, D] -> ([B, T, D], None)."""

  def __call__(self, x):                                                   # [B, T, D]
    return super().__call__(x), None


class WhisperEncoder(nn.Module):
  """Whisper-shaped audio tower: waveforms [B, S] (or log-mel features [B, M, F]) -> tokens [B, T, D], grid (T,)."""

  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  num_mel_bins: int = 80
  chunk_length: float = 30.0    # seconds per clip (Whisper: 30 -> 3000 frames); clips are padded / cut to it
  max_source_positions: int | None = None   # rows of embed_positions; None = F / 2. More rows than the clip needs
                                            # (a 30 s checkpoint on short clips) are allowed: the first F / 2 are used
  output_layer: int = -1
  final_norm: bool = True
  pool_stride: int = 1          # 1: none; 2: Qwen2-Audio's average pool before the final LayerNorm
  norm_eps: float = 1e-5        # torch nn.LayerNorm's default, which every HF Whisper-shaped tower uses
  act: str = 'gelu'
  scan_layers: bool = False
  remat: str = 'none'           # 'none' | 'dots' | 'minimal' | 'full' (mmproj/layers/scan.py)
  dtype: Dtype = jnp.float32

  @nn.nowrap
  def check(self) -> None:
    """ValueError naming the model.encoder field at fault (called before tracing)."""
    for field in ('width', 'depth', 'num_heads', 'mlp_dim', 'num_mel_bins', 'pool_stride'):
      value = getattr(self, field)
      if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f'model.encoder.{field}={value!r} must be a positive integer')
    if self.width % self.num_heads:
      raise ValueError(f'model.encoder.width={self.width} is not divisible by model.encoder.num_heads='
                       f'{self.num_heads}')
    if not -self.depth <= self.output_layer <= -1:
      raise ValueError(f'model.encoder.output_layer={self.output_layer} out of range [-{self.depth}, -1]')
    t0 = log_mel.num_frames(self.chunk_length) // 2
    if self.max_source_positions is not None and self.max_source_positions < t0:
      raise ValueError(f'model.encoder.max_source_positions={self.max_source_positions} is shorter than the '
                       f'{t0} positions a {self.chunk_length} s clip (model.encoder.chunk_length) needs')
    if self.pool_stride > t0:
      raise ValueError(f'model.encoder.pool_stride={self.pool_stride} exceeds the {t0} tokens of a '
                       f'{self.chunk_length} s clip')
    get_activation(self.act)
    check_remat(self.remat, 'model.encoder.remat')
    check_scan(self.scan_layers, 'model.encoder.scan_layers')

  @property
  def num_blocks(self) -> int:
    """Blocks actually run: up to and including the one selected by `output_layer`."""
    if not -self.depth <= self.output_layer <= -1:
      raise ValueError(f'model.encoder.output_layer={self.output_layer} out of range [-{self.depth}, -1]')
    return self.depth + self.output_layer + 1

  @nn.nowrap
  def num_frames(self) -> int:
    """Spectrogram frames F of one clip (100 per second)."""
    return log_mel.num_frames(self.chunk_length)

  @nn.nowrap
  def num_samples(self) -> int:
    """Waveform samples S of one clip at 16 kHz (longer clips are cut, shorter ones zero-padded)."""
    return log_mel.clip_samples(self.chunk_length)

  @nn.nowrap
  def output_grid(self) -> tuple[int]:
    """(T,): tokens per clip, from the fields alone, T = (F / 2) // pool_stride."""
    self.check()
    return ((self.num_frames() // 2) // self.pool_stride,)

  @nn.nowrap
  def matmul_flops(self) -> dict[str, int]:
    """Matmul FLOPs (2 per multiply-add) of one clip's forward pass from a waveform, F frames, S = F / 2 tokens in
    the blocks, D width, M mel bins, K = n_fft / 2 + 1 = 201 frequency bins, Fm mlp_dim (the FFT is no matmul and
    is not counted; convolutions count only the taps that read real input, not padding: XLA's convention):
      embed      mel filters 2 F K M, conv1 2 (3 F - 2) M D, conv2 2 (3 S - 1) D^2
      per block (`blocks` = num_blocks of them):
        weights    q, k, v, o, fc1, fc2                             2 * S * (4 D^2 + 2 D Fm)
        attention  scores q k^T and weighted sum p v                2 * 2 * S^2 * D
        last       fc2, the block's last matmul (the one remat='full' does not recompute)   2 * S * Fm * D"""
    f = self.num_frames()
    s, d, m, fm = f // 2, self.width, self.num_mel_bins, self.mlp_dim
    embed = 2 * f * (log_mel.N_FFT // 2 + 1) * m + 2 * (3 * f - 2) * m * d + 2 * (3 * s - 1) * d * d
    return dict(embed=embed, blocks=self.num_blocks, weights=2 * s * (4 * d * d + 2 * d * fm),
                attention=2 * 2 * s * s * d, last=2 * s * fm * d)

  @nn.nowrap
  def features(self, audio):
    """waveforms [B, S] -> log-mel features [B, M, F]; features [B, M, F] are checked and returned as they are."""
    if not jnp.issubdtype(audio.dtype, jnp.floating):
      raise ValueError(f'audio must be a float waveform [B, S] or float features [B, {self.num_mel_bins}, '
                       f'{self.num_frames()}], got dtype {audio.dtype}')
    if audio.ndim == 2:
      return log_mel.log_mel_spectrogram(audio, num_mel_bins=self.num_mel_bins, chunk_length=self.chunk_length)
    if audio.ndim == 3 and audio.shape[1:] == (self.num_mel_bins, self.num_frames()):
      return audio
    raise ValueError(f'audio of shape {audio.shape}: expected a waveform [B, S] or features [B, num_mel_bins='
                     f'{self.num_mel_bins}, frames={self.num_frames()}] (model.encoder.chunk_length='
                     f'{self.chunk_length} s)')

  @nn.compact
  def __call__(self, audio):                                               # [B, S] or [B, M, F]
    self.check()
    x = jnp.swapaxes(self.features(audio), 1, 2).astype(self.dtype)        # [B, F, M]
    gelu = get_activation('gelu')                                          # both HF convs use the exact erf GELU
    x = gelu(Conv1d(self.width, 1, self.dtype, name='conv1')(x))           # [B, F, D]
    x = gelu(Conv1d(self.width, 2, self.dtype, name='conv2')(x))           # [B, T0, D]
    t0 = x.shape[1]
    positions = self.max_source_positions or t0
    pos = self.param('embed_positions', nn.with_logical_partitioning(
        lambda key, shape, dtype: jnp.asarray(sinusoids(*shape), dtype), ('pos', 'embed')),
        (positions, self.width), jnp.float32)                              # [P, D]
    x = x + pos[:t0].astype(self.dtype)[None]                              # [B, T0, D]
    block = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, act=self.act, norm_eps=self.norm_eps,
                 dtype=self.dtype)
    if self.scan_layers:
      x, _ = scan_blocks(ScanWhisperBlock, self.num_blocks, remat=self.remat,
                         field='model.encoder.remat')(**block, name='layers')(x)
    else:
      block_cls = remat_block(WhisperBlock, self.remat, field='model.encoder.remat')
      for i in range(self.num_blocks):
        x = block_cls(**block, name=f'layers_{i}')(x)                      # [B, T0, D]
    if self.pool_stride > 1:
      t = t0 // self.pool_stride
      x = einops.reduce(x[:, :t * self.pool_stride], 'b (t p) d -> b t d', 'mean', p=self.pool_stride)  # [B, T, D]
    if self.final_norm:
      x = LayerNorm(self.norm_eps, self.dtype, name='layer_norm')(x)
    return x, (x.shape[1],)                                                # [B, T, D]
