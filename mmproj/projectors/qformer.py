"""Q-Former projector — BLIP-2 (Li, Li, Savarese, Hoi 2023, "BLIP-2: Bootstrapping Language-Image Pre-training
with Frozen Image Encoders and Large Language Models", arXiv:2301.12597), with the instruction-aware variant of
InstructBLIP (Dai et al. 2023, "InstructBLIP: Towards General-purpose Vision-Language Models with Instruction
Tuning", arXiv:2305.06500).

A small BERT (post-LN) whose inputs are Q learned query tokens (and, instruction-aware, the instruction's text
tokens). Queries and text share self-attention; only the queries cross-attend to the visual tokens, every
`cross_attention_frequency`-th layer (layers 0, f, 2f, ...); queries and text have separate feed-forwards. The
query outputs, mapped to the LM width, are the visual tokens the LM reads:

  x [B, N, Dv] --ln_vision (LayerNorm, BLIP-2's trainable norm on the frozen ViT's output)--> v [B, N, Dv]
  query_tokens [Q, D] (learned)          text_ids [B, T] --word + position embeddings--> [B, T, D]
        └──────────────── concat [B, Q+T, D] ──────────────────┘    (T = 0 unless text_input)
                                  │ embed_norm (LayerNorm) + dropout
  layer i = 0 .. L-1:  h = PostLN(h + SelfAttn(h))                    [B, Q+T, D]  queries <-> text, padding mask
                       q = h[:, :Q];  t = h[:, Q:]
                       q = PostLN(q + CrossAttn(q, v))  if i % f == 0  [B, Q, D]    queries only
                       q = PostLN(q + FFN_query(q));  t = PostLN(t + FFN_text(t));  h = [q; t]
  y = language_projection(h[:, :Q])                                   [B, Q, Dt]

  tokens in -> out:  N -> M = num_query_tokens (Q), whatever the grid
  params:            with D = hidden_dim, F = mlp_dim, L = num_layers, C = ceil(L / f) cross-attention layers,
                     Q = num_query_tokens, Dv = in_dim, Dt = out_dim
                       Q*D                                (query_tokens; 0 when learned_queries=False)
                     + 2*Dv                               (ln_vision; 0 when vision_norm=False)
                     + 2*D                                (embed_norm)
                     + L * (4*D^2 + 6*D)                  (self-attention: q, k, v, o + biases, LayerNorm)
                     + C * (2*D^2 + 2*Dv*D + 6*D)         (cross-attention: q, o from D; k, v from Dv)
                     + L * (2*D*F + F + 3*D)              (query feed-forward)
                     + [text_input] (vocab_size + max_text_len)*D + L * (2*D*F + F + 3*D)   (text embeddings, FFN)
                     + D*Dt + Dt                          (language_projection; 0 when language_projection=False)
  spatial locality:  not kept — every query cross-attends to all N visual tokens, and the Q-Former adds no position
                     information of its own (any position comes from the encoder's tokens)
  shapes:            x [B, N, Dv], text_ids/text_mask [B, T], visual_mask [B, N] -> y [B, Q, Dt]

Instruction-aware (text_input=True, InstructBLIP): `proj(x, grid=..., text_ids=..., text_mask=...)`; the
instruction tokens join the queries' self-attention (bidirectional, padded text keys masked), so the extracted
visual tokens depend on the instruction; the text outputs are dropped. `extra_inputs()` names these inputs for
the model to wire. With text_input=True and no text_ids the queries run alone (an empty instruction). The last
layer's text feed-forward has no effect on y (its text outputs are dropped), as in InstructBLIP; it is kept so
the params match HF and the stage-1 pretrainer.

Ports of the bare transformers Q-Formers (mmproj/convert/blip2.py) use learned_queries=False (the caller passes
`query_embeds` [B, Q, D], as to HF Blip2QFormerModel), vision_norm=False and language_projection=False
(out_dim = hidden_dim). Stage-1 pre-training (ITC / ITM / ITG) is in mmproj/projectors/qformer_losses.py, whose
'ln_vision', 'query_tokens' and 'qformer' params have this projector's layout.

Param tree: query_tokens [Q, D] ('pos', 'embed'); ln_vision; qformer/{word_embeddings, position_embeddings,
embed_norm, layers_{i}/{self_attention, cross_attention, query_ffn, text_ffn}}; language_projection.
The layers are `mmproj.layers.BertAttention` / `BertFeedForward`; dropout is the hidden dropout of BERT
(after o_proj, fc2 and embed_norm), applied when deterministic=False.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mmproj.layers import ACTIVATIONS, BertAttention, BertFeedForward, LayerNorm, dense, padding_mask
from mmproj.layers.bert import PostLN
from mmproj.layers.token_grid import check_tokens
from mmproj.projectors.registry import check_choice, check_int, check_positive, register

Dtype = Any

MASK_MODES = ('bidirectional', 'itg')


def qformer_mask(num_queries: int, text_mask, mode: str = 'bidirectional'):
  """Self-attention mask over [queries; text] -> bool [B, Q+T, Q+T] (True = row may attend column).

  text_mask [B, T] (nonzero = real token); queries are always valid keys.
    'bidirectional': every position sees every valid position (InstructBLIP, ITM, ITC's text encoder).
    'itg' (image-grounded generation): queries see only queries; text token t sees all queries and the valid
      text tokens s <= t (causal), so the text must be generated from what the queries extracted.
  """
  if mode not in MASK_MODES:
    raise ValueError(f'unknown Q-Former mask mode {mode!r}; expected one of {MASK_MODES}')
  b, t = text_mask.shape
  keys = jnp.concatenate([jnp.ones((b, num_queries), bool), text_mask.astype(bool)], axis=1)   # [B, L]
  mask = padding_mask(keys, num_queries + t)                                                  # [B, L, L]
  if mode == 'itg':
    pos = jnp.arange(num_queries + t)
    row, col = pos[:, None], pos[None, :]
    allowed = (col < num_queries) | ((row >= num_queries) & (col <= row))                     # [L, L]
    mask = mask & allowed[None]
  return mask


class QFormerLayer(PostLN):
  """One Q-Former layer: shared self-attention, queries-only cross-attention, split feed-forwards (the blocks get
  its keyword-only norm_eps / dropout / dtype)."""

  num_heads: int
  mlp_dim: int
  cross_attention: bool
  text_ffn: bool
  act: str = 'gelu'

  @nn.compact
  def __call__(self, h, visual, *, num_queries: int, mask=None, visual_mask=None, deterministic: bool = True):
    """h [B, Q+T, D]; visual [B, N, Dv] (may be None when Q == 0); mask bool [B, Q+T, Q+T]; visual_mask [B, N]."""
    post_ln = dict(norm_eps=self.norm_eps, dropout=self.dropout, dtype=self.dtype)
    attn = dict(num_heads=self.num_heads, **post_ln)
    ffn = dict(hidden_dim=self.mlp_dim, act=self.act, **post_ln)
    h = BertAttention(**attn, name='self_attention')(h, mask=mask, deterministic=deterministic)  # [B, Q+T, D]
    q, t = h[:, :num_queries], h[:, num_queries:]                             # [B, Q, D], [B, T, D]
    if self.cross_attention and num_queries:  # HF skips cross-attention in text-only passes (query_length 0)
      if visual is None:
        raise ValueError('a Q-Former cross-attention layer needs the visual tokens')
      cross_mask = None if visual_mask is None else padding_mask(visual_mask, num_queries)     # [B, Q, N]
      q = BertAttention(**attn, name='cross_attention')(q, visual, mask=cross_mask,
                                                        deterministic=deterministic)          # [B, Q, D]
    # Both feed-forwards always run (on empty slices when Q or T is 0), so init creates every parameter.
    q = BertFeedForward(**ffn, name='query_ffn')(q, deterministic=deterministic)              # [B, Q, D]
    if self.text_ffn:
      t = BertFeedForward(**ffn, name='text_ffn')(t, deterministic=deterministic)             # [B, T, D]
    elif t.shape[1]:
      raise ValueError('text tokens reached a Q-Former built without text input (text_input=False)')
    return jnp.concatenate([q, t], axis=1)                                    # [B, Q+T, D]


class QFormer(PostLN):
  """The Q-Former body (HF Blip2QFormerModel / InstructBlipQFormerModel): [queries; text] -> hidden [B, Q+T, D].

  vocab_size > 0 adds the BERT text embeddings (word + learned absolute position, positions 0..T-1) and the text
  feed-forwards; text is then accepted with or without queries (queries=None: the text-only encoder of ITC).
  norm_eps / dropout / dtype are keyword-only (PostLN).
  """

  hidden_dim: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  cross_attention_frequency: int = 2
  act: str = 'gelu'
  vocab_size: int = 0
  max_text_len: int = 512

  def setup(self):
    if self.vocab_size:
      self.word_embeddings = nn.Embed(
          self.vocab_size, self.hidden_dim, dtype=self.dtype, param_dtype=jnp.float32,
          embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ('vocab', 'embed')))
      self.position_embeddings = nn.Embed(
          self.max_text_len, self.hidden_dim, dtype=self.dtype, param_dtype=jnp.float32,
          embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ('pos', 'embed')))
    self.embed_norm = LayerNorm(self.norm_eps, self.dtype)
    self.embed_dropout = nn.Dropout(self.dropout)
    self.layers = [
        QFormerLayer(self.num_heads, self.mlp_dim, cross_attention=i % self.cross_attention_frequency == 0,
                     text_ffn=bool(self.vocab_size), act=self.act, norm_eps=self.norm_eps, dropout=self.dropout,
                     dtype=self.dtype)
        for i in range(self.num_layers)]

  def embed_text(self, text_ids):
    """text_ids int [B, T] -> word + position embeddings [B, T, D] (no norm: it is applied with the queries)."""
    t = text_ids.shape[1]
    if t > self.max_text_len:
      raise ValueError(f'{t} text tokens exceed the Q-Former max_text_len={self.max_text_len}')
    return self.word_embeddings(text_ids) + self.position_embeddings(jnp.arange(t))[None]   # [B, T, D]

  def __call__(self, queries, visual=None, *, text_ids=None, mask=None, visual_mask=None,
               deterministic: bool = True):
    """queries [B, Q, D] or None; visual [B, N, Dv] (needed when there are queries); text_ids int [B, T] or None;
    mask bool [B, Q+T, Q+T] or None (all see all); visual_mask [B, N] (nonzero = real) or None -> [B, Q+T, D]."""
    if queries is None and text_ids is None:
      raise ValueError('the Q-Former needs queries, text_ids or both')
    parts = [] if queries is None else [queries.astype(self.dtype)]
    if self.vocab_size:
      if text_ids is None:  # an empty instruction: keeps the text parameters in the tree at init
        text_ids = jnp.zeros((queries.shape[0], 0), jnp.int32)
      parts.append(self.embed_text(text_ids))                                 # [B, T, D]
    elif text_ids is not None:
      raise ValueError('text_ids given to a Q-Former without text embeddings (vocab_size=0 / text_input=False)')
    num_queries = 0 if queries is None else queries.shape[1]
    h = jnp.concatenate(parts, axis=1)                                        # [B, Q+T, D]
    h = self.embed_dropout(self.embed_norm(h), deterministic=deterministic)
    for layer in self.layers:
      h = layer(h, visual, num_queries=num_queries, mask=mask, visual_mask=visual_mask,
                deterministic=deterministic)                                  # [B, Q+T, D]
    return h

  @staticmethod
  def param_count(in_dim: int, hidden_dim: int, num_layers: int, mlp_dim: int, cross_attention_frequency: int,
                  vocab_size: int = 0, max_text_len: int = 512) -> int:
    """The Q-Former body's share of the module docstring's formula (no queries, ln_vision or projection)."""
    d, f, num_layers = hidden_dim, mlp_dim, num_layers
    cross_layers = -(-num_layers // cross_attention_frequency)
    ffns = 2 if vocab_size else 1
    n = 2 * d + num_layers * (BertAttention.param_count(d) + ffns * BertFeedForward.param_count(d, f))
    n += cross_layers * BertAttention.param_count(d, in_dim)
    if vocab_size:
      n += (vocab_size + max_text_len) * d
    return n


class QFormerFields(nn.Module, kw_only=True):
  """Keyword-only Q-Former hyper-parameters shared by the 'qformer' projector and the stage-1 pretrainer."""

  num_query_tokens: int = 32
  hidden_dim: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  cross_attention_frequency: int = 2
  act: str = 'gelu'              # a key of mmproj.layers.ACTIVATIONS (HF hidden_act)
  norm_eps: float = 1e-12        # the Q-Former's LayerNorms (HF layer_norm_eps)
  dropout: float = 0.0           # BERT hidden dropout (BLIP-2 trains with 0.1)
  vision_norm: bool = True       # ln_vision on the visual tokens (HF: Blip2VisionModel.post_layernorm)
  vision_norm_eps: float = 1e-5
  vocab_size: int = 30522        # text embeddings (the projector's only with text_input)
  max_text_len: int = 512
  dtype: Dtype = jnp.float32

  @nn.nowrap
  def qformer_body(self, vocab_size: int, **kwargs) -> QFormer:
    """The QFormer these fields describe (vocab_size 0: no text embeddings); kwargs such as name go to it."""
    return QFormer(self.hidden_dim, self.num_layers, self.num_heads, self.mlp_dim, self.cross_attention_frequency,
                   self.act, vocab_size=vocab_size, max_text_len=self.max_text_len, norm_eps=self.norm_eps,
                   dropout=self.dropout, dtype=self.dtype, **kwargs)


@register('qformer')
class QFormerProjector(QFormerFields):
  """BLIP-2 Q-Former + language projection: [B, N, Dv] -> [B, num_query_tokens, Dt] (fields: QFormerFields too)."""

  in_dim: int
  out_dim: int
  text_input: bool = False       # InstructBLIP's instruction-aware Q-Former (takes text_ids / text_mask)
  learned_queries: bool = True   # False: queries come from the caller as query_embeds (bare HF Q-Former ports)
  language_projection: bool = True  # False: out_dim must equal hidden_dim (the Q-Former's own outputs)

  @nn.compact
  def __call__(self, x, *, grid=None, deterministic: bool = True, visual_mask=None, text_ids=None, text_mask=None,
               query_embeds=None):
    """x [B, N, Dv]; visual_mask [B, N] (nonzero = real token); text_ids / text_mask [B, T] (text_input only);
    query_embeds [B, Q, D] (learned_queries=False only) -> [B, Q, Dt]."""
    b, n, dv = x.shape
    q, d = self.num_query_tokens, self.hidden_dim
    if dv != self.in_dim:
      raise ValueError(f'qformer projector expects in_dim={self.in_dim}, got tokens of width {dv}')
    check_tokens(x, grid, 'qformer projector', frames=True)   # the queries read any token set: (h, w), (T,), frames
    if not self.language_projection and self.out_dim != d:
      raise ValueError(f'model.projector.language_projection=False needs out_dim == hidden_dim ({d}), '
                       f'got out_dim={self.out_dim}')
    if self.vision_norm:
      x = LayerNorm(self.vision_norm_eps, self.dtype, name='ln_vision')(x)   # [B, N, Dv]
    if self.learned_queries:
      if query_embeds is not None:
        raise ValueError('query_embeds given to a qformer projector with learned_queries=True')
      table = self.param('query_tokens', nn.with_logical_partitioning(nn.initializers.normal(0.02), ('pos', 'embed')),
                         (q, d), jnp.float32)                                 # [Q, D]
      queries = jnp.broadcast_to(table.astype(self.dtype)[None], (b, q, d))  # [B, Q, D]
    else:
      if query_embeds is None or query_embeds.shape != (b, q, d):
        got = None if query_embeds is None else query_embeds.shape
        raise ValueError(f'qformer projector with learned_queries=False needs query_embeds of shape {(b, q, d)} '
                         f'(model.projector.num_query_tokens={q}), got {got}')
      queries = query_embeds                                                  # [B, Q, D]
    mask = None
    if text_ids is not None:
      if not self.text_input:
        raise ValueError('text_ids given to a qformer projector with model.projector.text_input=False')
      text_mask = jnp.ones(text_ids.shape, jnp.int32) if text_mask is None else text_mask
      mask = qformer_mask(q, text_mask)                                       # [B, Q+T, Q+T]
    h = self.qformer_body(self.vocab_size if self.text_input else 0, name='qformer')(
        queries, x, text_ids=text_ids, mask=mask, visual_mask=visual_mask, deterministic=deterministic)  # [B, Q+T, D]
    y = h[:, :q]                                                              # [B, Q, D]  text outputs dropped
    if self.language_projection:
      y = dense(self.out_dim, ('embed', 'mlp'), use_bias=True, dtype=self.dtype, name='language_projection')(y)
    return y                                                                  # [B, Q, Dt]

  @nn.nowrap
  def extra_inputs(self) -> tuple[str, ...]:
    """Keyword inputs beyond x the model must pass: the instruction's Q-Former tokens when text_input."""
    return ('text_ids', 'text_mask') if self.text_input else ()

  @nn.nowrap
  def check(self) -> None:
    for key in ('num_query_tokens', 'hidden_dim', 'num_layers', 'num_heads', 'mlp_dim', 'cross_attention_frequency',
                'vocab_size', 'max_text_len'):
      check_int(key, getattr(self, key))
    if self.hidden_dim % self.num_heads:
      raise ValueError(f'model.projector.hidden_dim={self.hidden_dim} is not divisible by '
                       f'model.projector.num_heads={self.num_heads}')
    check_choice('act', self.act, ACTIVATIONS)
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f'model.projector.dropout must be in [0, 1), got {self.dropout!r}')
    check_positive('norm_eps', self.norm_eps)
    check_positive('vision_norm_eps', self.vision_norm_eps)
    if not self.language_projection and self.out_dim != self.hidden_dim:
      raise ValueError(f'model.projector.language_projection=False needs out_dim == hidden_dim, got '
                       f'out_dim={self.out_dim}, hidden_dim={self.hidden_dim}')

  @nn.nowrap
  def num_output_tokens(self, grid) -> int:
    return self.num_query_tokens

  @nn.nowrap
  def param_count(self) -> int:
    d = self.hidden_dim
    n = QFormer.param_count(self.in_dim, d, self.num_layers, self.mlp_dim, self.cross_attention_frequency,
                            self.vocab_size if self.text_input else 0, self.max_text_len)
    n += self.num_query_tokens * d if self.learned_queries else 0
    n += 2 * self.in_dim if self.vision_norm else 0
    n += d * self.out_dim + self.out_dim if self.language_projection else 0
    return n
