"""Tests for layers, ViT, Llama, projectors, MultimodalLM and KV-cache generation (tiny dims, CPU)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import make_tiny_model_cfg

from mmproj import model as mm
from mmproj import projectors
from mmproj.encoders import build_encoder
from mmproj.eval.generate import generate_tokens
from mmproj.layers import apply_rope

LOGICAL_NAMES = {'embed', 'mlp', 'heads', 'kv_heads', 'head_dim', 'vocab', 'norm', 'pos', 'patch', 'layers'}
BOS, EOS, IMAGE, SEP = 1, 2, 3, 4


def make_batch(cfg, pads=(0, 2, 5), text_len=6, seed=0):
  """Left-padded batch: row b = <pad>*pads[b] <bos> <image>*M words... (random word ids >= 6)."""
  rng = np.random.default_rng(seed)
  m = mm.num_image_tokens(cfg)
  length = max(pads) + 1 + m + text_len
  b = len(pads)
  tokens = np.zeros((b, length), np.int32)
  mask = np.zeros((b, length), np.int32)
  for r, p in enumerate(pads):
    n_words = length - p - 1 - m
    row = [BOS] + [IMAGE] * m + list(rng.integers(6, cfg.lm.vocab_size, n_words))
    tokens[r, p:] = row
    mask[r, p:] = 1
  image_size = cfg.encoder.image_size
  return {
      'image': rng.integers(0, 256, (b, image_size, image_size, 3), dtype=np.uint8),
      'tokens': tokens,
      'positions': np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32),
      'input_mask': mask,
  }


def init(model, batch, seed=0):
  return jax.jit(model.init)(jax.random.key(seed), batch)['params']


def leaves_with_paths(tree):
  return jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def path_str(path):
  return '/'.join(str(getattr(k, 'key', k)) for k in path)


def loss_fn(model, params, batch):
  logits = model.apply({'params': params}, batch)                          # [B, L, V]
  targets = jnp.roll(jnp.asarray(batch['tokens']), -1, axis=1)
  logp = jax.nn.log_softmax(logits)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  return jnp.sum(nll * batch['input_mask']) / jnp.sum(batch['input_mask'])


@pytest.fixture(scope='module')
def tiny():
  """(cfg, model, boxed params, batch, jitted forward) shared by the read-only tests."""
  cfg = make_tiny_model_cfg()
  model = mm.build_model(cfg)
  batch = make_batch(cfg)
  params = init(model, batch)
  fwd = jax.jit(lambda p, b: model.apply({'params': p}, b))
  return cfg, model, params, batch, fwd


# ----------------------------------------------------------------------------------------------- projectors


@pytest.mark.parametrize('proj_cfg', [dict(name='linear'), dict(name='mlp', depth=1), dict(name='mlp', depth=2),
                                      dict(name='mlp', depth=3)])
def test_projector_shapes_and_param_count(proj_cfg):
  cfg = ml_collections.ConfigDict(proj_cfg)
  in_dim, out_dim, grid = 24, 40, (3, 5)
  proj = projectors.build(cfg, in_dim=in_dim, out_dim=out_dim)
  x = jax.random.normal(jax.random.key(0), (2, grid[0] * grid[1], in_dim))  # [B, N, Dv]
  params = proj.init(jax.random.key(1), x, grid=grid)['params']
  y = proj.apply({'params': params}, x, grid=grid, deterministic=True)
  assert y.shape == (2, projectors.num_output_tokens(cfg, grid), out_dim)
  real = sum(leaf.size for leaf in jax.tree.leaves(nn.unbox(params)))
  assert real == projectors.param_count(cfg, in_dim, out_dim)


def test_mlp_projector_matches_llava_formula():
  cfg = ml_collections.ConfigDict(dict(name='mlp', depth=2))
  proj = projectors.build(cfg, in_dim=8, out_dim=6)
  x = jax.random.normal(jax.random.key(0), (1, 4, 8))
  p = nn.unbox(proj.init(jax.random.key(1), x, grid=(2, 2))['params'])
  h = jax.nn.gelu(x @ p['linear_1']['kernel'] + p['linear_1']['bias'], approximate=False)
  want = h @ p['linear_2']['kernel'] + p['linear_2']['bias']
  np.testing.assert_allclose(proj.apply({'params': p}, x, grid=(2, 2)), want, rtol=1e-5, atol=1e-6)


def test_projector_registry_errors():
  with pytest.raises(ValueError, match='model.projector.name') as err:
    projectors.build(ml_collections.ConfigDict(dict(name='nope')), in_dim=4, out_dim=4)
  assert 'linear' in str(err.value) and 'mlp' in str(err.value)
  assert set(projectors.REGISTRY) >= {'linear', 'mlp'}
  with pytest.raises(ValueError, match='already registered'):
    projectors.register('mlp')(type('Dup', (), {}))


# ----------------------------------------------------------------------------------------------- layers / ViT


def test_masked_softmax_matches_autodiff_of_the_plain_softmax():
  """layers.masked_softmax (custom backward) vs where + jax.nn.softmax differentiated by JAX: same values and same
  gradients, incl. a fully masked row (zeros, zero gradient, no NaN) and no mask at all."""
  from mmproj.layers.attention import masked_softmax

  def reference(x, mask):
    if mask is None:
      return jax.nn.softmax(x, axis=-1)
    p = jax.nn.softmax(jnp.where(mask, x, -1e30), axis=-1)
    return jnp.where(jnp.any(mask, axis=-1, keepdims=True), p, 0.0)

  kx, kw = jax.random.split(jax.random.key(0))
  x = 3.0 * jax.random.normal(kx, (2, 3, 5, 7))
  w = jax.random.normal(kw, (2, 3, 5, 7))
  mask = jnp.broadcast_to(jnp.arange(7)[None, :] <= jnp.arange(5)[:, None] + 1, (2, 1, 5, 7))
  mask = mask.at[1, :, 2].set(False)                                     # one query sees no key
  for m in (mask, None):
    got, ref = masked_softmax(x, m), reference(x, m)
    np.testing.assert_allclose(got, ref, atol=1e-6)
    g_got = jax.grad(lambda x: jnp.sum(masked_softmax(x, m) * w))(x)
    g_ref = jax.grad(lambda x: jnp.sum(reference(x, m) * w))(x)
    np.testing.assert_allclose(g_got, g_ref, atol=1e-5)
    assert np.all(np.isfinite(g_got))
  assert float(jnp.abs(masked_softmax(x, mask)[1, :, 2]).max()) == 0.0
  assert float(jnp.abs(jax.grad(lambda x: jnp.sum(masked_softmax(x, mask) * w))(x)[1, :, 2]).max()) == 0.0
  assert float(jnp.abs(jax.grad(lambda x: jnp.sum(masked_softmax(x, mask) * w))(x) * ~mask).max()) == 0.0


def test_rope_is_relative_and_norm_preserving():
  q = jax.random.normal(jax.random.key(0), (1, 1, 1, 16))
  k = jax.random.normal(jax.random.key(1), (1, 1, 1, 16))

  def pos(p):
    return jnp.full((1, 1), p, jnp.int32)

  dots = [jnp.sum(apply_rope(q, pos(m)) * apply_rope(k, pos(m - 3))) for m in (3, 10, 40)]
  np.testing.assert_allclose(dots, dots[0], rtol=1e-4)
  np.testing.assert_allclose(jnp.linalg.norm(apply_rope(q, pos(7))), jnp.linalg.norm(q), rtol=1e-5)


def test_vit_options_and_uint8_scaling(tiny_model_cfg):
  enc_cfg = tiny_model_cfg.encoder
  enc_cfg.update(cls_token=True, pre_norm=True, final_norm=False, output_layer=-2)
  vit = build_encoder(enc_cfg)
  image = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
  params = jax.jit(vit.init)(jax.random.key(0), image)['params']
  assert {'class_embedding', 'pre_layernorm', 'layers_0'} <= set(params)
  assert 'layers_1' not in params and 'post_layernorm' not in params   # output_layer=-2: top block not built
  assert params['position_embedding'].value.shape == (1 + 16, 32)       # CLS + 4x4 patches
  as_float = image.astype(np.float32) / 127.5 - 1.0
  both = jax.jit(lambda p, u, f: (vit.apply({'params': p}, u)[0], vit.apply({'params': p}, f)[0]))
  tokens, from_float = both(params, image, as_float)
  assert tokens.shape == (2, 16, 32) and vit.grid == (4, 4)              # CLS dropped
  np.testing.assert_allclose(from_float, tokens, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------- full model


def test_model_shapes_and_param_tree(tiny):
  cfg, model, params, batch, fwd = tiny
  logits = fwd(params, batch)
  assert logits.shape == batch['tokens'].shape + (cfg.lm.vocab_size,)
  assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))
  assert set(params) == {'encoder', 'projector', 'lm'}
  assert mm.num_image_tokens(cfg) == 16


def test_every_param_has_logical_axes(tiny):
  _, _, params, _, _ = tiny
  rules = [('embed', 'fsdp'), ('mlp', 'tensor'), ('heads', 'tensor'), ('kv_heads', 'tensor'), ('vocab', 'tensor')]
  specs = nn.get_partition_spec(params)
  for path, leaf in leaves_with_paths(params):
    name = path_str(path)
    assert isinstance(leaf, nn.Partitioned), f'{name} has no logical axis names'
    assert len(leaf.names) == leaf.value.ndim, name
    assert all(n in LOGICAL_NAMES for n in leaf.names), (name, leaf.names)
    assert len(set(leaf.names)) == len(leaf.names), (name, leaf.names)   # flax rejects repeated names
    nn.logical_to_mesh_axes(leaf.names, rules)
  assert len(jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))) == \
      len(leaves_with_paths(params))


def test_bfloat16_compute_keeps_float32_params_and_logits(tiny):
  cfg, _, params, batch, fwd = tiny
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  cfg.dtype = 'bfloat16'
  model = mm.build_model(cfg)
  shapes = jax.eval_shape(model.init, jax.random.key(0), batch)['params']
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(nn.unbox(shapes)))
  logits = jax.jit(lambda p, b: model.apply({'params': p}, b))(params, batch)
  assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))
  real = batch['input_mask'].astype(bool)
  np.testing.assert_allclose(logits[real], fwd(params, batch)[real], atol=0.25)   # bf16 ~ f32


def test_gradients_finite_and_nonzero(tiny):
  _, model, params, batch, _ = tiny
  grads = jax.jit(jax.grad(lambda p: loss_fn(model, p, batch)))(params)
  for path, g in leaves_with_paths(grads):
    name, g = path_str(path), np.asarray(nn.unbox(g))
    assert np.all(np.isfinite(g)), name
    if name.endswith('k_proj/bias'):
      # A key bias adds q.b to every logit of a query row; softmax is shift invariant, so its grad is 0.
      assert np.max(np.abs(g)) < 1e-5, name
    else:
      assert np.any(g != 0), f'zero gradient for {name}'


def test_frozen_encoder_gets_zero_grads(tiny):
  cfg, _, params, batch, _ = tiny
  frozen = mm.build_model(cfg, encoder_trainable=False)
  grads = jax.jit(jax.grad(lambda p: loss_fn(frozen, p, batch)))(params)
  assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(nn.unbox(grads['encoder'])))
  assert all(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(nn.unbox(grads['projector'])))


def test_causality(tiny):
  _, _, params, batch, fwd = tiny
  t = batch['tokens'].shape[1] - 3
  changed = dict(batch, tokens=batch['tokens'].copy())
  changed['tokens'][:, t] = (changed['tokens'][:, t] + 1) % 32 + 6 * (changed['tokens'][:, t] < 5)
  a, b = fwd(params, batch), fwd(params, changed)
  np.testing.assert_allclose(a[:, :t], b[:, :t], rtol=1e-5, atol=1e-5)
  assert not np.allclose(a[:, t:], b[:, t:])


def test_padding_keys_are_ignored(tiny):
  """A left-padded row gives the same logits as the same content unpadded, whatever sits on the padding."""
  _, _, params, batch, fwd = tiny
  pad = 5                                                           # row 2 has 5 padding columns
  padded = {k: v.copy() for k, v in batch.items()}
  padded['tokens'][2, :pad] = [7, 9, 3, 11, 3]                      # garbage (even <image>) on padding keys
  unpadded = {k: v.copy() for k, v in batch.items()}
  unpadded['tokens'][0] = np.concatenate([batch['tokens'][2, pad:], [8, 9, 10, 11, 12]])
  unpadded['image'][0] = batch['image'][2]
  unpadded['input_mask'][0] = 1
  unpadded['positions'][0] = np.arange(batch['tokens'].shape[1])
  out_padded, out_ref = fwd(params, padded), fwd(params, unpadded)
  np.testing.assert_allclose(out_padded[2, pad:], out_ref[0, :-pad], rtol=1e-4, atol=1e-5)
  real = batch['input_mask'].astype(bool)
  np.testing.assert_allclose(out_padded[real], fwd(params, batch)[real], rtol=1e-5, atol=1e-5)


def test_visual_tokens_land_at_placeholders(tiny):
  cfg, model, params, batch, _ = tiny
  def parts(m, b):
    return m.embed_inputs(b), m.encode(b['image']), m.lm.embed(b['tokens'])
  merged, visual, text = jax.jit(lambda p, b: model.apply({'params': p}, b, method=parts))(params, batch)
  # merged [B, L, D], visual [B, M, D], text [B, L, D]
  for r in range(batch['tokens'].shape[0]):
    cols = np.flatnonzero(batch['tokens'][r] == cfg.image_token_id)
    assert len(cols) == visual.shape[1]
    np.testing.assert_array_equal(merged[r, cols], visual[r])            # k-th placeholder gets token k
    other = np.setdiff1d(np.arange(batch['tokens'].shape[1]), cols)
    np.testing.assert_array_equal(merged[r, other], text[r, other])


def test_merge_visual_tokens_static_gather():
  tokens = jnp.array([[1, 3, 3, 3, 5, 0], [0, 0, 1, 3, 3, 3]])
  text = jnp.zeros((2, 6, 1))
  visual = jnp.array([[[10.], [11.], [12.]], [[20.], [21.], [22.]]])
  out = mm.merge_visual_tokens(text, visual, tokens, image_token_id=3)[..., 0]
  np.testing.assert_array_equal(out, [[0, 10, 11, 12, 0, 0], [0, 0, 0, 20, 21, 22]])


def test_blind_model_has_only_lm(tiny_model_cfg):
  tiny_model_cfg.use_image = False
  model = mm.build_model(tiny_model_cfg)
  assert mm.num_image_tokens(tiny_model_cfg) == 0
  batch = make_batch(tiny_model_cfg)
  del batch['image']
  params = jax.eval_shape(model.init, jax.random.key(0), batch)['params']
  assert set(params) == {'lm'}
  logits = jax.eval_shape(lambda p: model.apply({'params': p}, batch), params)
  assert logits.shape == batch['tokens'].shape + (32,)


# ----------------------------------------------------------------------------------------------- generation


def reference_greedy(fwd, params, batch, max_new_tokens, eos_id, pad_id=0):
  """No cache: re-run the full forward on prompt + generated tokens, argmax at the last real column."""
  b, length = batch['tokens'].shape
  tokens = np.concatenate([batch['tokens'], np.zeros((b, max_new_tokens), np.int32)], axis=1)
  mask = np.concatenate([batch['input_mask'], np.zeros((b, max_new_tokens), np.int32)], axis=1)
  done, out = np.zeros(b, bool), []
  for i in range(max_new_tokens):
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    logits = fwd(params, dict(batch, tokens=tokens, input_mask=mask, positions=positions))
    last = np.asarray(logits[:, length + i - 1]).copy()
    last[:, IMAGE] = -np.inf                                        # generation never emits <image>
    nxt = np.where(done, pad_id, np.argmax(last, axis=-1))
    done |= nxt == eos_id
    out.append(nxt)
    tokens[:, length + i], mask[:, length + i] = nxt, 1
  return np.stack(out, axis=1)


def test_kv_cache_generation_matches_full_forward(tiny):
  cfg, model, params, batch, fwd = tiny
  cache_len = batch['tokens'].shape[1] + 4
  prefill = jax.jit(lambda p, b: model.apply({'params': p}, b, cache_len, method='prefill'))
  logits_last, cache = prefill(params, batch)
  np.testing.assert_allclose(logits_last, fwd(params, batch)[:, -1], rtol=1e-4, atol=1e-5)
  assert cache['k'].shape == (2, 3, batch['tokens'].shape[1] + 4, 2, 8)
  got = generate_tokens(model, params, batch, max_new_tokens=6, eos_id=EOS)
  assert len(np.unique(np.asarray(got))) > 2                        # a non-trivial continuation
  assert got.shape == (3, 6) and got.dtype == jnp.int32
  np.testing.assert_array_equal(got, reference_greedy(fwd, params, batch, 6, EOS))


def test_generation_pads_after_eos_and_samples(tiny):
  cfg, model, params, batch, _ = tiny
  greedy = np.asarray(generate_tokens(model, params, batch, max_new_tokens=6, eos_id=EOS))
  eos = int(greedy[0, 1])                                           # pretend row 0's 2nd token is <eos>
  stopped = np.asarray(generate_tokens(model, params, batch, max_new_tokens=6, eos_id=eos, pad_id=0))
  first = int(np.argmax(greedy[0] == eos))
  np.testing.assert_array_equal(stopped[0, :first + 1], greedy[0, :first + 1])
  assert np.all(stopped[0, first + 1:] == 0)
  key = jax.random.key(7)
  s1 = generate_tokens(model, params, batch, max_new_tokens=6, eos_id=EOS, temperature=1.0, rng=key)
  s2 = generate_tokens(model, params, batch, max_new_tokens=6, eos_id=EOS, temperature=1.0, rng=key)
  np.testing.assert_array_equal(s1, s2)
  assert s1.shape == (3, 6) and np.all((np.asarray(s1) >= 0) & (np.asarray(s1) < cfg.lm.vocab_size))
  with pytest.raises(ValueError, match='rng'):
    generate_tokens(model, params, batch, max_new_tokens=6, eos_id=EOS, temperature=1.0)


# ----------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize('field, value, expected', [
    ('projector.name', 'nope', 'model.projector.name'),
    ('projector.depth', 0, 'model.projector.depth'),
    ('projector.in_dim', 48, 'model.projector.in_dim'),
    ('projector.out_dim', 48, 'model.projector.out_dim'),
    ('projector.bogus', 1, 'model.projector.bogus'),
    ('encoder.image_size', 18, 'model.encoder.image_size'),
    ('encoder.width', 33, 'model.encoder.width'),
    ('encoder.output_layer', -3, 'model.encoder.output_layer'),
    ('encoder.output_layer', 0, 'model.encoder.output_layer'),
    ('encoder.act', 'swish', 'model.encoder.act'),
    ('encoder.name', 'resnet', 'model.encoder.name'),
    ('lm.width', 30, 'model.lm.width'),
    ('lm.num_kv_heads', 3, 'model.lm.num_kv_heads'),
    ('dtype', 'float16', 'model.dtype'),
    ('image_token_id', 32, 'model.image_token_id'),
])
def test_validate_names_the_field(tiny_model_cfg, field, value, expected):
  mm.validate(tiny_model_cfg)
  *parents, leaf = field.split('.')
  node = tiny_model_cfg
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(ValueError, match=expected.replace('.', r'\.')):
    mm.validate(tiny_model_cfg)
  with pytest.raises(ValueError, match=expected.replace('.', r'\.')):
    mm.build_model(tiny_model_cfg)


def test_isolated_turns_match_single_turn_rows(tiny_model_cfg):
  """Shared-prefix packing: each turn of an isolated multi-turn row gets exactly the logits it gets alone."""
  from mmproj.data import pipeline, shapes

  tok = shapes.make_tokenizer()
  cfg = tiny_model_cfg
  cfg.lm.vocab_size = 64
  model = mm.build_model(cfg)
  m = mm.num_image_tokens(cfg)
  turns = [('what color is the circle ?', 'red', 'q0'), ('where is the red circle ?', 'top left', 'q1'),
           ('how many objects are there ?', 'two', 'q2')]
  image = np.random.default_rng(0).integers(0, 256, (1, 16, 16, 3), dtype=np.uint8)

  def logits_of(row):
    batch = {k: row[k][None] for k in ('tokens', 'positions', 'input_mask', 'segment_ids')}
    batch['image'] = image
    return np.asarray(model.apply({'params': params}, batch))[0], row

  packed = pipeline.conversation_row(tok, turns, num_image_tokens=m, text_len=48, isolate_turns=True)
  params = init(model, {**{k: v[None] for k, v in packed.items()}, 'image': image})
  packed_logits, _ = logits_of(packed)
  start = 1 + m
  for k, turn in enumerate(turns, start=1):
    single = pipeline.conversation_row(tok, [turn], num_image_tokens=m, text_len=48)
    single_logits, _ = logits_of(single)
    n = int((packed['segment_ids'] == k).sum())
    turn_slice = slice(start, start + n)
    np.testing.assert_array_equal(packed['tokens'][turn_slice], single['tokens'][1 + m:1 + m + n])
    np.testing.assert_allclose(packed_logits[turn_slice], single_logits[1 + m:1 + m + n], rtol=1e-5, atol=1e-5)
    start += n
  # Without isolation, later turns see earlier ones, so their logits differ from the single-turn ones.
  joined_logits, _ = logits_of(pipeline.conversation_row(tok, turns, num_image_tokens=m, text_len=48))
  assert not np.allclose(joined_logits[start - n:start], packed_logits[start - n:start], atol=1e-4)
