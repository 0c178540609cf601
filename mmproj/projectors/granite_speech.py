"""Granite Speech connector: a window-level Q-Former — SALMONN (Tang et al. 2023, "SALMONN: Towards Generic Hearing
Abilities for Large Language Models", arXiv:2310.13289) as Granite Speech uses it (Saon et al. 2025,
"Granite-speech: open-source speech-aware LLMs with strong English ASR capabilities", arXiv:2505.08699;
transformers GraniteSpeechEncoderProjector).

The frame sequence is cut into windows of W consecutive frames (the last one zero-padded); in every window the
same Q = W / r learned queries run through a BLIP-2 Q-Former (mmproj.projectors.qformer.QFormer: self-attention
among the queries, cross-attention to the window's frames), so each window of W frames becomes Q tokens — a
temporal downsampling by r that keeps the order of the windows. A Linear maps the query outputs to the LM width:

    x [B, T, Dv] ──zero-pad to n_w*W frames, n_w = ceil(T / W)──> [B*n_w, W, Dv]   (one row per window)
    query [Q, D] (learned, shared by every window) ──Q-Former(queries, window frames)──> [B*n_w, Q, D]
      ──windows back in order──> [B, n_w*Q, D] ──linear──> y [B, n_w*Q, Dt]

As in the reference the padded frames of the last window are zeros the queries attend to (no mask), and the
Q-Former has no text input; its queries carry no position, so order inside a window comes only from the
encoder's features. The tokens are read as one sequence in the order given (time order for an audio grid (T,);
row-major for an image grid (h, w), whose windows are runs of W patches).

  tokens in -> out:  N -> M = ceil(N / W) * Q,  Q = window_size / downsample_rate   (N = T, or h*w for an image)
  params:            with D = hidden_dim, F = mlp_dim, L = num_layers, C = ceil(L / cross_attention_frequency)
                       Q*D                                (query)
                     + 2*D                                (the Q-Former's embed_norm)
                     + L * (4*D^2 + 6*D) + C * (2*D^2 + 2*Dv*D + 6*D) + L * (2*D*F + F + 3*D)   (its layers)
                     + D*Dt + Dt                          (linear)
  temporal locality: kept between windows — output tokens i*Q .. i*Q + Q - 1 depend only on frames
                     i*W .. i*W + W - 1; inside a window every query reads all W frames
  shapes:            x [B, T, Dv] -> windows [B*n_w, W, Dv]; query [Q, D] ('pos', 'embed') -> queries [B*n_w, Q, D]
                     -> Q-Former [B*n_w, Q, D] -> [B, n_w*Q, D] -> linear [D, Dt] ('embed', 'mlp') -> y [B, M, Dt]
"""

from typing import Any

import einops
import flax.linen as nn
import jax.numpy as jnp

from mmproj.layers import ACTIVATIONS, dense
from mmproj.layers.token_grid import check_tokens, grid_tokens
from mmproj.projectors.qformer import QFormer
from mmproj.projectors.registry import check_choice, check_int, check_positive, register


@register('granite_speech', modality='audio')
class GraniteSpeechProjector(nn.Module):
  """Window-level Q-Former: [B, T, Dv] -> [B, ceil(T / window_size) * window_size / downsample_rate, Dt]."""

  in_dim: int
  out_dim: int
  window_size: int = 15            # W frames per window (Granite Speech: 15)
  downsample_rate: int = 5         # r: each window gives W / r tokens (must divide W)
  hidden_dim: int = 1024           # the Q-Former width D
  num_layers: int = 2
  num_heads: int = 16
  mlp_dim: int = 4096
  cross_attention_frequency: int = 1
  act: str = 'gelu'                # HF hidden_act of the Q-Former
  norm_eps: float = 1e-12          # the Q-Former's LayerNorms (HF layer_norm_eps)
  dropout: float = 0.0             # BERT hidden dropout in the Q-Former
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, grid=None, deterministic: bool = True):    # x [B, T, Dv]
    what = 'granite_speech projector'
    b, n, dv = x.shape
    check_tokens(x, grid, what)
    if dv != self.in_dim:
      raise ValueError(f'{what} expects in_dim={self.in_dim}, got tokens of width {dv}')
    w, q, d = self.window_size, self.num_queries(), self.hidden_dim
    windows = -(-n // w)
    x = jnp.pad(x.astype(self.dtype), ((0, 0), (0, windows * w - n), (0, 0)))       # [B, n_w*W, Dv]
    x = einops.rearrange(x, 'b (n w) d -> (b n) w d', w=w)                           # [B*n_w, W, Dv]
    query = self.param('query', nn.with_logical_partitioning(nn.initializers.normal(1.0), ('pos', 'embed')),
                       (q, d), jnp.float32)                                          # [Q, D]
    queries = jnp.broadcast_to(query.astype(self.dtype)[None], (b * windows, q, d))  # [B*n_w, Q, D]
    h = QFormer(self.hidden_dim, self.num_layers, self.num_heads, self.mlp_dim, self.cross_attention_frequency,
                self.act, norm_eps=self.norm_eps, dropout=self.dropout, dtype=self.dtype,
                name='qformer')(queries, x, deterministic=deterministic)            # [B*n_w, Q, D]
    h = einops.rearrange(h, '(b n) q d -> b (n q) d', b=b)                           # [B, n_w*Q, D]
    return dense(self.out_dim, ('embed', 'mlp'), use_bias=True, dtype=self.dtype, name='linear')(h)  # [B, M, Dt]

  @nn.nowrap
  def num_queries(self) -> int:
    """Q = window_size / downsample_rate learned queries, the tokens each window becomes."""
    return self.window_size // self.downsample_rate

  @nn.nowrap
  def check(self) -> None:
    for key in ('window_size', 'downsample_rate', 'hidden_dim', 'num_layers', 'num_heads', 'mlp_dim',
                'cross_attention_frequency'):
      check_int(key, getattr(self, key))
    if self.window_size % self.downsample_rate:
      raise ValueError(f'model.projector.downsample_rate={self.downsample_rate} must divide '
                       f'model.projector.window_size={self.window_size} (each window gives W / r query tokens)')
    if self.hidden_dim % self.num_heads:
      raise ValueError(f'model.projector.hidden_dim={self.hidden_dim} is not divisible by '
                       f'model.projector.num_heads={self.num_heads}')
    check_choice('act', self.act, ACTIVATIONS)
    check_positive('norm_eps', self.norm_eps)
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f'model.projector.dropout must be in [0, 1), got {self.dropout!r}')

  @nn.nowrap
  def num_output_tokens(self, grid) -> int:
    n = grid_tokens(grid, 'granite_speech projector')
    return -(-n // self.window_size) * self.num_queries()

  @nn.nowrap
  def param_count(self) -> int:
    d = self.hidden_dim
    body = QFormer.param_count(self.in_dim, d, self.num_layers, self.mlp_dim, self.cross_attention_frequency)
    return self.num_queries() * d + body + d * self.out_dim + self.out_dim
