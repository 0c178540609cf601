"""Resampler-style projectors: perceiver (Flamingo / Idefics2), qwen_vl_resampler, cross_attention, tokenpacker.

Shapes, documented param counts, finite gradients, logical axis names, bad configs; the receptive field of
TokenPacker; the perceiver's frames/mask handling; Qwen-VL's sin-cos table and its attention against torch
nn.MultiheadAttention; TokenPacker against a torch restatement of its reference forward (bilinear queries,
per-region nn.MultiheadAttention). Parity with transformers' perceivers is in test_parity_perceiver.py.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mmproj import projectors
from mmproj.projectors.qwen_vl_resampler import sincos_2d

LOGICAL_NAMES = {'embed', 'mlp', 'heads', 'kv_heads', 'head_dim', 'norm', 'pos', 'patch', 'layers'}

# (cfg, in_dim, out_dim, grid, frames): odd widths and grids where the projector allows them.
CASES = {
    'perceiver_flamingo': (dict(name='perceiver', num_latents=5, depth=2, num_heads=3, head_dim=4), 10, 14, (3, 5), 1),
    'perceiver_flamingo_video': (dict(name='perceiver', num_latents=4, depth=1, num_heads=2, head_dim=6, qk_norm=True,
                                      max_frames=3, act='relu'), 10, 14, (2, 3), 2),
    'perceiver_idefics2': (dict(name='perceiver', variant='idefics2', num_latents=6, depth=2, num_heads=4,
                                num_kv_heads=2, head_dim=3, proj_hidden=20, qk_norm=True), 10, 14, (3, 5), 1),
    'qwen_vl_resampler': (dict(name='qwen_vl_resampler', num_queries=9, num_heads=2), 10, 12, (3, 5), 1),
    'qwen_vl_resampler_width': (dict(name='qwen_vl_resampler', num_queries=4, num_heads=4, width=16), 16, 14, (4, 4),
                                1),
    'cross_attention': (dict(name='cross_attention', num_queries=5, depth=2, num_heads=4, num_kv_heads=2), 10, 16,
                        (3, 5), 1),
    'cross_attention_noff': (dict(name='cross_attention', num_queries=3, num_heads=3, head_dim=5, ff_mult=0), 10, 14,
                             (3, 5), 1),
    'tokenpacker': (dict(name='tokenpacker', scale=2, num_heads=2), 10, 14, (4, 6), 1),
    'tokenpacker_s3': (dict(name='tokenpacker', scale=3, num_heads=3, width=12, act='gelu_tanh'), 10, 14, (3, 6), 1),
}


def normal(seed, shape):
  """float32 N(0, 1) inputs from numpy (eager jax.random would compile a sampler per shape)."""
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def random_params(proj, x, seed=1, std=0.3, **kw):
  """(boxed param shapes, random N(0, std) params) of `proj.init(.., x, **kw)`. The tree comes from
  jax.eval_shape (what init creates, without compiling every initializer: seconds per projector on CPU);
  random norm scales and biases rather than ones/zeros keep the numerical checks meaningful."""
  shapes = jax.eval_shape(lambda: proj.init(jax.random.key(0), x, **kw))['params']
  rng = np.random.default_rng(seed)
  return shapes, jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape) * std, jnp.float32), nn.unbox(shapes))


def torch_multihead_attention(torch, attn, width, heads):
  """torch nn.MultiheadAttention (batch_first) holding the params `attn` of our biased CrossAttention of `width`."""
  t = lambda a: torch.from_numpy(np.array(a, np.float32))  # noqa: E731
  mha = torch.nn.MultiheadAttention(width, heads, batch_first=True)
  with torch.no_grad():
    mha.in_proj_weight.copy_(torch.cat([t(attn[k]['kernel']).reshape(width, width).T
                                        for k in ('q_proj', 'k_proj', 'v_proj')]))
    mha.in_proj_bias.copy_(torch.cat([t(attn[k]['bias']).reshape(-1) for k in ('q_proj', 'k_proj', 'v_proj')]))
    mha.out_proj.weight.copy_(t(attn['o_proj']['kernel']).reshape(width, width).T)
    mha.out_proj.bias.copy_(t(attn['o_proj']['bias']))
  return mha


def _build(case):
  cfg, in_dim, out_dim, grid, frames = CASES[case]
  cfg = ml_collections.ConfigDict(cfg)
  proj = projectors.build(cfg, in_dim=in_dim, out_dim=out_dim)
  x = normal(0, (2, frames * grid[0] * grid[1], in_dim))   # [B, N, Dv]
  shapes, params = random_params(proj, x, grid=grid)
  return cfg, proj, x, shapes, params, grid


@pytest.mark.parametrize('case', sorted(CASES))
def test_param_count_and_logical_axes(case):
  cfg, _, _, shapes, params, _ = _build(case)
  _, in_dim, out_dim, _, _ = CASES[case]
  assert sum(a.size for a in jax.tree.leaves(params)) == projectors.param_count(cfg, in_dim, out_dim)
  boxed = jax.tree_util.tree_leaves_with_path(shapes, is_leaf=lambda a: isinstance(a, nn.Partitioned))
  for path, leaf in boxed:
    assert isinstance(leaf, nn.Partitioned), f'{jax.tree_util.keystr(path)} has no logical axis names'
    assert set(leaf.names) <= LOGICAL_NAMES and len(set(leaf.names)) == len(leaf.names), jax.tree_util.keystr(path)
    assert len(leaf.names) == leaf.value.ndim


# One compiled forward + backward per family variant (compiling dominates the run time).
@pytest.mark.parametrize('case', ['perceiver_flamingo_video', 'perceiver_idefics2', 'qwen_vl_resampler',
                                  'cross_attention', 'tokenpacker_s3'])
def test_output_shape_and_finite_grads(case):
  cfg, proj, x, _, params, grid = _build(case)
  out_shape = (2, projectors.num_output_tokens(cfg, grid), CASES[case][2])
  cot = normal(2, out_shape)

  def loss(p, x):
    y = proj.apply({'params': p}, x, grid=grid, deterministic=True)
    return jnp.sum(y * cot), y

  (_, y), (g_params, g_x) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
  assert y.shape == out_shape and np.all(np.isfinite(y))
  for path, g in jax.tree_util.tree_leaves_with_path(g_params):
    assert np.all(np.isfinite(g)), jax.tree_util.keystr(path)
    assert np.any(g != 0), f'{jax.tree_util.keystr(path)} gets no gradient'
  assert np.all(np.isfinite(g_x)) and np.any(g_x != 0)


def test_bf16_compute_keeps_f32_params():
  cfg = dict(name='perceiver', variant='idefics2', num_latents=3, depth=1, num_heads=2, head_dim=4)
  proj = projectors.build(cfg, in_dim=8, out_dim=8, dtype=jnp.bfloat16)
  x = jnp.ones((1, 4, 8))
  params = jax.jit(lambda k: proj.init(k, x, grid=(2, 2)))(jax.random.key(0))['params']   # the real initializers
  assert {a.dtype for a in jax.tree.leaves(nn.unbox(params))} == {jnp.dtype(jnp.float32)}
  y = jax.jit(lambda p: proj.apply({'params': p}, x, grid=(2, 2)))(params)
  assert y.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(y, np.float32)))


# ------------------------------------------------------------------------------------------------- bad configs

BAD = [
    (dict(name='perceiver', variant='flamenco'), 'model.projector.variant'),
    (dict(name='perceiver', num_heads=8, num_kv_heads=3), 'model.projector.num_kv_heads'),
    (dict(name='perceiver', num_latents=0), 'model.projector.num_latents'),
    (dict(name='perceiver', proj='mlp'), 'model.projector.proj'),
    (dict(name='perceiver', act='swishy'), 'model.projector.act'),
    (dict(name='perceiver', max_frames=-1), 'model.projector.max_frames'),
    (dict(name='qwen_vl_resampler', num_queries=10), 'model.projector.num_queries'),
    (dict(name='qwen_vl_resampler', num_heads=4, width=30), 'model.projector.width'),
    (dict(name='qwen_vl_resampler', num_heads=2, width=34), 'model.projector.width=34 must be divisible by 4'),
    (dict(name='cross_attention', num_heads=4, num_kv_heads=3), 'model.projector.num_kv_heads'),
    (dict(name='cross_attention', ff_mult=-1), 'model.projector.ff_mult'),
    (dict(name='cross_attention', depth=0), 'model.projector.depth'),
    (dict(name='tokenpacker', scale=0), 'model.projector.scale'),
    (dict(name='tokenpacker', num_heads=4, width=30), 'model.projector.width'),
    (dict(name='tokenpacker', kv_dim=0), 'model.projector.kv_dim'),
]


@pytest.mark.parametrize('cfg,field', BAD)
def test_bad_config_names_the_field(cfg, field):
  with pytest.raises(ValueError, match=field.replace('.', r'\.')):
    projectors.build(ml_collections.ConfigDict(cfg), in_dim=16, out_dim=16)


def _call(cfg, in_dim, out_dim, n, grid, **kw):
  proj = projectors.build(cfg, in_dim=in_dim, out_dim=out_dim)
  return random_params(proj, jnp.ones((1, n, in_dim)), grid=grid, **kw)


def test_bad_grid_or_dims_fail_at_call_naming_them():
  tp = dict(name='tokenpacker', scale=2, num_heads=2)
  with pytest.raises(ValueError, match=r'grid \(5, 6\).*model\.projector\.scale=2'):
    projectors.num_output_tokens(tp, (5, 6))
  with pytest.raises(ValueError, match=r'grid \(5, 6\).*model\.projector\.scale=2'):
    _call(tp, 8, 8, 30, (5, 6))
  with pytest.raises(ValueError, match='kv_dim'):
    _call(dict(tp, kv_dim=12), 8, 8, 16, (4, 4))            # kv_dim set but no kv_features passed
  # default width (in_dim / out_dim) not divisible by num_heads
  with pytest.raises(ValueError, match=r'model\.projector\.width=10 \(default: in_dim\)'):
    _call(dict(tp, num_heads=4), 10, 8, 16, (4, 4))
  with pytest.raises(ValueError, match=r'model\.projector\.width=18 \(default: the LM width'):
    _call(dict(name='qwen_vl_resampler', num_queries=4, num_heads=4), 8, 18, 16, (4, 4))
  with pytest.raises(ValueError, match=r'model\.projector\.head_dim'):
    _call(dict(name='cross_attention', num_heads=3), 8, 16, 4, (2, 2))
  with pytest.raises(ValueError, match=r'model\.projector\.proj="none" needs in_dim == out_dim'):
    _call(dict(name='perceiver', proj='none', depth=1, num_heads=2, head_dim=4), 8, 12, 4, (2, 2))
  with pytest.raises(ValueError, match=r'3 frames of grid \(2, 2\) exceed model\.projector\.max_frames=2'):
    _call(dict(name='perceiver', max_frames=2, depth=1, num_heads=2, head_dim=4), 8, 8, 12, (2, 2))
  with pytest.raises(ValueError, match=r'not a whole number of frames of grid \(2, 3\)'):
    _call(dict(name='perceiver', depth=1, num_heads=2, head_dim=4), 8, 8, 8, (2, 3))
  with pytest.raises(ValueError, match=r'grid \(2, 3\) does not hold 8 tokens'):
    _call(dict(name='qwen_vl_resampler', num_queries=4, num_heads=2), 8, 8, 8, (2, 3))
  with pytest.raises(ValueError, match='num_queries=0 needs text queries'):
    _call(dict(name='cross_attention', num_queries=0, num_heads=2), 8, 8, 4, (2, 2))


# ------------------------------------------------------------------------------------------------- perceiver


def test_perceiver_frames_time_embeddings_and_mask():
  base = dict(name='perceiver', num_latents=3, depth=1, num_heads=2, head_dim=4)
  x = normal(0, (2, 2 * 4, 6))                              # 2 frames of grid 2x2
  swapped = jnp.concatenate([x[:, 4:], x[:, :4]], axis=1)                              # frame order reversed
  for max_frames, same in ((0, True), (2, False)):
    proj = projectors.build(dict(base, max_frames=max_frames), in_dim=6, out_dim=8)
    _, p = random_params(proj, x, grid=(2, 2))
    y, y_swapped = jax.jit(jax.vmap(lambda t, proj=proj, p=p: proj.apply({'params': p}, t, grid=(2, 2))))(
        jnp.stack([x, swapped]))
    assert y.shape == (2, 3, 8)
    # Without time embeddings the tokens are an unordered set; with them, frame order matters.
    assert bool(jnp.allclose(y, y_swapped, atol=1e-5)) == same

  # Masked tokens have no influence on the output.
  proj = projectors.build(dict(base, variant='idefics2'), in_dim=6, out_dim=8)
  _, p = random_params(proj, x, grid=(2, 2))
  mask = jnp.array([[1, 1, 0, 1, 1, 0, 0, 1], [1] * 8])
  g = jax.jit(jax.grad(lambda x: jnp.sum(proj.apply({'params': p}, x, grid=(2, 2), mask=mask) ** 2)))(x)
  assert np.all(np.asarray(g)[mask == 0] == 0) and np.all(np.abs(np.asarray(g)[mask == 1]).sum(-1) > 0)


# ------------------------------------------------------------------------------------------------- qwen-vl


def test_sincos_table_matches_the_formula():
  dim, rows, cols = 16, 3, 5
  table = sincos_2d(dim, rows, cols)
  want = np.zeros((rows * cols, dim))
  quarter = dim // 4
  for i in range(rows):
    for j in range(cols):
      for k in range(quarter):
        omega = 10000.0 ** (-k / quarter)
        want[i * cols + j, k] = np.sin(j * omega)                   # column (x) coordinate first, as MAE / Qwen-VL
        want[i * cols + j, quarter + k] = np.cos(j * omega)
        want[i * cols + j, 2 * quarter + k] = np.sin(i * omega)
        want[i * cols + j, 3 * quarter + k] = np.cos(i * omega)
  np.testing.assert_allclose(table, want, atol=1e-6)
  with pytest.raises(ValueError, match='divisible by 4'):
    sincos_2d(6, 2, 2)


def test_qwen_vl_resampler_matches_torch_multihead_attention():
  torch = pytest.importorskip('torch')
  g, width, heads, in_dim, out_dim = 3, 16, 4, 10, 12
  proj = projectors.build(dict(name='qwen_vl_resampler', num_queries=g * g, num_heads=heads, width=width),
                          in_dim=in_dim, out_dim=out_dim)
  x = normal(0, (2, g * g, in_dim))
  _, p = random_params(proj, x, grid=(g, g))
  y = jax.jit(lambda p, x: proj.apply({'params': p}, x, grid=(g, g)))(p, x)

  t = lambda a: torch.from_numpy(np.array(a, np.float32))  # noqa: E731

  def ln(v, q):
    return torch.nn.functional.layer_norm(v, (width,), t(q['scale']), t(q['bias']), eps=1e-6)

  mha = torch_multihead_attention(torch, p['attn'], width, heads)
  with torch.no_grad():
    pos = torch.from_numpy(sincos_2d(width, g, g))
    kv = ln(t(x) @ t(p['kv_proj']['kernel']), p['ln_kv'])
    q = ln(t(p['queries']), p['ln_q'])
    out = mha((q + pos)[None].expand(2, -1, -1), kv + pos, kv, need_weights=False)[0]
    ref = ln(out, p['ln_post']) @ t(p['proj']['kernel'])
  np.testing.assert_allclose(np.asarray(y), ref.numpy(), atol=1e-5)


def test_qwen_vl_resampler_key_positions_follow_the_encoder_grid():
  proj = projectors.build(dict(name='qwen_vl_resampler', num_queries=4, num_heads=2), in_dim=8, out_dim=8)
  x = normal(0, (1, 12, 8))
  _, p = random_params(proj, x, grid=(3, 4))
  y_34, y_43 = (jax.jit(lambda p, x, grid=grid: proj.apply({'params': p}, x, grid=grid))(p, x)
                for grid in ((3, 4), (4, 3)))                   # same tokens, other layout -> other key positions
  assert y_34.shape == y_43.shape == (1, 4, 8)
  assert not jnp.allclose(y_34, y_43, atol=1e-4)


# ------------------------------------------------------------------------------------------------- cross-attention


def test_cross_attention_text_queries_and_mask():
  cfg = dict(name='cross_attention', num_queries=3, num_heads=2, num_kv_heads=1)
  proj = projectors.build(cfg, in_dim=6, out_dim=8)
  x = normal(0, (2, 4, 6))
  text = normal(1, (2, 5, 8))
  _, p = random_params(proj, x, grid=(2, 2))
  apply = jax.jit(lambda x, **kw: proj.apply({'params': p}, x, grid=(2, 2), **kw))
  y = apply(x, queries=text)
  assert y.shape == (2, 3 + 5, 8)
  # Learned queries do not depend on the text ones (no attention among queries)...
  np.testing.assert_allclose(y[:, :3], apply(x), atol=1e-5)
  # ...and text-only mode works without a learned table.
  text_only = projectors.build(dict(cfg, num_queries=0), in_dim=6, out_dim=8)
  shapes0, _ = random_params(text_only, x, grid=(2, 2), queries=text)
  assert 'queries' not in shapes0 and set(shapes0) == set(p) - {'queries'}
  mask = jnp.array([[1, 0, 1, 1], [0, 1, 1, 1]])
  g = jax.jit(jax.grad(lambda x: jnp.sum(apply(x, mask=mask, queries=text) ** 2)))(x)
  assert np.all(np.asarray(g)[mask == 0] == 0) and np.all(np.abs(np.asarray(g)[mask == 1]).sum(-1) > 0)


# ------------------------------------------------------------------------------------------------- tokenpacker


@pytest.mark.parametrize('scale,grid,multi_level', [(2, (4, 6), False), (3, (6, 3), True)])
def test_tokenpacker_receptive_field_is_its_region(scale, grid, multi_level):
  h, w = grid
  cfg = dict(name='tokenpacker', scale=scale, num_heads=2, **({'kv_dim': 5} if multi_level else {}))
  proj = projectors.build(cfg, in_dim=6, out_dim=8)
  x = normal(0, (1, h * w, 6))
  feats = normal(1, (1, h * w, 5)) if multi_level else None
  _, p = random_params(proj, x, grid=grid, kv_features=feats)
  if multi_level:
    jacs = jax.jit(jax.jacobian(lambda x, f: proj.apply({'params': p}, x, grid=grid, kv_features=f),
                                argnums=(0, 1)))(x, feats)
  else:
    jacs = (jax.jit(jax.jacobian(lambda x: proj.apply({'params': p}, x, grid=grid)))(x),)  # [1, M, Dt, 1, N, C]
  wc = w // scale
  for m in range(projectors.num_output_tokens(cfg, grid)):
    i, j = divmod(m, wc)
    region = np.zeros((h, w), bool)
    region[i * scale:(i + 1) * scale, j * scale:(j + 1) * scale] = True
    for jac in jacs:
      influence = np.abs(np.asarray(jac[0, m, :, 0])).sum(axis=(0, -1)).reshape(h, w)   # [h, w]
      assert np.all(influence[~region] == 0), f'token {m} sees outside its region'
      assert np.all(influence[region] > 0), f'token {m} misses part of its region'


def test_tokenpacker_matches_torch_reference_forward():
  """The reference TokenPacker forward (s = 2): bilinear-downsampled queries, per-region nn.MultiheadAttention."""
  torch = pytest.importorskip('torch')
  h, w, dv, width, dt, heads, s = 4, 6, 8, 12, 10, 3, 2
  proj = projectors.build(dict(name='tokenpacker', scale=s, num_heads=heads, width=width), in_dim=dv, out_dim=dt)
  x = normal(0, (2, h * w, dv))
  _, p = random_params(proj, x, grid=(h, w))
  y = jax.jit(lambda p, x: proj.apply({'params': p}, x, grid=(h, w)))(p, x)

  t = lambda a: torch.from_numpy(np.array(a, np.float32))  # noqa: E731
  gelu = torch.nn.functional.gelu

  def ln(v, q):
    return torch.nn.functional.layer_norm(v, (v.shape[-1],), t(q['scale']), t(q['bias']), eps=1e-6)

  def mlp2(v, q):
    v = gelu(v @ t(q['linear_1']['kernel']) + t(q['linear_1']['bias']))
    return v @ t(q['linear_2']['kernel']) + t(q['linear_2']['bias'])

  mha = torch_multihead_attention(torch, p['attn'], width, heads)
  with torch.no_grad():
    xt = t(x)
    q = torch.nn.functional.interpolate(xt.reshape(2, h, w, dv).permute(0, 3, 1, 2), size=(h // s, w // s),
                                        mode='bilinear').permute(0, 2, 3, 1).reshape(2, -1, dv)
    q = ln(q @ t(p['q_proj']['kernel']), p['ln_q'])                                   # [B, M, W]
    k, v = ln(mlp2(xt, p['k_proj']), p['ln_k']), ln(mlp2(xt, p['v_proj']), p['ln_v'])
    outs = []
    for i in range(h // s):
      for j in range(w // s):
        idx = [(i * s + a_) * w + j * s + b_ for a_ in range(s) for b_ in range(s)]
        qi = q[:, i * (w // s) + j][:, None]                                          # [B, 1, W]
        outs.append(mha(qi, k[:, idx], v[:, idx], need_weights=False)[0])
    ref = mlp2(torch.cat(outs, dim=1), p['mlp'])                                      # [B, M, Dt]
  np.testing.assert_allclose(np.asarray(y), ref.numpy(), atol=1e-5)
