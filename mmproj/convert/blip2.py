"""BLIP-2 / InstructBLIP Q-Formers: transformers -> mmproj 'qformer' projector (and the stage-1 pretrainer).

Registered converters (`mmproj.convert.from_transformers(module)`), same inputs and outputs as the module:
  Blip2QFormerModel        -> qformer(learned_queries=False, vision_norm=False, language_projection=False)
      torch:  module(query_embeds=q, encoder_hidden_states=x, encoder_attention_mask=m).last_hidden_state
      mmproj: flax.apply({'params': p}, x, grid=(1, N), query_embeds=q, visual_mask=m)             [B, Q, D]
  InstructBlipQFormerModel -> the same with text_input=True (word/position embeddings, text feed-forwards)
      torch:  module(input_ids=ids, attention_mask=cat([ones(B, Q), text_mask], 1), query_embeds=q,
                     encoder_hidden_states=x, encoder_attention_mask=m).last_hidden_state[:, :Q]
      mmproj: flax.apply({'params': p}, x, grid=(1, N), query_embeds=q, text_ids=ids, text_mask=text_mask,
                         visual_mask=m)                                                              [B, Q, D]
  The bare Q-Formers do not own the query tokens or know their number: the converters take num_query_tokens
  (default 32, BLIP-2's). A Blip2QFormerModel built with use_qformer_text_input=True holds text feed-forwards
  that only run on text appended to query_embeds (with an explicit query_length); the port covers the query-only
  call and skips those weights.

Projector part of a full model (not registered: the full model's own function is image + text -> LM output):
  blip2_projector(Blip2Model | Blip2ForConditionalGeneration)
  instructblip_projector(InstructBlipModel | InstructBlipForConditionalGeneration)
      -> qformer(learned_queries=True, vision_norm=True, language_projection=True): query_tokens,
         ln_vision = vision_model.post_layernorm (BLIP-2's ln_vision, which HF folds into the vision tower), the
         Q-Former and language_projection. x is the vision tower's last encoder layer output *before*
         post_layernorm (`vision_model(pixel_values, output_hidden_states=True).hidden_states[-1]`, CLS first, so
         grid=(1, N)); the output is `get_image_features(pixel_values).pooler_output` [B, Q, Dt].
  blip2_pretrainer(Blip2ForImageTextRetrieval) -> (QFormerPretrainer, params), x as above: `itc_logits` /
      `itm_logits` are the module's logits_per_image without / with use_image_text_matching_head. The reference
      has no ITG head and no temperature: those keep the pretrainer's initialisation (seed 0; temp = 0.07).

Weight layout: Linear q/k/v [H*Dh, Din] -> kernel [Din, H, Dh]; attention output dense [D, H*Dh] -> o_proj kernel
[H, Dh, D]; LayerNorm weight/bias -> scale/bias.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmproj import projectors
from mmproj.convert.base import StateDict, activation, converter
from mmproj.projectors.qformer_losses import QFormerLMHead, QFormerPretrainer

_FULL_MODEL_IGNORE = ('vision_model.', 'language_model.')  # the towers around the projector (post_layernorm is taken)


def _attention(sd: StateDict, prefix: str, heads: int) -> dict:
  """HF Blip2QFormerAttention at `prefix` -> mmproj BertAttention params."""
  def proj(name):
    w = sd.kernel(f'{prefix}.attention.{name}')                          # [Din, H*Dh]
    dh = w.shape[1] // heads
    b = sd.take(f'{prefix}.attention.{name}.bias', (w.shape[1],))
    return {'kernel': w.reshape(w.shape[0], heads, dh), 'bias': b.reshape(heads, dh)}
  q = proj('query')
  d = q['kernel'].shape[0]
  o = sd.dense(f'{prefix}.output.dense')                                  # kernel [H*Dh, D]
  o['kernel'] = o['kernel'].reshape(heads, -1, d)
  return {'attention': {'q_proj': q, 'k_proj': proj('key'), 'v_proj': proj('value'), 'o_proj': o},
          'norm': sd.norm(f'{prefix}.output.LayerNorm')}


def _ffn(sd: StateDict, prefix: str, suffix: str) -> dict:
  """HF intermediate{suffix} / output{suffix} at `prefix` -> mmproj BertFeedForward params."""
  return {'fc1': sd.dense(f'{prefix}.intermediate{suffix}.dense'), 'fc2': sd.dense(f'{prefix}.output{suffix}.dense'),
          'norm': sd.norm(f'{prefix}.output{suffix}.LayerNorm')}


def _cross_attention_frequency(has_cross: list[bool]) -> int:
  """HF puts cross-attention in layers i with i % f == 0; recover f from which layers have it."""
  layers = [i for i, c in enumerate(has_cross) if c]
  n = len(has_cross)
  if not layers or layers[0] != 0:
    raise ValueError(f'Q-Former cross-attention layers {layers} do not start at layer 0')
  freq = n if len(layers) == 1 else layers[1] - layers[0]  # one cross layer: any f >= n is the same model
  if layers != list(range(0, n, freq)):
    raise ValueError(f'Q-Former cross-attention layers {layers} are not every f-th layer from 0')
  return freq


def qformer_config(qformer: Any) -> dict:
  """Hyper-parameters of an HF (InstructBlip|Blip2)QFormerModel read from its modules (also used by
  mmproj/convert/audio.py for Granite Speech's window Q-Former)."""
  layers = qformer.encoder.layer
  first = layers[0]
  return dict(
      hidden_dim=first.attention.attention.query.in_features,
      num_layers=len(layers),
      num_heads=first.attention.attention.num_attention_heads,
      mlp_dim=first.intermediate_query.dense.out_features,
      cross_attention_frequency=_cross_attention_frequency([bool(l.has_cross_attention) for l in layers]),
      act=activation(first.intermediate_query.intermediate_act_fn, 'Q-Former intermediate_act_fn (hidden_act)'),
      norm_eps=float(first.attention.output.LayerNorm.eps))


def qformer_params(sd: StateDict, prefix: str, num_layers: int, heads: int, embed_norm: str,
                   text: bool, embeddings: str | None = None) -> dict:
  """mmproj QFormer params from the HF Q-Former under `prefix` (e.g. 'qformer.').

  embed_norm: key prefix of the norm over [queries; text]; text: take the text feed-forwards; embeddings: key
  prefix of the word/position embeddings (None: no text embeddings)."""
  p = {'embed_norm': sd.norm(embed_norm)}
  if embeddings is not None:
    p['word_embeddings'] = {'embedding': sd.take(f'{embeddings}word_embeddings.weight')}
    p['position_embeddings'] = {'embedding': sd.take(f'{embeddings}position_embeddings.weight')}
  for i in range(num_layers):
    pre = f'{prefix}encoder.layer.{i}'
    layer = {'self_attention': _attention(sd, f'{pre}.attention', heads),
             'query_ffn': _ffn(sd, pre, '_query')}
    if f'{pre}.crossattention.attention.query.weight' in sd:
      layer['cross_attention'] = _attention(sd, f'{pre}.crossattention', heads)
    if text:
      layer['text_ffn'] = _ffn(sd, pre, '')
    p[f'layers_{i}'] = layer
  return p


def qformer_in_dim(qformer: Any) -> int:
  """Width of the tokens an HF Q-Former cross-attends to (its encoder_hidden_size)."""
  return qformer.encoder.layer[0].crossattention.attention.key.in_features


@converter('Blip2QFormerModel')
def blip2_qformer(module: Any, num_query_tokens: int = 32):
  """HF Blip2QFormerModel -> (qformer projector taking query_embeds, params); output [B, Q, D]."""
  cfg = dict(name='qformer', num_query_tokens=num_query_tokens, **qformer_config(module), vision_norm=False,
             learned_queries=False, language_projection=False, text_input=False)
  sd = StateDict.of(module)
  params = {'qformer': qformer_params(sd, '', cfg['num_layers'], cfg['num_heads'], 'layernorm', text=False)}
  # Text feed-forwards (use_qformer_text_input=True) only run on text tokens, which this port does not take.
  sd.finish(ignore=tuple(f'encoder.layer.{i}.{n}.' for i in range(cfg['num_layers'])
                         for n in ('intermediate', 'output')))
  return projectors.build(cfg, in_dim=qformer_in_dim(module), out_dim=cfg['hidden_dim']), params


@converter('InstructBlipQFormerModel')
def instructblip_qformer(module: Any, num_query_tokens: int = 32):
  """HF InstructBlipQFormerModel -> (instruction-aware qformer projector taking query_embeds, params)."""
  cfg = dict(name='qformer', num_query_tokens=num_query_tokens, **qformer_config(module), vision_norm=False,
             learned_queries=False, language_projection=False, text_input=True,
             vocab_size=module.embeddings.word_embeddings.num_embeddings,
             max_text_len=module.embeddings.position_embeddings.num_embeddings)
  sd = StateDict.of(module)
  params = {'qformer': qformer_params(sd, '', cfg['num_layers'], cfg['num_heads'], 'embeddings.layernorm',
                                       text=True, embeddings='embeddings.')}
  sd.finish()
  return projectors.build(cfg, in_dim=qformer_in_dim(module), out_dim=cfg['hidden_dim']), params


def _full_model_projector(model: Any, text_input: bool):
  qformer = model.qformer
  sd = StateDict.of(model)
  q, d = model.query_tokens.shape[1:]
  cfg = dict(name='qformer', num_query_tokens=int(q), **qformer_config(qformer), vision_norm=True,
             vision_norm_eps=float(model.vision_model.post_layernorm.eps), learned_queries=True,
             language_projection=True, text_input=text_input)
  if text_input:
    cfg.update(vocab_size=qformer.embeddings.word_embeddings.num_embeddings,
               max_text_len=qformer.embeddings.position_embeddings.num_embeddings)
    qparams = qformer_params(sd, 'qformer.', cfg['num_layers'], cfg['num_heads'], 'qformer.embeddings.layernorm',
                              text=True, embeddings='qformer.embeddings.')
  else:
    qparams = qformer_params(sd, 'qformer.', cfg['num_layers'], cfg['num_heads'], 'qformer.layernorm', text=False)
  params = {'query_tokens': sd.take('query_tokens', (1, q, d))[0], 'qformer': qparams,
            'ln_vision': sd.norm('vision_model.post_layernorm'), 'language_projection': sd.dense('language_projection')}
  ignore = _FULL_MODEL_IGNORE
  if not text_input:  # see blip2_qformer: text feed-forwards never run on the query-only path
    ignore += tuple(f'qformer.encoder.layer.{i}.{n}.' for i in range(cfg['num_layers'])
                    for n in ('intermediate', 'output'))
  sd.finish(ignore=ignore)
  in_dim = qformer_in_dim(qformer)
  out_dim = params['language_projection']['kernel'].shape[1]
  return projectors.build(cfg, in_dim=in_dim, out_dim=out_dim), params


def blip2_projector(model: Any):
  """Blip2Model / Blip2ForConditionalGeneration -> (qformer projector, params): ln_vision + Q-Former +
  language_projection; see the module docstring for the input x."""
  return _full_model_projector(model, text_input=False)


def instructblip_projector(model: Any):
  """InstructBlipModel / InstructBlipForConditionalGeneration -> (instruction-aware qformer projector, params);
  call with text_ids = qformer_input_ids, text_mask = qformer_attention_mask."""
  return _full_model_projector(model, text_input=True)


def blip2_pretrainer(model: Any):
  """Blip2ForImageTextRetrieval -> (QFormerPretrainer, params). ITG head and temperature are not in the
  reference and keep their initial values (PRNGKey(0))."""
  sd = StateDict.of(model)
  qcfg = qformer_config(model.qformer)
  q, d = model.query_tokens.shape[1:]
  module = QFormerPretrainer(
      in_dim=qformer_in_dim(model.qformer), num_query_tokens=int(q), **qcfg, vision_norm=True,
      vision_norm_eps=float(model.vision_model.post_layernorm.eps),
      vocab_size=model.embeddings.word_embeddings.num_embeddings,
      max_text_len=model.embeddings.position_embeddings.num_embeddings,
      embed_dim=model.vision_projection.out_features)
  # Not in the reference: the ITG head gets a fresh init (seed 0), the temperature its initial 0.07.
  lm_head = QFormerLMHead(module.act, module.norm_eps)
  lm_params = lm_head.init(jax.random.PRNGKey(0), jnp.zeros((1, 1, d)), jnp.zeros((module.vocab_size, d)))
  params = {'lm_head': jax.tree.map(np.asarray, nn.unbox(lm_params['params'])), 'temp': np.float32(0.07)}
  params.update({
      'query_tokens': sd.take('query_tokens', (1, q, d))[0],
      'ln_vision': sd.norm('vision_model.post_layernorm'),
      'qformer': qformer_params(sd, 'qformer.', qcfg['num_layers'], qcfg['num_heads'], 'qformer.layernorm',
                                 text=True, embeddings='embeddings.'),
      'vision_proj': sd.dense('vision_projection'), 'text_proj': sd.dense('text_projection'),
      'itm_head': sd.dense('itm_head')})
  sd.finish(ignore=('vision_model.',))
  return module, params
