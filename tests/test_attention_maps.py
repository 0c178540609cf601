"""Attention maps: sown softmax probabilities, projector queries over the patch grid, LM attention to the image."""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import make_tiny_model_cfg

import mmproj
from mmproj import model as mm
from mmproj.inference import attention
from mmproj.inference import Bundle
from mmproj.layers import dot_product_attention

# Tiny projector configs for the 16 px / 4 px-patch tiny model (4 x 4 grid, encoder and LM width 32).
GRID_PROJECTORS = {
    'cross_attention': (dict(name='cross_attention', num_queries=5, depth=2, num_heads=2, num_kv_heads=1), 5),
    'perceiver': (dict(name='perceiver', num_latents=5, depth=2, num_heads=4, num_kv_heads=2, head_dim=8), 5),
    'qformer': (dict(name='qformer', num_query_tokens=3, hidden_dim=16, num_layers=2, num_heads=2, mlp_dim=32,
                     cross_attention_frequency=1), 3),
    'qwen_vl_resampler': (dict(name='qwen_vl_resampler', num_queries=4, num_heads=2), 4),
    'tokenpacker': (dict(name='tokenpacker', scale=2, num_heads=2), 4),
    'd_abstractor': (dict(name='d_abstractor', num_queries=4, depth=2, num_heads=2, num_points=3, ffn_dim=32), 4),
    'gated_xattn': (dict(name='gated_xattn', heads=2, resampler=dict(name='qwen_vl_resampler', num_queries=9,
                                                                      num_heads=2)), 9),
}
# Projectors whose maps are a softmax over the grid only (each row sums to 1).
NORMALISED = ('cross_attention', 'qformer', 'qwen_vl_resampler', 'tokenpacker', 'gated_xattn')


_BUNDLES: dict[str, Bundle] = {}


def tiny_bundle(projector: dict) -> Bundle:
  """A randomly initialised tiny model as a Bundle (no tokenizer: enough for projector_attention); initialised
  once per projector config (compiling the init is most of these tests' time), params copied per call."""
  key = repr(projector)
  if key not in _BUNDLES:
    cfg = make_tiny_model_cfg()
    cfg.projector = projector
    model = mm.build_model(cfg)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), tiny_batch(cfg, 2))['params'])
    _BUNDLES[key] = Bundle(model=model, params=params, tokenizer=None,
                           config=ml_collections.ConfigDict({'model': cfg}))
  cached = _BUNDLES[key]
  return dataclasses.replace(cached, params=jax.tree.map(lambda x: x, cached.params))


def config_bundle(projector: dict) -> Bundle:
  """A Bundle with the tiny config and no model: enough for the checks that refuse before running anything."""
  cfg = make_tiny_model_cfg()
  cfg.projector = projector
  mm.validate(cfg)
  return Bundle(model=None, params=None, tokenizer=None, config=ml_collections.ConfigDict({'model': cfg}))


def tiny_batch(cfg, b: int, seed: int = 0) -> dict:
  """b rows, the first left-padded by 2: <pad>*p <bos> <image>*M words."""
  rng = np.random.default_rng(seed)
  m = mm.num_image_tokens(cfg)
  length = 2 + 1 + m + 4
  tokens = np.zeros((b, length), np.int32)
  mask = np.zeros((b, length), np.int32)
  for r in range(b):
    pad = 2 if r == 0 else 0
    row = [1] + [cfg.image_token_id] * m + list(rng.integers(6, cfg.lm.vocab_size, length - pad - 1 - m))
    tokens[r, pad:], mask[r, pad:] = row, 1
  size = cfg.encoder.image_size
  return {'image': rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8), 'tokens': tokens,
          'positions': np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32), 'input_mask': mask}


def test_dot_product_attention_probs_gqa_and_masks():
  """return_probs gives [B, H, T, S] rows summing to 1 (0 for fully masked queries), query head h reading kv head
  h // G, and leaves the output unchanged."""
  rng = np.random.default_rng(0)
  b, t, s, h, hkv, dh = 2, 3, 5, 4, 2, 8
  q = jnp.asarray(rng.normal(size=(b, t, h, dh)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(b, s, hkv, dh)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(b, s, hkv, dh)), jnp.float32)
  mask = jnp.asarray(rng.random((b, t, s)) > 0.3).at[1, 2].set(False)       # row (1, 2) sees nothing
  out, probs = dot_product_attention(q, k, v, mask, return_probs=True)
  assert probs.shape == (b, h, t, s) and probs.dtype == jnp.float32
  np.testing.assert_array_equal(out, dot_product_attention(q, k, v, mask))
  sums = np.asarray(probs.sum(-1))                                          # [B, H, T]
  visible = np.asarray(mask.any(-1))[:, None, :]                            # [B, 1, T]
  np.testing.assert_allclose(sums, np.broadcast_to(np.where(visible, 1.0, 0.0), sums.shape), atol=1e-6)
  assert np.all(np.asarray(probs)[~np.broadcast_to(np.asarray(mask)[:, None], probs.shape)] == 0)
  kv_of_head = np.repeat(np.asarray(k), h // hkv, axis=2)                   # HF repeat_kv order
  logits = np.einsum('bthd,bshd->bhts', np.asarray(q), kv_of_head) / np.sqrt(dh)
  logits = np.where(np.asarray(mask)[:, None], logits, -np.inf)
  with np.errstate(invalid='ignore'):
    want = np.exp(logits - logits.max(-1, keepdims=True))
    want = np.nan_to_num(want / want.sum(-1, keepdims=True))
  np.testing.assert_allclose(probs, want, atol=1e-6)


def test_sowing_leaves_logits_bitwise_equal():
  """Applying with mutable intermediates gives the same logits: bit for bit eagerly, and jitted up to XLA fusing
  the extra einsum path of the maps differently (float rounding); the sown LM softmax is causal with rows summing
  to 1. The perceiver covers both Attention (ViT, LM) and CrossAttention."""
  bundle = tiny_bundle(GRID_PROJECTORS['perceiver'][0])
  batch = tiny_batch(bundle.config.model, 2)
  variables = {'params': bundle.params}
  plain = bundle.model.apply(variables, batch)
  sown, state = bundle.model.apply(variables, batch, mutable=['intermediates'])
  np.testing.assert_array_equal(plain, sown)
  jitted = jax.jit(lambda p, x: bundle.model.apply({'params': p}, x))
  jitted_sown = jax.jit(lambda p, x: bundle.model.apply({'params': p}, x, mutable=['intermediates']))
  np.testing.assert_allclose(jitted(bundle.params, batch), jitted_sown(bundle.params, batch)[0], rtol=1e-5,
                             atol=1e-5)

  probs = attention.sown_attention(state['intermediates'])
  cfg = bundle.config.model
  length = batch['tokens'].shape[1]
  for i in range(cfg.lm.depth):
    p = np.asarray(probs[f'lm/layers_{i}/self_attn'])
    assert p.shape == (2, cfg.lm.num_heads, length, length)
    real = batch['input_mask'].astype(bool)                                 # [B, L] query rows that see a key
    np.testing.assert_allclose(p.sum(-1)[np.broadcast_to(real[:, None], p.shape[:3])], 1.0, atol=1e-6)
    assert np.all(np.triu(p, k=1) == 0)                                     # causal
  assert {k.split('/')[0] for k in probs} == {'encoder', 'projector', 'lm'}
  # Without mutable intermediates nothing is sown.
  _, none = bundle.model.apply(variables, batch, mutable=[])
  assert 'intermediates' not in none


@pytest.mark.parametrize('name', sorted(GRID_PROJECTORS))
def test_projector_attention_maps(name):
  projector, queries = GRID_PROJECTORS[name]
  bundle = tiny_bundle(projector)
  if name == 'd_abstractor':  # at init the sampling points do not depend on the query, hence not on the image
    bundle.params = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.3 * jax.random.normal(jax.random.key(len(path)), x.shape) if any(
            getattr(k, 'key', None) in ('sampling_offsets', 'attention_weights') for k in path) else x,
        bundle.params)
  rng = np.random.default_rng(1)
  images = list(rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8))
  maps = attention.projector_attention(bundle, images)
  assert attention.attends_to_grid(bundle.config.model)
  assert maps.shape == (3, queries, 4, 4) and maps.dtype == np.float32
  assert np.all(np.isfinite(maps)) and np.all(maps >= 0)
  sums = maps.sum(axis=(2, 3))                                              # [B, Q]
  if name in NORMALISED:
    np.testing.assert_allclose(sums, 1.0, atol=1e-5)
  else:                                                                     # mass on the image only
    assert np.all(sums <= 1 + 1e-5) and np.all(sums > 0)
  last = attention.projector_attention(bundle, images, layer=-1)
  assert last.shape == maps.shape
  assert not np.allclose(maps[0], maps[1])                                  # the maps depend on the image
  with pytest.raises(ValueError, match='layer=7'):
    attention.projector_attention(bundle, images, layer=7)
  if name == 'tokenpacker':                                                 # each query stays in its 2 x 2 region
    for q in range(queries):
      i, j = divmod(q, 2)
      inside = np.zeros((4, 4), bool)
      inside[2 * i:2 * i + 2, 2 * j:2 * j + 2] = True
      assert np.all(maps[:, q][:, ~inside] == 0) and np.all(maps[:, q][:, inside] > 0)


def test_cross_attention_map_is_the_sown_softmax():
  """One block, one head: the map of query q is softmax(q_q . k_n / sqrt(Dh)) over the grid cells n."""
  bundle = tiny_bundle(dict(name='cross_attention', num_queries=2, depth=1, num_heads=1, ff_mult=0))
  image = np.random.default_rng(2).integers(0, 256, (16, 16, 3), dtype=np.uint8)
  model, params = bundle.model, bundle.params
  feats, _ = model.apply({'params': params}, image[None], method=lambda m, x: m.encoder(x))   # [1, 16, 32]
  p = params['projector']
  ln = lambda x, s: (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6) * s['scale'] + s['bias']
  c = ln(np.asarray(feats[0]), p['context_norm'])                          # [16, 32]
  z = ln(np.asarray(p['queries']), p['attn_norm_0'])                       # [2, 32]
  attn = p['attn_0']
  q = np.einsum('md,dhk->mhk', z, attn['q_proj']['kernel'])[:, 0]          # [2, Dh]
  k = np.einsum('nd,dhk->nhk', c, attn['k_proj']['kernel'])[:, 0]          # [16, Dh]
  logits = q @ k.T / np.sqrt(q.shape[-1])
  want = np.exp(logits - logits.max(-1, keepdims=True))
  want /= want.sum(-1, keepdims=True)
  maps = attention.projector_attention(bundle, [image])
  np.testing.assert_allclose(maps[0].reshape(2, 16), want, atol=2e-5)


def test_d_abstractor_points_at_their_reference_spread_bilinearly():
  """With zero sampling offsets every point of query k sits on its reference point, the centre of pool cell k of
  the 2 x 2 query grid: on the 4 x 4 map that is the corner shared by 4 cells, each getting weight 1/4."""
  bundle = tiny_bundle(dict(name='d_abstractor', num_queries=4, depth=1, num_heads=2, num_points=3, ffn_dim=32))
  offsets = bundle.params['projector']['layers_0']['encoder_attn']['sampling_offsets']
  offsets['bias'] = 0 * offsets['bias']
  maps = attention.projector_attention(bundle, [np.full((16, 16, 3), 200, np.uint8)])[0]   # [4, 4, 4]
  for q in range(4):
    i, j = divmod(q, 2)
    want = np.zeros((4, 4), np.float32)
    want[2 * i:2 * i + 2, 2 * j:2 * j + 2] = 0.25
    np.testing.assert_allclose(maps[q], want, atol=1e-6)


@pytest.mark.parametrize('name', ['mlp', 'pixel_shuffle', 'c_abstractor'])
def test_projector_without_grid_attention_is_refused(name):
  projector = {'mlp': dict(name='mlp', depth=2), 'pixel_shuffle': dict(name='pixel_shuffle', scale_factor=2),
               'c_abstractor': dict(name='c_abstractor', num_queries=4, depth=1)}[name]
  bundle = config_bundle(projector)
  assert not attention.attends_to_grid(bundle.config.model)
  with pytest.raises(ValueError, match=rf"model.projector.name='{name}'.*lm_attention_to_image"):
    attention.projector_attention(bundle, [np.zeros((16, 16, 3), np.uint8)])
  # These keep the grid: the LM's visual tokens lie on it.
  assert attention.visual_token_grid(bundle.config.model) == {'mlp': (4, 4)}.get(name, (2, 2))


def test_visual_token_grid_refuses_query_projectors():
  cfg = make_tiny_model_cfg()
  cfg.projector = GRID_PROJECTORS['perceiver'][0]
  with pytest.raises(ValueError, match="'perceiver' does not keep the patch grid.*as_grid=False"):
    attention.visual_token_grid(cfg)


# ------------------------------------------------------------------------------ a trained quickstart model


@pytest.fixture(scope='module')
def trained(trained_workdir):
  from mmproj.data import shapes
  bundle = mmproj.load(trained_workdir)
  source = shapes.data_source(bundle.config.data, 'test')
  records = [shapes.decode_record(source[i]) for i in range(3)]
  return bundle, [r['image'] for r in records], [r['questions'][0] for r in records]


def test_lm_attention_to_image_on_the_quickstart(trained):
  bundle, images, questions = trained
  cfg = bundle.config.model
  h, w = mm.encoder_grid(cfg)
  with pytest.raises(ValueError, match="'mlp'.*lm_attention_to_image"):
    attention.projector_attention(bundle, images)
  maps = attention.lm_attention_to_image(bundle, images, questions)
  assert maps.shape == (3, h, w) and maps.dtype == np.float32
  assert np.all(maps >= 0) and np.all(maps.sum(axis=(1, 2)) <= 1 + 1e-5) and np.all(maps.sum(axis=(1, 2)) > 0)
  flat = attention.lm_attention_to_image(bundle, images, questions, as_grid=False)
  np.testing.assert_array_equal(flat, maps.reshape(3, h * w))
  # Left padding is neutral: a prompt alone gives its map inside the batch.
  np.testing.assert_allclose(attention.lm_attention_to_image(bundle, images[1:2], questions[1:2])[0], maps[1],
                             atol=1e-5)
  # It is the last prompt token's row of the sown last-layer softmax, averaged over heads.
  from mmproj.inference import encode_prompt
  row = encode_prompt(bundle, questions[0])
  batch = {'image': images[0][None], 'tokens': np.asarray([row], np.int32),
           'input_mask': np.ones((1, len(row)), np.int32), 'positions': np.arange(len(row), dtype=np.int32)[None]}
  _, state = bundle.model.apply({'params': bundle.params}, batch, mutable=['intermediates'])
  probs = attention.sown_attention(state['intermediates'])[f'lm/layers_{cfg.lm.depth - 1}/self_attn']
  want = np.asarray(probs)[0, :, -1].mean(0)[np.asarray(row) == cfg.image_token_id]
  np.testing.assert_allclose(maps[0].reshape(-1), want, atol=1e-5)
  with pytest.raises(ValueError, match='2 prompts need 2 images, got 3'):
    attention.lm_attention_to_image(bundle, images, questions[:2])
  with pytest.raises(ValueError, match='layer=5'):
    attention.lm_attention_to_image(bundle, images, questions, layer=5)
