"""Q-Former stage-1 pre-training — BLIP-2 (Li et al. 2023, arXiv:2301.12597, section 3.2): representation
learning from a frozen image encoder with three objectives sharing one Q-Former (mmproj.projectors.qformer):

  ITC  image-text contrastive: image feature = normalize(vision_proj(query outputs)) [B, Q, E] (queries alone);
       text feature = normalize(text_proj(text encoder [CLS])) [B, E] (text alone, bidirectional);
       sim(i, t) = max over the Q queries of <image_i,q, text_t>; symmetric cross-entropy over sim / temp
       (learned temperature, init 0.07, clipped to [0.001, 0.5]; label smoothing 0.1 as in LAVIS).
  ITM  image-text matching: queries + text in one pass, bidirectional mask (queries <-> text), queries
       cross-attend the image; itm_head (D -> 2) on every query output, averaged over queries. For each of the B
       positive pairs, one hard negative image per text and one hard negative text per image are mined from the ITC
       similarities (3B pairs, labels 1, 0, 0).
  ITG  image-grounded text generation: queries + text in one pass with the 'itg' mask (queries see only queries;
       text token t sees every query and text tokens <= t); a BERT LM head (dense, act, LayerNorm, decoder tied to
       the word embeddings + bias) predicts text token t + 1 from position t. The first text token can be replaced
       by a [DEC] token (dec_token_id), as BLIP-2 does.
  loss = ITC + ITM + ITG

  shapes:  x [B, N, Dv] visual tokens, text_ids / text_mask [B, T] -> scalars {'loss', 'itc', 'itm', 'itg'}
  params:  the Q-Former projector's (query_tokens, ln_vision, qformer with text embeddings and text FFNs; no
           language_projection) + vision_proj, text_proj (D*E + E each) + itm_head (2*D + 2)
           + lm_head (transform D*D + D, norm 2*D, bias vocab_size) + temp (1)

`QFormerPretrainer`'s 'query_tokens', 'ln_vision' and 'qformer' subtrees have the layout of the 'qformer'
projector's, so stage 2 starts from them: `stage2_params(pretrainer_params, projector_params)` (the projector's
language_projection stays as initialised; a projector without text_input simply has fewer qformer params).

Reference points (transformers Blip2ForImageTextRetrieval): `itc_logits` is its logits_per_image with
use_image_text_matching_head=False, `itm_logits` its logits_per_image with the ITM head; the reference has no
losses, no hard-negative mining, no temperature and no ITG / LM head (those follow LAVIS's blip2_qformer.py).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from mmproj.layers import LayerNorm, dense, get_activation, padding_mask
from mmproj.projectors.qformer import QFormerFields, qformer_mask

Dtype = Any

TEMP_RANGE = (0.001, 0.5)


def normalize(x, eps: float = 1e-12):
  """x / max(||x||, eps) over the last axis (torch.nn.functional.normalize)."""
  norm = jnp.linalg.norm(x.astype(jnp.float32), axis=-1, keepdims=True)
  return (x / jnp.maximum(norm, eps)).astype(x.dtype)


def itc_similarity(image_feats, text_feats):
  """image_feats [Bi, Q, E], text_feats [Bt, E] -> [Bi, Bt]: the best-matching query's similarity per pair."""
  sim = jnp.einsum('iqe,te->iqt', image_feats, text_feats, preferred_element_type=jnp.float32)  # [Bi, Q, Bt]
  return jnp.max(sim, axis=1)                                                                   # [Bi, Bt]


def _cross_entropy(logits, labels, label_smoothing: float = 0.0):
  """Per-row softmax cross-entropy with torch-style label smoothing: logits [..., K], int labels [...]."""
  k = logits.shape[-1]
  target = jax.nn.one_hot(labels, k) * (1.0 - label_smoothing) + label_smoothing / k
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), target)


def itc_loss(sim_i2t, label_smoothing: float = 0.1):
  """Symmetric InfoNCE on temperature-scaled similarities sim_i2t [B, B] (pair b matches b)."""
  labels = jnp.arange(sim_i2t.shape[0])
  i2t = _cross_entropy(sim_i2t, labels, label_smoothing).mean()
  t2i = _cross_entropy(sim_i2t.T, labels, label_smoothing).mean()
  return (i2t + t2i) / 2


def mine_hard_negatives(sim, rng=None):
  """sim [B, B] (row b: the anchor's similarity to every candidate, b's own match on the diagonal) -> int [B]:
  per row, the most similar non-matching candidate (argmax), or, with an rng, a sample from softmax(sim) over the
  non-matching candidates (LAVIS). No gradient flows through the choice."""
  b = sim.shape[0]
  if b < 2:
    raise ValueError('hard-negative mining needs a batch of at least 2 pairs')
  sim = jax.lax.stop_gradient(sim.astype(jnp.float32))
  sim = jnp.where(jnp.eye(b, dtype=bool), -jnp.inf, sim)                                        # [B, B]
  if rng is None:
    return jnp.argmax(sim, axis=-1)
  return jax.random.categorical(rng, sim, axis=-1)


def itm_loss(logits, labels):
  """logits [P, 2], labels int [P] (1 = match) -> mean cross-entropy."""
  return _cross_entropy(logits, labels).mean()


def itg_token_losses(logits, text_ids, label_smoothing: float = 0.1):
  """logits [B, T, V], text_ids [B, T] -> [B, T-1]: loss of predicting token t+1 at position t."""
  return _cross_entropy(logits[:, :-1], text_ids[:, 1:], label_smoothing)


def itg_loss(logits, text_ids, text_mask=None, label_smoothing: float = 0.1):
  """Mean next-token loss over the real (unpadded) targets."""
  losses = itg_token_losses(logits, text_ids, label_smoothing)                                 # [B, T-1]
  weights = jnp.ones_like(losses) if text_mask is None else text_mask[:, 1:].astype(jnp.float32)
  return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)


class QFormerLMHead(nn.Module):
  """BERT's LM prediction head (BertLMPredictionHead): transform (dense, act, LayerNorm), then a decoder tied to
  the word embeddings plus a vocabulary bias. h [B, T, D], embedding [V, D] -> logits [B, T, V] float32."""

  act: str = 'gelu'
  norm_eps: float = 1e-12
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h, embedding):
    d, v = embedding.shape[1], embedding.shape[0]
    h = dense(d, ('embed', 'mlp'), use_bias=True, dtype=self.dtype, name='transform')(h)      # [B, T, D]
    h = LayerNorm(self.norm_eps, self.dtype, name='norm')(get_activation(self.act)(h))
    bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros, ('vocab',)), (v,),
                      jnp.float32)                                            # [V]
    logits = jnp.einsum('btd,vd->btv', h, embedding.astype(self.dtype), preferred_element_type=jnp.float32)
    return logits + bias                                                      # [B, T, V]


class QFormerPretrainer(QFormerFields):
  """BLIP-2 stage 1: a Q-Former with ITC, ITM and ITG heads over frozen visual tokens x [B, N, Dv] (the Q-Former
  hyper-parameters are the projector's QFormerFields, keyword-only)."""

  in_dim: int
  embed_dim: int = 256           # ITC feature width (HF image_text_hidden_size)
  dec_token_id: int | None = None  # replaces text_ids[:, 0] for ITG ([DEC] in BLIP-2); None = ids as given
  label_smoothing: float = 0.1   # ITC and ITG (LAVIS)

  def setup(self):
    q, d = self.num_query_tokens, self.hidden_dim
    self.query_tokens = self.param(
        'query_tokens', nn.with_logical_partitioning(nn.initializers.normal(0.02), ('pos', 'embed')), (q, d),
        jnp.float32)                                                          # [Q, D]
    if self.vision_norm:
      self.ln_vision = LayerNorm(self.vision_norm_eps, self.dtype)
    self.qformer = self.qformer_body(self.vocab_size)
    self.vision_proj = dense(self.embed_dim, ('embed', 'mlp'), use_bias=True, dtype=self.dtype)
    self.text_proj = dense(self.embed_dim, ('embed', 'mlp'), use_bias=True, dtype=self.dtype)
    self.itm_head = dense(2, ('embed', None), use_bias=True, dtype=self.dtype)
    self.lm_head = QFormerLMHead(self.act, self.norm_eps, self.dtype)
    self.temp = self.param('temp', nn.with_logical_partitioning(nn.initializers.constant(0.07), ()), (),
                           jnp.float32)

  def _visual(self, x):
    if x.shape[-1] != self.in_dim:
      raise ValueError(f'Q-Former pretrainer expects in_dim={self.in_dim}, got tokens of width {x.shape[-1]}')
    return self.ln_vision(x) if self.vision_norm else x.astype(self.dtype)  # [B, N, Dv]

  def _queries(self, batch: int):
    q, d = self.num_query_tokens, self.hidden_dim
    return jnp.broadcast_to(self.query_tokens.astype(self.dtype)[None], (batch, q, d))  # [B, Q, D]

  def _joint(self, x, text_ids, text_mask, mode, visual_mask, deterministic):
    """Queries + text in one pass under `mode`'s mask -> (query outputs [B, Q, D], text outputs [B, T, D])."""
    text_mask = jnp.ones(text_ids.shape, jnp.int32) if text_mask is None else text_mask
    q = self.num_query_tokens
    h = self.qformer(self._queries(x.shape[0]), self._visual(x), text_ids=text_ids,
                     mask=qformer_mask(q, text_mask, mode), visual_mask=visual_mask,
                     deterministic=deterministic)                             # [B, Q+T, D]
    return h[:, :q], h[:, q:]

  def encode_image(self, x, visual_mask=None, deterministic: bool = True):
    """Queries alone over the image -> [B, Q, D] (the projector's Q-Former output)."""
    return self.qformer(self._queries(x.shape[0]), self._visual(x), visual_mask=visual_mask,
                        deterministic=deterministic)                          # [B, Q, D]

  def encode_text(self, text_ids, text_mask=None, deterministic: bool = True):
    """Text alone (bidirectional, padded keys masked) -> [B, T, D]."""
    mask = None if text_mask is None else padding_mask(text_mask, text_ids.shape[1])           # [B, T, T]
    return self.qformer(None, None, text_ids=text_ids, mask=mask, deterministic=deterministic)  # [B, T, D]

  def image_feats(self, x, visual_mask=None, deterministic: bool = True):
    return normalize(self.vision_proj(self.encode_image(x, visual_mask, deterministic)))       # [B, Q, E]

  def text_feats(self, text_ids, text_mask=None, deterministic: bool = True):
    return normalize(self.text_proj(self.encode_text(text_ids, text_mask, deterministic)[:, 0]))  # [B, E]

  def itc_logits(self, x, text_ids, text_mask=None, visual_mask=None, deterministic: bool = True):
    """Image-text similarity [Bi, Bt] before the temperature (HF logits_per_image, ITC mode)."""
    return itc_similarity(self.image_feats(x, visual_mask, deterministic),
                          self.text_feats(text_ids, text_mask, deterministic))                 # [Bi, Bt]

  def itm_logits(self, x, text_ids, text_mask=None, visual_mask=None, deterministic: bool = True):
    """Match / no-match logits [B, 2] for the pairs (x[b], text[b])."""
    queries, _ = self._joint(x, text_ids, text_mask, 'bidirectional', visual_mask, deterministic)
    return jnp.mean(self.itm_head(queries), axis=1)                           # [B, 2]

  def itg_logits(self, x, text_ids, text_mask=None, visual_mask=None, deterministic: bool = True):
    """Next-token logits [B, T, V] over the Q-Former vocabulary (position t predicts token t + 1)."""
    _, text = self._joint(x, text_ids, text_mask, 'itg', visual_mask, deterministic)          # [B, T, D]
    return self.lm_head(text, self.qformer.word_embeddings.embedding)         # [B, T, V]  tied decoder

  def __call__(self, x, text_ids, text_mask=None, *, visual_mask=None, deterministic: bool = True,
               negatives_rng=None):
    """Stage-1 losses for B matching pairs (x[b], text[b]): {'loss', 'itc', 'itm', 'itg'} (float32 scalars).

    negatives_rng: None mines the hardest negatives (argmax); a key samples them from softmax(sim / temp)."""
    b = x.shape[0]
    x, text_ids = jnp.asarray(x), jnp.asarray(text_ids)  # indexed by traced negatives below
    text_mask = jnp.ones(text_ids.shape, jnp.int32) if text_mask is None else jnp.asarray(text_mask)
    visual_mask = None if visual_mask is None else jnp.asarray(visual_mask)
    temp = jnp.clip(self.temp, *TEMP_RANGE)
    sim = self.itc_logits(x, text_ids, text_mask, visual_mask, deterministic) / temp          # [B, B]
    loss_itc = itc_loss(sim, self.label_smoothing)

    rngs = (None, None) if negatives_rng is None else tuple(jax.random.split(negatives_rng))
    neg_image = mine_hard_negatives(sim.T, rngs[0])                           # [B] an image for each text
    neg_text = mine_hard_negatives(sim, rngs[1])                              # [B] a text for each image
    both = lambda a, idx: None if a is None else jnp.concatenate([a, a[idx], a], axis=0)
    x_all = both(x, neg_image)                                                # [3B, N, Dv]
    vmask_all = both(visual_mask, neg_image)                                  # [3B, N]
    ids_all = jnp.concatenate([text_ids, text_ids, text_ids[neg_text]], axis=0)               # [3B, T]
    tmask_all = jnp.concatenate([text_mask, text_mask, text_mask[neg_text]], axis=0)          # [3B, T]
    logits = self.itm_logits(x_all, ids_all, tmask_all, vmask_all, deterministic)             # [3B, 2]
    labels = jnp.concatenate([jnp.ones(b, jnp.int32), jnp.zeros(2 * b, jnp.int32)])
    loss_itm = itm_loss(logits, labels)

    dec_ids = text_ids if self.dec_token_id is None else text_ids.at[:, 0].set(self.dec_token_id)
    lm_logits = self.itg_logits(x, dec_ids, text_mask, visual_mask, deterministic)            # [B, T, V]
    loss_itg = itg_loss(lm_logits, dec_ids, text_mask, self.label_smoothing)
    return {'loss': loss_itc + loss_itm + loss_itg, 'itc': loss_itc, 'itm': loss_itm, 'itg': loss_itg}


def stage2_params(pretrainer_params, projector_params):
  """The 'qformer' projector's params with every leaf the stage-1 pretrainer also has (same path) taken from it:
  query_tokens, ln_vision and the Q-Former body; language_projection (absent in stage 1) is kept."""
  src = traverse_util.flatten_dict(nn.unbox(pretrainer_params))
  dst = traverse_util.flatten_dict(nn.unbox(projector_params))
  for path, value in dst.items():
    if path in src:
      if src[path].shape != value.shape:
        raise ValueError(f'stage-1 param {"/".join(path)} has shape {src[path].shape}, the projector needs '
                         f'{value.shape}')
      dst[path] = src[path]
  return traverse_util.unflatten_dict(dst)
