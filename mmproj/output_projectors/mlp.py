"""MLP output projector — the linear / MLP baseline of GILL's mapper ablation (Koh, Fried, Salakhutdinov 2023,
"Generating Images with Multimodal Language Models", arXiv:2305.17216, whose `linear` TextFcLayer maps each [IMG]
state to the generator's space independently) and the simplest output projector of NExT-GPT-style systems (Wu et
al. 2023, "NExT-GPT: Any-to-Any Multimodal LLM", arXiv:2309.05519).

A depth-N MLP applied to every signal token's hidden state independently (activation, default exact erf GELU,
between layers, none after the last; optional dropout after each activation), then — only when K != L — a learned
linear mixing along the token axis that turns K token vectors into L:
  depth 1:  Linear(D_lm, Dc)
  depth N:  Linear(D_lm, F) act [Linear(F, F) act] * (N - 2) Linear(F, Dc)          F = hidden_dim (default Dc)
  K != L:   y[b, l, :] = sum_k z[b, k, :] * mix_kernel[k, l] + mix_bias[l, :]
  K == L:   no mixing (no mix params): output token i is the MLP of signal token i alone.

  tokens in -> out:  K -> L
  params:            depth 1:  D_lm*Dc + Dc
                     depth N:  (D_lm*F + F) + (N - 2)*(F*F + F) + (F*Dc + Dc)
                     + [K != L] * (K*L + L*Dc)
  shapes:            h [B, K, D_lm] -> linear_1 -> [B, K, F] -> act (-> dropout) -> ... -> z [B, K, Dc]
                     mix_kernel [K, L] (None, 'pos'), mix_bias [L, Dc] ('pos', 'embed')
                     -> y [B, L, Dc]

Layers are named linear_1 .. linear_N; kernel logical axes alternate ('embed', 'mlp'), ('mlp', 'embed'), ... as in
the input MLP projector (mmproj/projectors/mlp.py). The mixing kernel starts lecun-normal over K (each output
position an average-scale blend of the K tokens), its bias at zero.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mmproj.layers import ACTIVATIONS, dense, get_activation
from mmproj.output_projectors.registry import check_choice, check_int, check_rate, register


@register('mlp')
class MLPOutputProjector(nn.Module):
  """Per-token depth-N MLP, then a learned K -> L token mixing when K != L: [B, K, D_lm] -> [B, L, Dc]."""

  in_dim: int
  num_signal_tokens: int
  out_len: int
  out_dim: int
  depth: int = 2
  hidden_dim: int | None = None   # F, the hidden width (depth >= 2); None = out_dim
  act: str = 'gelu'               # a key of mmproj.layers.ACTIVATIONS
  dropout: float = 0.0            # after each hidden activation, when deterministic=False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h, *, deterministic: bool = True):                    # h [B, K, D_lm]
    k, l = self.num_signal_tokens, self.out_len
    if h.ndim != 3 or h.shape[1:] != (k, self.in_dim):
      raise ValueError(f'mlp output projector expects h [B, K={k}, D_lm={self.in_dim}], got {h.shape}')
    hidden = self.hidden_dim or self.out_dim
    z = h.astype(self.dtype)                                                # [B, K, D_lm]
    for i in range(self.depth):
      if i > 0:
        z = get_activation(self.act)(z)                                     # [B, K, F]
        z = nn.Dropout(self.dropout)(z, deterministic=deterministic)        # [B, K, F]
      width = self.out_dim if i == self.depth - 1 else hidden
      names = ('embed', 'mlp') if i % 2 == 0 else ('mlp', 'embed')
      z = dense(width, names, use_bias=True, dtype=self.dtype, name=f'linear_{i + 1}')(z)  # [B, K, F or Dc]
    if k == l:
      return z                                                              # [B, L = K, Dc]
    mix = self.param('mix_kernel', nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), (None, 'pos')), (k, l), jnp.float32)                   # [K, L]
    bias = self.param('mix_bias', nn.with_logical_partitioning(
        nn.initializers.zeros, ('pos', 'embed')), (l, self.out_dim), jnp.float32)             # [L, Dc]
    y = jnp.einsum('bkc,kl->blc', z, mix.astype(self.dtype))                # [B, L, Dc]
    return y + bias.astype(self.dtype)[None]                                # [B, L, Dc]

  @nn.nowrap
  def check(self) -> None:
    check_int('depth', self.depth)
    check_int('hidden_dim', self.hidden_dim, optional=True)
    check_choice('act', self.act, ACTIVATIONS)
    check_rate('dropout', self.dropout)

  @nn.nowrap
  def param_count(self) -> int:
    d, f, c = self.in_dim, self.hidden_dim or self.out_dim, self.out_dim
    k, l = self.num_signal_tokens, self.out_len
    if self.depth == 1:
      n = d * c + c
    else:
      n = (d * f + f) + (self.depth - 2) * (f * f + f) + (f * c + c)
    if k != l:
      n += k * l + l * c
    return n
