"""BLIP-2 Q-Former projector and its stage-1 losses: parity with transformers (Blip2QFormerModel,
InstructBlipQFormerModel, Blip2ForConditionalGeneration / InstructBlipForConditionalGeneration image features,
Blip2ForImageTextRetrieval ITC / ITM heads), shapes, gradients, parameter count, config errors, ITC / ITM / ITG."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from parity_utils import assert_close, randomize_, seeded, to_torch

from mmproj import convert, projectors
from mmproj.convert import blip2
from mmproj.projectors.qformer import qformer_mask
from mmproj.projectors.qformer_losses import QFormerPretrainer, mine_hard_negatives, stage2_params

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

# Odd sizes everywhere: width 18 = 2 heads x 9, encoder width 13, MLP 37, 5 queries, 7 visual tokens, 3 layers
# with cross-attention every 2nd (layers 0 and 2).
QF = dict(hidden_size=18, num_hidden_layers=3, num_attention_heads=2, intermediate_size=37, encoder_hidden_size=13,
          cross_attention_frequency=2, vocab_size=50, max_position_embeddings=20)
TINY = dict(name='qformer', num_query_tokens=5, hidden_dim=18, num_layers=3, num_heads=2, mlp_dim=37,
            cross_attention_frequency=2)


def _inputs(rng, b=2, n=7, dv=13, t=6, vocab=50):
  x = rng.normal(size=(b, n, dv)).astype(np.float32)
  visual_mask = np.ones((b, n), np.int64)
  visual_mask[1, n - 3:] = 0                          # padded visual tokens in one row
  ids = rng.integers(1, vocab, size=(b, t))
  text_mask = np.ones((b, t), np.int64)
  text_mask[0, t // 2:] = 0                           # right-padded instruction in one row
  return x, visual_mask, ids, text_mask


def _params(module, *args, **kwargs):
  """Initial params (jit: one compile instead of one per primitive)."""
  init = jax.jit(lambda key, *a: module.init(key, *a, **kwargs))
  return nn.unbox(init(jax.random.PRNGKey(0), *args)['params'])


def _jit_apply(module, grid=None, method=None):
  """module.apply as one jitted function of (params, *args, **arrays): one compile per input shape instead of one
  per primitive (the eager default), which keeps this file fast."""
  static = {} if grid is None else {'grid': grid}
  fn = jax.jit(lambda p, args, arrays: module.apply({'params': p}, *args, method=method, **static, **arrays))
  return lambda params, *args, **arrays: fn(params, args, arrays)


def _count(params) -> int:
  return sum(int(np.size(a)) for a in jax.tree.leaves(params))


# ---------------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize('freq,text_ffn,num_queries', [(2, False, 5), (1, True, 32)])
def test_blip2_qformer_parity(freq, text_ffn, num_queries):
  from transformers import Blip2QFormerConfig, Blip2QFormerModel
  rng = seeded(0)
  hf = randomize_(Blip2QFormerModel(Blip2QFormerConfig(**dict(QF, cross_attention_frequency=freq),
                                                       use_qformer_text_input=text_ffn)))
  x, vmask, _, _ = _inputs(rng)
  q = rng.normal(size=(2, num_queries, 18)).astype(np.float32)
  # 32 queries is the registered converter's default; other counts go through the converter function.
  module, params = (convert.from_transformers(hf) if num_queries == 32 else
                    blip2.blip2_qformer(hf, num_query_tokens=num_queries))
  y = _jit_apply(module, grid=(1, 7))(params, x, query_embeds=q, visual_mask=vmask)
  with torch.no_grad():
    ref = hf(query_embeds=to_torch(q), encoder_hidden_states=to_torch(x),
             encoder_attention_mask=to_torch(vmask)).last_hidden_state
  assert_close(y, ref)


def test_instructblip_qformer_parity():
  from transformers import InstructBlipQFormerConfig
  from transformers.models.instructblip.modeling_instructblip import InstructBlipQFormerModel
  rng = seeded(1)
  hf = randomize_(InstructBlipQFormerModel(InstructBlipQFormerConfig(**QF)))
  x, vmask, ids, tmask = _inputs(rng, t=5)
  q = rng.normal(size=(2, 5, 18)).astype(np.float32)
  module, params = blip2.instructblip_qformer(hf, num_query_tokens=5)
  y = _jit_apply(module, grid=(1, 7))(params, x, query_embeds=q, visual_mask=vmask, text_ids=ids, text_mask=tmask)
  with torch.no_grad():
    ref = hf(input_ids=to_torch(ids), attention_mask=to_torch(np.concatenate([np.ones((2, 5), np.int64), tmask], 1)),
             query_embeds=to_torch(q), encoder_hidden_states=to_torch(x),
             encoder_attention_mask=to_torch(vmask)).last_hidden_state
  assert_close(y, ref[:, :5])                         # the projector keeps the query outputs


def _tiny_vision(cls):
  return cls(hidden_size=13, intermediate_size=20, num_hidden_layers=1, num_attention_heads=1, image_size=8,
             patch_size=4).to_dict()                  # 4 patches + CLS = 5 visual tokens


def _tiny_opt():
  from transformers import OPTConfig
  return OPTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, ffn_dim=32, vocab_size=64,
                   word_embed_proj_dim=16).to_dict()


def _pre_norm_features(vision_model, pixels):
  """The vision tower's last layer output before post_layernorm (which the port applies as ln_vision)."""
  with torch.no_grad():
    return vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[-1].numpy()


@pytest.mark.parametrize('family', ['blip2', 'instructblip'])
def test_full_projector_parity(family):
  """ln_vision + query tokens + Q-Former + language_projection == HF get_image_features(...).pooler_output."""
  from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2VisionConfig, InstructBlipConfig,
                            InstructBlipForConditionalGeneration, InstructBlipVisionConfig)
  rng = seeded(2)
  pixels = to_torch(rng.normal(size=(2, 3, 8, 8)).astype(np.float32))
  _, _, ids, tmask = _inputs(rng, t=5)
  if family == 'blip2':
    hf = randomize_(Blip2ForConditionalGeneration(Blip2Config(
        vision_config=_tiny_vision(Blip2VisionConfig), qformer_config=QF, text_config=_tiny_opt(),
        num_query_tokens=5)))
    module, params = blip2.blip2_projector(hf)
    extra = {}
    with torch.no_grad():
      ref = hf.get_image_features(pixel_values=pixels).pooler_output
  else:
    hf = randomize_(InstructBlipForConditionalGeneration(InstructBlipConfig(
        vision_config=_tiny_vision(InstructBlipVisionConfig), qformer_config=QF, text_config=_tiny_opt(),
        num_query_tokens=5)))
    module, params = blip2.instructblip_projector(hf)
    extra = dict(text_ids=ids, text_mask=tmask)
    with torch.no_grad():
      ref = hf.get_image_features(pixel_values=pixels, qformer_input_ids=to_torch(ids),
                                  qformer_attention_mask=to_torch(tmask)).pooler_output
  x = _pre_norm_features(hf.vision_model, pixels)     # [2, 5, 13]: CLS + 2x2 patches, so grid (1, 5)
  y = _jit_apply(module, grid=(1, 5))(params, x, **extra)
  assert_close(y, ref)
  assert y.shape == (2, projectors.num_output_tokens(dict(name='qformer', num_query_tokens=5), (1, 5)), 16)


def test_retrieval_heads_parity():
  """Stage-1 ITC similarity and ITM logits == Blip2ForImageTextRetrieval's logits_per_image."""
  from transformers import Blip2Config, Blip2ForImageTextRetrieval, Blip2VisionConfig
  rng = seeded(3)
  hf = randomize_(Blip2ForImageTextRetrieval(Blip2Config(
      vision_config=_tiny_vision(Blip2VisionConfig), qformer_config=dict(QF, use_qformer_text_input=True),
      text_config=_tiny_opt(), num_query_tokens=5, image_text_hidden_size=8)))
  module, params = blip2.blip2_pretrainer(hf)
  pixels = to_torch(rng.normal(size=(3, 3, 8, 8)).astype(np.float32))
  _, _, ids, tmask = _inputs(rng, b=3, t=5)
  x = _pre_norm_features(hf.vision_model, pixels)
  for itm in (True, False):
    with torch.no_grad():
      ref = hf(pixel_values=pixels, input_ids=to_torch(ids), attention_mask=to_torch(tmask),
               use_image_text_matching_head=itm).logits_per_image
    method = module.itm_logits if itm else module.itc_logits
    assert_close(_jit_apply(module, method=method)(params, x, ids, tmask), ref,
                 what='ITM logits' if itm else 'ITC similarity')


# --------------------------------------------------------------------------------------------- the projector


# Projector configs for the shape / gradient / count tests; the compiled functions are shared with the
# behaviour tests below (one compile per config for the whole file).
CONFIGS = {
    'blip2': dict(TINY, num_layers=2),
    'instruct': dict(TINY, text_input=True, vocab_size=50, max_text_len=20, cross_attention_frequency=3,
                     num_layers=2),
    'bare': dict(TINY, vision_norm=False, learned_queries=False, language_projection=False, num_layers=1),
}


@functools.cache
def _projector(kind):
  """(cfg, module, initial params, out_dim, jitted (params, x, arrays) -> ((sum y^2, y), (d/dparams, d/dx)))."""
  cfg = CONFIGS[kind]
  out_dim = 11 if cfg.get('language_projection', True) else 18
  module = projectors.build(cfg, in_dim=13, out_dim=out_dim)
  arrays = _projector_arrays(kind, seeded(4))
  params = _params(module, arrays.pop('x'), grid=(1, 7), **arrays)

  def loss(p, x, arrays):
    y = module.apply({'params': p}, x, grid=(1, 7), **arrays)
    return jnp.sum(jnp.square(y)), y
  return cfg, module, params, out_dim, jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


def _projector_arrays(kind, rng):
  x, vmask, ids, tmask = _inputs(rng)
  arrays = dict(x=x, visual_mask=vmask)
  if CONFIGS[kind].get('text_input'):
    arrays.update(text_ids=ids, text_mask=tmask)
  if not CONFIGS[kind].get('learned_queries', True):
    arrays['query_embeds'] = rng.normal(size=(2, 5, 18)).astype(np.float32)
  return arrays


@pytest.mark.parametrize('kind', sorted(CONFIGS))
def test_shapes_grads_and_param_count(kind):
  cfg, _, params, out_dim, fn = _projector(kind)
  assert _count(params) == projectors.param_count(cfg, 13, out_dim)
  arrays = _projector_arrays(kind, seeded(4))
  x = arrays.pop('x')
  (_, y), (gp, gx) = fn(params, x, arrays)
  assert y.shape == (2, projectors.num_output_tokens(cfg, (1, 7)), out_dim)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves((gp, gx)))
  # Every parameter is used, except the last layer's text feed-forward: its outputs are dropped (as in HF).
  dead = f'layers_{cfg["num_layers"] - 1}/text_ffn'
  grads = traverse_util.flatten_dict(gp, sep='/')
  assert all(float(jnp.max(jnp.abs(g))) > 0 for k, g in grads.items() if not k.startswith(f'qformer/{dead}'))
  assert float(jnp.max(jnp.abs(gx[0]))) > 0
  assert np.all(np.asarray(gx)[1, -3:] == 0)          # masked visual tokens get no gradient


def test_default_config_matches_blip2():
  cfg = dict(name='qformer')
  assert projectors.num_output_tokens(cfg, (16, 16)) == 32
  # BLIP-2 (ViT-g, width 1408 -> OPT-2.7b, width 2560): 12 layers, cross-attention in 6, 32 queries.
  d, f = 768, 3072
  expected = (32 * d + 2 * 1408 + 2 * d + 12 * (4 * d * d + 6 * d) + 6 * (2 * d * d + 2 * 1408 * d + 6 * d)
              + 12 * (2 * d * f + f + 3 * d) + d * 2560 + 2560)
  assert projectors.param_count(cfg, 1408, 2560) == expected


def test_instruction_matters_and_padding_does_not():
  _, _, params, _, fn = _projector('instruct')
  arrays = _projector_arrays('instruct', seeded(5))
  x, ids, tmask = arrays.pop('x'), arrays['text_ids'], arrays['text_mask']   # row 0: last 3 tokens padding
  y = lambda **kw: np.asarray(fn(params, x, dict(arrays, **kw))[0][1])
  repadded = np.where(tmask == 0, (ids + 7) % 50, ids)
  np.testing.assert_allclose(y(text_ids=repadded), y(), atol=1e-5)  # padded instruction tokens are invisible
  other = ids.copy()
  other[:, 1] = (ids[:, 1] + 1) % 50
  assert np.max(np.abs(y(text_ids=other) - y())) > 1e-3            # the instruction changes what is extracted


def test_visual_token_order_does_not_matter():
  """No spatial locality: the Q-Former sees the visual tokens as a set (no position of its own)."""
  _, _, params, _, fn = _projector('blip2')
  arrays = _projector_arrays('blip2', seeded(6))
  x = arrays.pop('x')
  arrays['visual_mask'] = np.ones_like(arrays['visual_mask'])
  perm = np.random.default_rng(0).permutation(7)
  np.testing.assert_allclose(fn(params, x[:, perm], arrays)[0][1], fn(params, x, arrays)[0][1], atol=1e-5)


def test_dropout_only_when_not_deterministic():
  _, _, params, _, fn = _projector('blip2')
  module = projectors.build(dict(CONFIGS['blip2'], dropout=0.5), in_dim=13, out_dim=11)   # same params
  arrays = _projector_arrays('blip2', seeded(11))
  x = arrays.pop('x')
  train = jax.jit(lambda p, key: module.apply({'params': p}, x, grid=(1, 7), deterministic=False,
                                              rngs={'dropout': key}, **arrays))
  y_eval = fn(params, x, arrays)[0][1]
  y1, y2 = train(params, jax.random.PRNGKey(1)), train(params, jax.random.PRNGKey(2))
  assert np.all(np.isfinite(y1)) and np.max(np.abs(y1 - y_eval)) > 1e-3 and np.max(np.abs(y1 - y2)) > 1e-3
  np.testing.assert_allclose(_jit_apply(module, grid=(1, 7))(params, x, **arrays), y_eval, atol=1e-5)


@pytest.mark.parametrize('field,value', [('num_query_tokens', 0), ('hidden_dim', 17), ('num_layers', 0),
                                         ('cross_attention_frequency', 0), ('act', 'nope'), ('dropout', 1.0),
                                         ('mlp_dim', 2.5), ('vocab_size', -1)])
def test_bad_config_names_the_field(field, value):
  with pytest.raises(ValueError, match=f'model.projector.{field}'):
    projectors.build(dict(TINY, **{field: value}), in_dim=13, out_dim=11)


def test_bad_call_errors():
  rng = seeded(7)
  x, _, ids, _ = _inputs(rng)
  with pytest.raises(ValueError, match='language_projection=False'):
    projectors.build(dict(TINY, language_projection=False, out_dim=11), in_dim=13, out_dim=11)
  module = projectors.build(TINY, in_dim=13, out_dim=11)
  with pytest.raises(ValueError, match=r'x has 7 tokens .*not a whole number of frames of grid \(2, 3\)'):
    module.init(jax.random.PRNGKey(0), x, grid=(2, 3))
  with pytest.raises(ValueError, match='text_input=False'):
    module.init(jax.random.PRNGKey(0), x, grid=(1, 7), text_ids=ids)
  bare = projectors.build(dict(TINY, learned_queries=False), in_dim=13, out_dim=11)
  with pytest.raises(ValueError, match='num_query_tokens=5'):
    bare.init(jax.random.PRNGKey(0), x, grid=(1, 7), query_embeds=jnp.zeros((2, 4, 18)))
  assert projectors.build(dict(TINY, text_input=True), in_dim=13, out_dim=11).extra_inputs() == ('text_ids', 'text_mask')
  assert module.extra_inputs() == ()


# ------------------------------------------------------------------------------------------ stage-1 losses


@pytest.fixture(scope='module')
def stage1():
  """A tiny stage-1 pretrainer (2 layers, cross-attention in layer 0) and its initial params, built once."""
  module = QFormerPretrainer(in_dim=13, num_query_tokens=5, hidden_dim=18, num_layers=2, num_heads=2, mlp_dim=37,
                             cross_attention_frequency=2, vocab_size=50, max_text_len=20, embed_dim=8,
                             dec_token_id=2)
  x, _, ids, _ = _inputs(seeded(8))
  return module, _params(module, x, ids)


def test_stage1_losses_are_finite_and_each_decreases(stage1):
  module, params = stage1
  x, vmask, ids, tmask = _inputs(seeded(8), b=4)
  names = ('itc', 'itm', 'itg')

  @jax.jit
  def step(p, weights):
    def total(p):
      out = module.apply({'params': p}, x, ids, tmask, visual_mask=vmask)
      return sum(w * out[k] for w, k in zip(weights, names)), out
    (_, out), g = jax.value_and_grad(total, has_aux=True)(p)
    return jax.tree.map(lambda a, b: a - 0.1 * b, p, g), out, g

  for i, name in enumerate(names):                    # train on one objective at a time, from the same init
    p, weights = params, jnp.eye(3)[i]
    first = None
    for _ in range(6):
      p, out, g = step(p, weights)
      assert all(bool(jnp.isfinite(v)) for v in out.values())
      assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(g))
      first = float(out[name]) if first is None else first
    assert float(step(p, weights)[1][name]) < first, name


def test_hard_negative_mining_picks_most_similar_non_match():
  sim = jnp.array([[9.0, 5.0, 7.0, 1.0],              # the diagonal (the match) is each row's max or not:
                   [3.0, 0.0, 2.0, 8.0],              # mining must skip it either way
                   [6.0, 4.0, 9.0, 5.0],
                   [2.0, 3.0, 1.0, 0.5]])
  np.testing.assert_array_equal(mine_hard_negatives(sim), [2, 3, 0, 1])
  samples = jax.vmap(lambda k: mine_hard_negatives(sim, k))(jax.random.split(jax.random.PRNGKey(0), 200))
  assert not np.any(np.asarray(samples) == np.arange(4))  # sampling (LAVIS) never picks the match either
  # With a sharp softmax the sample is the argmax.
  np.testing.assert_array_equal(mine_hard_negatives(sim * 100, jax.random.PRNGKey(1)), [2, 3, 0, 1])


def test_itg_mask_structure():
  tmask = jnp.array([[1, 1, 1, 0]])
  m = np.asarray(qformer_mask(2, tmask, 'itg'))[0]    # 2 queries + 4 text tokens (last one padding)
  assert m[:2, :2].all() and not m[:2, 2:].any()      # queries see queries only
  assert m[2:, :2].all()                              # text sees every query
  np.testing.assert_array_equal(m[2:, 2:], np.tril(np.ones((4, 4), bool)) & np.array([1, 1, 1, 0], bool))
  assert np.asarray(qformer_mask(2, tmask, 'bidirectional'))[0][:, :5].all()


def test_itg_is_causal(stage1):
  """The loss at text position t does not depend on text tokens after t (gradient w.r.t. their position
  embeddings, which enter only those tokens' inputs, is exactly zero); it does depend on tokens <= t."""
  module, params = stage1
  x, _, ids, _ = _inputs(seeded(9), b=2, t=6)
  t = 2

  def grad_pos(fn):
    g = jax.jit(jax.grad(fn))(params)
    return np.abs(np.asarray(g['qformer']['position_embeddings']['embedding'])).sum(-1)      # [max_text_len]

  def itg_loss_at_t(p):
    logits = module.apply({'params': p}, x, ids, method=module.itg_logits)                   # [B, T, V]
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits[:, t], ids[:, t + 1]))
  g = grad_pos(itg_loss_at_t)
  assert np.all(g[t + 1:] == 0)
  assert np.all(g[:t + 1] > 0)


def test_stage2_starts_from_stage1(stage1):
  """stage2_params copies query tokens, ln_vision and the Q-Former into the projector: its output is then the
  pretrainer's query outputs through the projector's language_projection."""
  module, p1 = stage1
  _, _, p_init, _, fn = _projector('blip2')           # same Q-Former hyper-parameters as the pretrainer
  p2 = stage2_params(p1, p_init)
  arrays = _projector_arrays('blip2', seeded(10))
  x = arrays.pop('x')
  queries = _jit_apply(module, method=module.encode_image)(p1, x, arrays['visual_mask'])   # [B, Q, D]
  lp = p2['language_projection']
  np.testing.assert_allclose(fn(p2, x, arrays)[0][1], queries @ lp['kernel'] + lp['bias'], atol=1e-5)
