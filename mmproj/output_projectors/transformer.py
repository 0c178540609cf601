"""Transformer output projector — GILL's GILLMapper (Koh, Fried, Salakhutdinov 2023, "Generating Images with
Multimodal Language Models", arXiv:2305.17216), which NExT-GPT (Wu et al. 2023, "NExT-GPT: Any-to-Any Multimodal
LLM", arXiv:2309.05519) and MiniGPT-5 (Zheng, He, Wang 2023, "MiniGPT-5: Interleaved Vision-and-Language
Generation via Generative Vokens", arXiv:2310.02239) use as their output projector.

The K signal-token states are projected to the mapper's width and encoded by a small transformer encoder; L
learned queries (one per conditioning position of the generator: 77 for Stable Diffusion's CLIP text states) run
through a transformer decoder that self-attends among the queries and cross-attends to the encoded states; the
result is projected to the generator's width. Pre-LN layers (PyTorch's nn.Transformer with norm_first=True, as
GILLMapper builds it), biased attention and feed-forward, no masks (every signal token and every query is always
present) and no position embeddings (the K signal tokens are distinct vocabulary entries, so their states are
already distinguishable, and each query is a learned per-position vector).

  x = in_proj(h)                                                           # [B, K, d]       d = d_model
  encoder_depth x:  x = x + drop(self_attn(LN(x)))                         # [B, K, d]
                    x = x + drop(FF(LN(x)))                                # [B, K, d]
  m = memory_norm(x)                                                       # [B, K, d] (the encoder's final LN;
                                                                           #  with encoder_depth 0 it normalises
                                                                           #  the projected states)
  z = queries [L, d] (learned, N(0, 1) as GILL's torch.randn)              # [B, L, d]
  decoder_depth x:  z = z + drop(self_attn(LN(z)))                         # [B, L, d]
                    z = z + drop(cross_attn(LN(z), m))                     # [B, L, d]
                    z = z + drop(FF(LN(z)))                                # [B, L, d]
  y = out_proj(norm(z))                                                    # [B, L, Dc]
FF = fc2(act(fc1(.))) with hidden mlp_dim; drop = dropout on each residual branch when deterministic=False.
GILLMapper's sizes are the defaults: d_model 512, 4 heads, FF 4*d_model, 4 encoder and 4 decoder layers, ReLU
(nn.Transformer's), LayerNorm eps 1e-5, dropout 0.

  tokens in -> out:  K -> L (out_len, any; queries are learned per output position)
  params:            with d = d_model, F = mlp_dim (default 4*d), A = 4*d*d + 4*d (biased attention, H heads of
                     d // H), P = 2*d*F + F + d (feed-forward):
                       (D_lm*d + d) + L*d
                       + encoder_depth * (4*d + A + P)
                       + 2*d
                       + decoder_depth * (6*d + 2*A + P)
                       + 2*d + (d*Dc + Dc)
  shapes:            h [B, K, D_lm] -> x [B, K, d]; queries [L, d] ('pos', 'embed') -> z [B, L, d];
                     self-attention q/k/v [B, K or L, H, d // H]; cross-attention q [B, L, H, d // H],
                     k/v [B, K, H, d // H]; FF hidden [B, ., F] -> y [B, L, Dc]

Param names: in_proj, encoder_{i}/{attn_norm, attn, ff_norm, ff}, memory_norm, queries,
decoder_{j}/{self_attn_norm, self_attn, cross_attn_norm, cross_attn, ff_norm, ff}, norm, out_proj; the attention
layers are mmproj.layers.CrossAttention (q_proj/k_proj/v_proj/o_proj), the feed-forwards GeluMLP (fc1/fc2).
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mmproj.layers import ACTIVATIONS, GeluMLP, LayerNorm, dense
from mmproj.layers.cross_attention import CrossAttention
from mmproj.output_projectors.registry import FIELD, check_choice, check_int, check_positive, check_rate, register


class EncoderLayer(nn.Module):
  """Pre-LN encoder layer: self-attention, then feed-forward, each a residual branch with dropout."""

  num_heads: int
  mlp_dim: int
  act: str
  dropout: float
  norm_eps: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool):                                # x [B, K, d]
    d = x.shape[-1]
    attn = CrossAttention(self.num_heads, d // self.num_heads, use_bias=True, dtype=self.dtype, name='attn')
    x_n = LayerNorm(self.norm_eps, self.dtype, name='attn_norm')(x)           # [B, K, d]
    x = x + nn.Dropout(self.dropout)(attn(x_n, x_n), deterministic=deterministic)          # [B, K, d]
    ff = GeluMLP(self.mlp_dim, act=self.act, dtype=self.dtype, name='ff')
    x_n = LayerNorm(self.norm_eps, self.dtype, name='ff_norm')(x)             # [B, K, d]
    return x + nn.Dropout(self.dropout)(ff(x_n), deterministic=deterministic)              # [B, K, d]


class DecoderLayer(nn.Module):
  """Pre-LN decoder layer: self-attention among the queries, cross-attention to the memory, feed-forward."""

  num_heads: int
  mlp_dim: int
  act: str
  dropout: float
  norm_eps: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z, memory, deterministic: bool):                       # z [B, L, d], memory [B, K, d]
    d = z.shape[-1]
    head_dim = d // self.num_heads
    z_n = LayerNorm(self.norm_eps, self.dtype, name='self_attn_norm')(z)      # [B, L, d]
    y = CrossAttention(self.num_heads, head_dim, use_bias=True, dtype=self.dtype, name='self_attn')(z_n, z_n)
    z = z + nn.Dropout(self.dropout)(y, deterministic=deterministic)         # [B, L, d]
    z_n = LayerNorm(self.norm_eps, self.dtype, name='cross_attn_norm')(z)     # [B, L, d]
    y = CrossAttention(self.num_heads, head_dim, use_bias=True, dtype=self.dtype, name='cross_attn')(z_n, memory)
    z = z + nn.Dropout(self.dropout)(y, deterministic=deterministic)         # [B, L, d]
    z_n = LayerNorm(self.norm_eps, self.dtype, name='ff_norm')(z)             # [B, L, d]
    y = GeluMLP(self.mlp_dim, act=self.act, dtype=self.dtype, name='ff')(z_n)                # [B, L, d]
    return z + nn.Dropout(self.dropout)(y, deterministic=deterministic)      # [B, L, d]


@register('transformer')
class TransformerOutputProjector(nn.Module):
  """GILLMapper: L learned queries decode from the encoded K signal-token states: [B, K, D_lm] -> [B, L, Dc]."""

  in_dim: int
  num_signal_tokens: int
  out_len: int
  out_dim: int
  d_model: int = 512
  num_heads: int = 4              # must divide d_model (head width d_model // num_heads)
  mlp_dim: int | None = None      # feed-forward hidden width; None = 4 * d_model
  encoder_depth: int = 4          # 0 = no encoder: the queries read the projected (normed) states directly
  decoder_depth: int = 4
  act: str = 'relu'               # a key of mmproj.layers.ACTIVATIONS (nn.Transformer's default is ReLU)
  dropout: float = 0.0            # on every residual branch, when deterministic=False
  norm_eps: float = 1e-5          # PyTorch LayerNorm's
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h, *, deterministic: bool = True):                    # h [B, K, D_lm]
    k, l, d = self.num_signal_tokens, self.out_len, self.d_model
    if h.ndim != 3 or h.shape[1:] != (k, self.in_dim):
      raise ValueError(f'transformer output projector expects h [B, K={k}, D_lm={self.in_dim}], got {h.shape}')
    layer_kwargs = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim or 4 * d, act=self.act,
                        dropout=self.dropout, norm_eps=self.norm_eps, dtype=self.dtype)

    x = dense(d, ('embed', 'mlp'), use_bias=True, dtype=self.dtype, name='in_proj')(h.astype(self.dtype))  # [B, K, d]
    for i in range(self.encoder_depth):
      x = EncoderLayer(**layer_kwargs, name=f'encoder_{i}')(x, deterministic)                # [B, K, d]
    memory = LayerNorm(self.norm_eps, self.dtype, name='memory_norm')(x)                     # [B, K, d]

    queries = self.param('queries', nn.with_logical_partitioning(
        nn.initializers.normal(1.0), ('pos', 'embed')), (l, d), jnp.float32)                # [L, d]
    z = jnp.broadcast_to(queries.astype(self.dtype)[None], (h.shape[0], l, d))             # [B, L, d]
    for j in range(self.decoder_depth):
      z = DecoderLayer(**layer_kwargs, name=f'decoder_{j}')(z, memory, deterministic)       # [B, L, d]
    z = LayerNorm(self.norm_eps, self.dtype, name='norm')(z)                                 # [B, L, d]
    return dense(self.out_dim, ('mlp', 'embed'), use_bias=True, dtype=self.dtype, name='out_proj')(z)  # [B, L, Dc]

  @nn.nowrap
  def check(self) -> None:
    check_int('d_model', self.d_model)
    if check_int('num_heads', self.num_heads) and self.d_model % self.num_heads:
      raise ValueError(f'{FIELD}.num_heads={self.num_heads} does not divide {FIELD}.d_model={self.d_model}')
    check_int('mlp_dim', self.mlp_dim, optional=True)
    check_int('encoder_depth', self.encoder_depth, 0)
    check_int('decoder_depth', self.decoder_depth, 1)     # without a decoder layer the queries never read h
    check_choice('act', self.act, ACTIVATIONS)
    check_rate('dropout', self.dropout)
    check_positive('norm_eps', self.norm_eps)

  @nn.nowrap
  def param_count(self) -> int:
    d, f = self.d_model, self.mlp_dim or 4 * self.d_model
    attn = CrossAttention.param_count(d, d, d, self.num_heads, d // self.num_heads, use_bias=True)  # 4*d*d + 4*d
    ff = 2 * d * f + f + d
    return ((self.in_dim * d + d) + self.out_len * d
            + self.encoder_depth * (4 * d + attn + ff)
            + 2 * d
            + self.decoder_depth * (6 * d + 2 * attn + ff)
            + 2 * d + (d * self.out_dim + self.out_dim))
