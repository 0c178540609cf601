"""BERT-style post-LN residual blocks (Devlin et al. 2019), the building blocks of the BLIP-2 Q-Former.

  BertAttention:    y = LN(x + dropout(o_proj(softmax(q(x) k(c)^T / sqrt(Dh) + mask) v(c))))   c = context or x
  BertFeedForward:  y = LN(x + dropout(fc2(act(fc1(x)))))

Post-LN (the norm after the residual sum, HF BertSelfOutput / BertOutput), unlike the pre-LN ViT / Llama blocks.
Both blocks derive from `PostLN`: keyword-only fields norm_eps, dropout, dtype and the residual LN(x + dropout(y)).
Attention is `mmproj.layers.CrossAttention` with biases (MHA, keys = values = context); `context=None` makes it
self-attention. Shapes: x [B, T, D], context [B, S, Dc] -> y [B, T, D].
Params (names, logical axes):
  BertAttention    attention/{q_proj [D, H, Dh], k_proj/v_proj [Dc, H, Dh], o_proj [H, Dh, D]} + biases, norm
                   count: D*D + 2*Dc*D + D*D + 4*D (biases) + 2*D (norm) = 2*D^2 + 2*Dc*D + 6*D   (H*Dh = D)
  BertFeedForward  fc1 [D, F] ('embed', 'mlp'), fc2 [F, D] ('mlp', 'embed'), norm
                   count: 2*D*F + F + 3*D
Attention-probability dropout is not applied (only the hidden dropout after o_proj / fc2 and, in the Q-Former,
after the embedding norm).
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mmproj.layers.cross_attention import CrossAttention
from mmproj.layers.mlp import dense, get_activation
from mmproj.layers.norms import LayerNorm

Dtype = Any


class PostLN(nn.Module, kw_only=True):
  """Fields shared by BERT's post-LN blocks (keyword-only): LayerNorm eps, hidden dropout rate, compute dtype."""

  norm_eps: float = 1e-12
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.nowrap
  def residual_norm(self, x, y, deterministic: bool):
    """LN(x + dropout(y)), the LayerNorm named 'norm' (HF BertSelfOutput / BertOutput); call from a compact method."""
    y = nn.Dropout(self.dropout)(y, deterministic=deterministic)
    return LayerNorm(self.norm_eps, self.dtype, name='norm')(x + y)


class BertAttention(PostLN):
  """Post-LN multi-head attention block (self-attention, or cross-attention when `context` is given)."""

  num_heads: int

  @nn.compact
  def __call__(self, x, context=None, *, mask=None, deterministic: bool = True):
    """x [B, T, D]; context [B, S, Dc] or None (self-attention); mask bool [B, T, S] or None -> [B, T, D]."""
    d = x.shape[-1]
    if d % self.num_heads:
      raise ValueError(f'width {d} is not divisible by num_heads={self.num_heads}')
    kv = x if context is None else context
    y = CrossAttention(num_heads=self.num_heads, head_dim=d // self.num_heads, use_bias=True,
                       dtype=self.dtype, name='attention')(x, kv, mask=mask)       # [B, T, D]
    return self.residual_norm(x, y, deterministic)                               # [B, T, D]

  @staticmethod
  def param_count(dim: int, context_dim: int | None = None) -> int:
    c = dim if context_dim is None else context_dim
    return 2 * dim * dim + 2 * c * dim + 6 * dim


class BertFeedForward(PostLN):
  """Post-LN feed-forward block: LN(x + fc2(act(fc1(x)))); `act` defaults to the exact erf GELU."""

  hidden_dim: int
  act: str = 'gelu'

  @nn.compact
  def __call__(self, x, *, deterministic: bool = True):                         # x [B, T, D]
    d = x.shape[-1]
    h = dense(self.hidden_dim, ('embed', 'mlp'), use_bias=True, dtype=self.dtype, name='fc1')(x)  # [B, T, F]
    h = get_activation(self.act)(h)
    y = dense(d, ('mlp', 'embed'), use_bias=True, dtype=self.dtype, name='fc2')(h)                 # [B, T, D]
    return self.residual_norm(x, y, deterministic)                               # [B, T, D]

  @staticmethod
  def param_count(dim: int, hidden_dim: int) -> int:
    return 2 * dim * hidden_dim + hidden_dim + 3 * dim
