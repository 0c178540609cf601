"""Honeybee C-Abstractor / D-Abstractor, MobileVLM LDP / LDPv2: generic checks for all four (shape and token
count, exact param_count, logical axes, finite gradients, bfloat16, bad configs and grids), then the Honeybee
specifics: the bilinear sampler vs numpy and torch grid_sample, the deformable decoder vs HF
DeformableDetrDecoderLayer, both abstractors vs torch references written from Honeybee's code (timm RegNet
bottleneck, torch AdaptiveAvgPool2d, HF deformable layers), and their locality (receptive field / sampled points).
MobileVLM parity and receptive fields are in test_projector_ldp.py.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parity_utils import assert_close, randomize_, seeded, to_torch

from mmproj import projectors
from mmproj.layers.feature_map import bilinear_sample
from mmproj.projectors.d_abstractor import grid_reference_points

torch = pytest.importorskip('torch')
F = torch.nn.functional

DV, DT, B = 12, 16, 2
LOGICAL_NAMES = {'embed', 'mlp', 'heads', 'kv_heads', 'head_dim', 'vocab', 'norm', 'pos', 'patch', 'layers'}

# (cfg, grid): defaults-shaped settings plus odd / non-square grids, uneven pools, widths equal and different.
CASES = {
    'c_abs_se': (dict(name='c_abstractor', num_queries=9, depth=1, hidden_dim=8), (5, 7)),
    'c_abs_deep': (dict(name='c_abstractor', num_queries=4, depth=3, hidden_dim=8, se_ratio=0.5, mlp_depth=3), (4, 4)),
    'c_abs_pos_prenorm': (dict(name='c_abstractor', num_queries=4, depth=1, se_ratio=0.0, pos_emb_grid=(6, 6),
                               prenorm=True), (6, 6)),
    'c_abs_upsample': (dict(name='c_abstractor', num_queries=16, depth=1, mlp_depth=1), (3, 5)),
    'd_abs_pooled': (dict(name='d_abstractor', num_queries=9, depth=1, hidden_dim=16, num_heads=4, num_points=3,
                          pos_emb_grid=(5, 7)), (5, 7)),
    'd_abs_deep': (dict(name='d_abstractor', num_queries=4, depth=3, hidden_dim=8, num_heads=2, mlp_depth=3), (4, 4)),
    'd_abs_learned': (dict(name='d_abstractor', num_queries=4, depth=1, num_heads=3, num_points=2,
                           query_init='learned', ffn_dim=20, mlp_depth=1), (4, 6)),
    'ldp': (dict(name='ldp'), (5, 7)),
    'ldp_no_se': (dict(name='ldp', use_se=False), (6, 6)),
    'ldpv2': (dict(name='ldpv2'), (5, 7)),
    'ldpv2_pool3': (dict(name='ldpv2', pool=3), (6, 8)),
}


def _x(grid, seed=0, batch=B, dtype=jnp.float32):
  """Encoder tokens [batch, h*w, Dv] (numpy draws: no per-shape random compile)."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal((batch, grid[0] * grid[1], DV)), dtype)


def _abstract(cfg, grid, dtype=jnp.float32):
  """(module, boxed abstract params) without running anything: jax.eval_shape of init."""
  module = projectors.build(cfg, in_dim=DV, out_dim=DT, dtype=dtype)
  x = jax.ShapeDtypeStruct((B, grid[0] * grid[1], DV), dtype)
  return module, jax.eval_shape(lambda x: module.init(jax.random.key(0), x, grid=grid), x)['params']


def _random_params(cfg, grid, seed=0, std=0.3):
  """(module, params) drawn with numpy in the init's shapes: no init compile, no zero-initialised leaves."""
  module, boxed = _abstract(cfg, grid)
  rng = np.random.default_rng(seed)
  return module, jax.tree.map(lambda s: jnp.asarray(rng.normal(0, std, s.shape), jnp.float32), nn.unbox(boxed))


def run_once(fn, *args):
  """jit fn, compile at XLA backend optimisation level 0 and run it once. Each test graph runs once, so compile
  time is the cost; level 0 halves it on CPU."""
  return jax.jit(fn).lower(*args).compile(compiler_options={'xla_backend_optimization_level': 0})(*args)


def _touched(cfg, params, grid, seed=0):
  """[M, h, w]: where d (y[0, k] . r) / d x is non-zero, for one image."""
  module = projectors.build(cfg, in_dim=DV, out_dim=DT)
  r = jnp.asarray(np.random.default_rng(7).standard_normal(DT), jnp.float32)

  def touched(params, x):                                                 # x [1, N, Dv]
    jac = jax.jacrev(lambda x: module.apply({'params': params}, x, grid=grid)[0] @ r)(x)   # [M, 1, N, Dv]
    return jnp.any(jac[:, 0] != 0, axis=-1).reshape(-1, *grid)
  return np.asarray(run_once(touched, params, _x(grid, seed, batch=1)))


def _apply(module, params, x, grid):
  return run_once(lambda p, x: module.apply({'params': p}, x, grid=grid), params, jnp.asarray(x))


# ---------------------------------------------------------------------------------------------------- generic


@pytest.mark.parametrize('case', sorted(CASES))
def test_shape_params_axes(case):
  """Output shape / token count, exact param_count and logical axes, all from abstract evaluation (no compile)."""
  cfg, grid = CASES[case]
  module, boxed = _abstract(cfg, grid)
  params = nn.unbox(boxed)
  x = jax.ShapeDtypeStruct((B, grid[0] * grid[1], DV), jnp.float32)
  y = jax.eval_shape(lambda p, x: module.apply({'params': p}, x, grid=grid), params, x)
  assert y.shape == (B, projectors.num_output_tokens(cfg, grid), DT) and y.dtype == jnp.float32
  assert sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params)) == projectors.param_count(cfg, DV, DT)
  leaves = jax.tree.leaves(boxed, is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned))
  for leaf in leaves:
    assert isinstance(leaf, nn.LogicallyPartitioned), 'every param carries logical axis names'
    assert len(leaf.names) == len(leaf.value.shape) and len(set(leaf.names)) == len(leaf.names), leaf.names
    assert set(leaf.names) <= LOGICAL_NAMES and leaf.value.dtype == jnp.float32, leaf.names


def test_token_counts_and_param_formulas():
  """tokens in -> out and the docstring formulas written out for the shapes-world setting (Dv=96, Dt=128, 6x6)."""
  g = (6, 6)
  assert projectors.num_output_tokens(dict(name='c_abstractor', num_queries=9), g) == 9
  assert projectors.num_output_tokens(dict(name='d_abstractor', num_queries=9), (5, 7)) == 9
  assert projectors.num_output_tokens(dict(name='ldp'), g) == 9
  assert projectors.num_output_tokens(dict(name='ldp'), (5, 7)) == 3 * 4
  assert projectors.num_output_tokens(dict(name='ldpv2'), (5, 7)) == 3 * 4
  assert projectors.num_output_tokens(dict(name='ldpv2', pool=3), g) == 4
  d, dv = 128, 96
  assert projectors.param_count(dict(name='ldpv2'), dv, d) == dv * d + d + d * d + d + 10 * d
  s = 32  # make_divisible(128 // 4, 8)
  assert projectors.param_count(dict(name='ldp'), dv, d) == \
      dv * d + d + d * d + d + 2 * (9 * d + d * d + 4 * d + 2 * d * s + s + d)
  # C-Abstractor, depth 1, Dh = Dv: two identical-width blocks with SE (R = 24), readout 2 layers.
  blk = 96 * 96 + 9 * 96 + 96 * 96 + 6 * 96 + (2 * 96 * 24 + 24 + 96)
  assert projectors.param_count(dict(name='c_abstractor', num_queries=9, depth=1), dv, d) == \
      2 * blk + (96 * d + d) + (d * d + d)


@functools.lru_cache(maxsize=None)
def _init_and_grads(case):
  """Real init and the gradients of a loss at it, w.r.t. params and x, in one compiled function."""
  cfg, grid = CASES[case]
  module = projectors.build(cfg, in_dim=DV, out_dim=DT)

  def run(key, x):
    params = nn.unbox(module.init(key, x, grid=grid)['params'])
    loss = lambda p, x: jnp.mean(module.apply({'params': p}, x, grid=grid) ** 2)
    return params, jax.grad(loss, argnums=(0, 1))(params, x)
  return run_once(run, jax.random.key(1), _x(grid))


@pytest.mark.parametrize('case', ['c_abs_se', 'd_abs_pooled', 'd_abs_learned', 'ldp', 'ldpv2'])
def test_finite_gradients(case):
  _, (gp, gx) = _init_and_grads(case)
  for g in jax.tree.leaves(gp) + [gx]:
    assert bool(jnp.all(jnp.isfinite(g)))
  flat = jax.tree_util.tree_flatten_with_path(gp)[0]
  dead = [jax.tree_util.keystr(k) for k, g in flat if not float(jnp.abs(g).max()) > 0]
  assert not dead, f'params without gradient: {dead}'
  assert float(jnp.abs(gx).max()) > 0


@pytest.mark.parametrize('case', ['c_abs_se', 'd_abs_pooled'])
def test_bfloat16_compute(case):
  """Compute in bfloat16 with float32 params: bfloat16 out, close to the float32 result."""
  cfg, grid = CASES[case]
  params, _ = _init_and_grads(case)
  module = projectors.build(cfg, in_dim=DV, out_dim=DT, dtype=jnp.bfloat16)
  y = _apply(module, params, _x(grid, dtype=jnp.bfloat16), grid)
  assert y.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(y.astype(jnp.float32))))
  y32 = _apply(projectors.build(cfg, in_dim=DV, out_dim=DT), params, _x(grid), grid)
  assert float(jnp.abs(y.astype(jnp.float32) - y32).max()) < 0.05 * float(jnp.abs(y32).max())


# Bad values per field: each alone must raise a ValueError naming model.projector.<field>. The two Honeybee
# abstractors check their shared fields alike.
ABSTRACTOR_BAD = dict(num_queries=(10, 0), depth=(0,), mlp_depth=(0,), hidden_dim=(0,), act=('swish',),
                      pos_emb_grid=((6,), (6, 0), '6x6'))
BAD_VALUES = {
    'c_abstractor': dict(ABSTRACTOR_BAD, se_ratio=(-0.5,)),
    'd_abstractor': dict(ABSTRACTOR_BAD, num_queries=(8, 10, 0), num_heads=(0,), num_points=(0,), ffn_dim=(-1,),
                         query_init=('random',)),
    'ldp': dict(use_se=('yes',), norm_eps=(0,)),
    'ldpv2': dict(pool=(0, 2.0), stride=(2,)),   # stride: not a field of ldpv2
}
BAD_CONFIGS = [(dict(name=name, **{field: value}), field)
               for name, fields in BAD_VALUES.items() for field, values in fields.items() for value in values]
BAD_CONFIGS.append((dict(name='d_abstractor', hidden_dim=30, num_heads=8), 'num_heads'))   # must divide the width


@pytest.mark.parametrize('cfg,field', BAD_CONFIGS)
def test_bad_config_names_field(cfg, field):
  with pytest.raises(ValueError, match=rf'model\.projector\.{field}'):
    projectors.build(cfg, in_dim=DV, out_dim=DT)


@pytest.mark.parametrize('case', ['c_abs_se', 'd_abs_pooled', 'ldp', 'ldpv2'])
def test_token_count_must_match_grid(case):
  cfg, _ = CASES[case]
  module = projectors.build(cfg, in_dim=DV, out_dim=DT)
  with pytest.raises(ValueError, match=r'grid=\(4, 4\)'):
    jax.eval_shape(lambda x: module.init(jax.random.key(0), x, grid=(4, 4)), jnp.zeros((1, 15, DV)))


@pytest.mark.parametrize('case', ['c_abs_pos_prenorm', 'd_abs_pooled'])
def test_position_table_fits_one_grid(case):
  cfg, grid = CASES[case]
  module, params = _random_params(cfg, grid)
  other = (grid[1], grid[0] + 1)
  with pytest.raises(ValueError, match=r'grid=.*model\.projector\.pos_emb_grid'):
    x = jnp.zeros((1, other[0] * other[1], DV))
    jax.eval_shape(lambda x: module.apply({'params': params}, x, grid=other), x)


def test_d_abstractor_heads_must_divide_default_width():
  module = projectors.build(dict(name='d_abstractor', num_heads=5), in_dim=DV, out_dim=DT)
  with pytest.raises(ValueError, match=r'model\.projector\.num_heads=5'):
    jax.eval_shape(lambda x: module.init(jax.random.key(0), x, grid=(4, 4)), jnp.zeros((1, 16, DV)))


# ------------------------------------------------------------------------------------------ bilinear sampler


def _numpy_bilinear(value, loc, align_corners):
  """Direct tent-kernel formula: out[k] = sum_ij relu(1 - |px - j|) relu(1 - |py - i|) value[i, j]."""
  _, hh, ww, _ = value.shape
  if align_corners:
    px, py = loc[..., 0] * (ww - 1), loc[..., 1] * (hh - 1)
  else:
    px, py = loc[..., 0] * ww - 0.5, loc[..., 1] * hh - 0.5
  wx = np.maximum(0.0, 1.0 - np.abs(px[..., None] - np.arange(ww)))       # [B, K, W]
  wy = np.maximum(0.0, 1.0 - np.abs(py[..., None] - np.arange(hh)))       # [B, K, H]
  return np.einsum('bkh,bkw,bhwc->bkc', wy, wx, value)


def _sample_points(rng, b, k, hh, ww):
  """Random points, a margin outside [0, 1] (zero padding), exact pixel centres and the outer edges."""
  pts = rng.uniform(-0.3, 1.3, (b, k, 2))
  centres = np.stack([(rng.integers(0, ww, (b, 4)) + 0.5) / ww, (rng.integers(0, hh, (b, 4)) + 0.5) / hh], -1)
  edges = np.broadcast_to(np.array([[0.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 0.5]]), (b, 4, 2))
  return np.concatenate([pts, centres, edges], 1).astype(np.float32)


@pytest.mark.parametrize('align_corners', [False, True])
@pytest.mark.parametrize('hw', [(5, 7), (1, 4), (6, 6)])
def test_bilinear_sample_matches_numpy_and_torch(align_corners, hw):
  rng = seeded(0)
  hh, ww = hw
  value = rng.standard_normal((2, hh, ww, 3)).astype(np.float32)
  loc = _sample_points(rng, 2, 40, hh, ww)
  ours = bilinear_sample(jnp.asarray(value), jnp.asarray(loc), align_corners=align_corners)
  np.testing.assert_allclose(np.asarray(ours), _numpy_bilinear(value, loc, align_corners), atol=1e-5)
  grid = to_torch(2 * loc - 1)[:, :, None, :]                              # [B, K, 1, 2]
  theirs = F.grid_sample(to_torch(value).permute(0, 3, 1, 2), grid, mode='bilinear', padding_mode='zeros',
                         align_corners=align_corners)                      # [B, C, K, 1]
  assert_close(ours, theirs[..., 0].permute(0, 2, 1))


def test_bilinear_sample_gradients_match_torch():
  """d/d value and d/d loc equal torch autograd through grid_sample (the D-Abstractor learns its offsets)."""
  rng = seeded(1)
  value = rng.standard_normal((2, 5, 7, 3)).astype(np.float32)
  loc = rng.uniform(-0.2, 1.2, (2, 30, 2)).astype(np.float32)
  cot = rng.standard_normal((2, 30, 3)).astype(np.float32)
  gv, gl = jax.grad(lambda v, l: jnp.sum(bilinear_sample(v, l) * cot), argnums=(0, 1))(
      jnp.asarray(value), jnp.asarray(loc))
  tv, tl = to_torch(value).requires_grad_(), to_torch(loc).requires_grad_()
  out = F.grid_sample(tv.permute(0, 3, 1, 2), (2 * tl - 1)[:, :, None, :], mode='bilinear', padding_mode='zeros',
                      align_corners=False)[..., 0].permute(0, 2, 1)
  (out * to_torch(cot)).sum().backward()
  assert_close(gv, tv.grad, what='d/d value')
  assert_close(gl, tl.grad, atol=1e-4, what='d/d loc')


def test_bilinear_sample_far_points_read_zero():
  value = jnp.ones((1, 3, 4, 2))
  loc = jnp.asarray([[[1e9, 0.5], [-jnp.inf, 0.5], [0.5, 3.0], [-1.0, -1.0]]])
  assert float(jnp.abs(bilinear_sample(value, loc)).max()) == 0.0


# ------------------------------------------------------------------------------- D-Abstractor vs HF layers


def _hf_config(d, heads, points, ffn):
  from transformers import DeformableDetrConfig
  return DeformableDetrConfig(d_model=d, decoder_attention_heads=heads, decoder_n_points=points,
                              num_feature_levels=1, decoder_ffn_dim=ffn, activation_function='relu', dropout=0.0,
                              attention_dropout=0.0, activation_dropout=0.0)


def _t(p):
  return p.detach().numpy()


def _check_tree(module, params, x, grid):
  """The torch-converted params have exactly the tree and shapes the module initialises."""
  abstract = jax.eval_shape(lambda x: module.init(jax.random.key(0), x, grid=grid), jnp.asarray(x))
  assert jax.tree.map(lambda s: tuple(s.shape), nn.unbox(abstract['params'])) == jax.tree.map(np.shape, params)


def _lin(m):
  return {'kernel': _t(m.weight).T, 'bias': _t(m.bias)}


def _ln(m):
  return {'scale': _t(m.weight), 'bias': _t(m.bias)}


def _decoder_layer_params(layer, heads):
  d = layer.hidden_size
  dh = d // heads
  sa = layer.self_attn

  def split(m, out_axes):   # torch Linear (out, in) -> our DenseGeneral kernels with heads as axes
    if out_axes:
      return {'kernel': _t(m.weight).T.reshape(d, heads, dh), 'bias': _t(m.bias).reshape(heads, dh)}
    return {'kernel': _t(m.weight).T.reshape(heads, dh, d), 'bias': _t(m.bias)}

  ea = layer.encoder_attn
  return {
      'self_attn': {'q_proj': split(sa.q_proj, True), 'k_proj': split(sa.k_proj, True),
                    'v_proj': split(sa.v_proj, True), 'o_proj': split(sa.o_proj, False)},
      'self_attn_layer_norm': _ln(layer.self_attn_layer_norm),
      'encoder_attn': {k: _lin(getattr(ea, k))
                       for k in ('sampling_offsets', 'attention_weights', 'value_proj', 'output_proj')},
      'encoder_attn_layer_norm': _ln(layer.encoder_attn_layer_norm),
      'mlp': {'fc1': _lin(layer.mlp.fc1), 'fc2': _lin(layer.mlp.fc2)},
      'final_layer_norm': _ln(layer.final_layer_norm),
  }


class TorchDAbstractor(torch.nn.Module):
  """Honeybee's DAbstractor forward (pooled_v_target='tgt', one level, no eos tokens) on a (h, w) grid, built from
  transformers' DeformableDetrDecoderLayer, with the C-Abstractor readout (Linear SiLU Linear)."""

  def __init__(self, dv, d, heads, points, ffn, depth, m, grid, dt):
    super().__init__()
    from transformers.models.deformable_detr.modeling_deformable_detr import DeformableDetrDecoderLayer
    config = _hf_config(d, heads, points, ffn)
    self.grid, self.m = grid, m
    self.input_proj = torch.nn.Linear(dv, d)
    self.v_pos_emb = torch.nn.Parameter(torch.zeros(1, grid[0] * grid[1], d))
    self.query_position_embeddings = torch.nn.Embedding(m * m, d)
    self.reference_points = torch.nn.Parameter(torch.zeros(m * m, 2))
    self.layers = torch.nn.ModuleList([DeformableDetrDecoderLayer(config) for _ in range(depth)])
    self.readout = torch.nn.Sequential(torch.nn.Linear(d, dt), torch.nn.SiLU(), torch.nn.Linear(dt, dt))

  def forward(self, x):
    b = x.shape[0]
    h, w = self.grid
    v = self.input_proj(x) + self.v_pos_emb                               # [B, N, D]
    target = F.adaptive_avg_pool2d(v.transpose(1, 2).reshape(b, -1, h, w), (self.m, self.m))
    target = target.flatten(2).transpose(1, 2)                             # [B, M, D]
    query_pos = self.query_position_embeddings.weight[None].expand(b, -1, -1)
    valid_ratios = torch.ones(b, 1, 2)
    ref = self.reference_points[None].expand(b, -1, -1)[:, :, None] * valid_ratios[:, None]   # [B, M, 1, 2]
    for layer in self.layers:
      target = layer(target, object_queries_position_embeddings=query_pos, reference_points=ref,
                     spatial_shapes=torch.tensor([[h, w]]), spatial_shapes_list=[(h, w)],
                     level_start_index=torch.tensor([0]), encoder_hidden_states=v, encoder_attention_mask=None)
    return self.readout(target)


def test_d_abstractor_matches_hf_deformable_decoder():
  """Full D-Abstractor vs HF DeformableDetrDecoderLayers on a non-square grid with an uneven pool (5x7 -> 3x3),
  random weights everywhere (offsets, attention weights, reference points inside and near the border)."""
  seeded(0)
  dv, d, heads, points, ffn, depth, m, grid = DV, 16, 4, 3, 24, 2, 3, (5, 7)
  ref = TorchDAbstractor(dv, d, heads, points, ffn, depth, m, grid, DT)
  randomize_(ref, seed=0, std=0.5)
  with torch.no_grad():   # offsets of a few pixels, reference points spread over (and a bit past) the map
    ref.reference_points.copy_(torch.rand(m * m, 2) * 1.2 - 0.1)
  cfg = dict(name='d_abstractor', num_queries=m * m, depth=depth, hidden_dim=d, num_heads=heads, num_points=points,
             ffn_dim=ffn, pos_emb_grid=grid)
  module = projectors.build(cfg, in_dim=dv, out_dim=DT)
  params = {'input_proj': _lin(ref.input_proj), 'pos_emb': _t(ref.v_pos_emb)[0],
            'query_pos': _t(ref.query_position_embeddings.weight), 'reference_points': _t(ref.reference_points),
            'readout_1': _lin(ref.readout[0]), 'readout_2': _lin(ref.readout[2])}
  for i, layer in enumerate(ref.layers):
    params[f'layers_{i}'] = _decoder_layer_params(layer, heads)
  x = np.random.default_rng(0).standard_normal((B, grid[0] * grid[1], dv)).astype(np.float32)
  _check_tree(module, params, x, grid)
  with torch.no_grad():
    theirs = ref(to_torch(x))
  assert_close(_apply(module, params, x, grid), theirs)


def test_deformable_attention_init_matches_hf():
  """Deformable DETR's init: zero offset kernel, ring-shaped offset bias per head, uniform point weights."""
  from transformers.models.deformable_detr.modeling_deformable_detr import DeformableDetrDecoder
  cfg, _ = CASES['d_abs_pooled']
  config = _hf_config(16, cfg['num_heads'], cfg['num_points'], 64)
  config.decoder_layers = 1
  hf = DeformableDetrDecoder(config).layers[0].encoder_attn     # post_init runs HF's _init_weights
  params, _ = _init_and_grads('d_abs_pooled')
  ours = params['layers_0']['encoder_attn']
  np.testing.assert_allclose(ours['sampling_offsets']['bias'], _t(hf.sampling_offsets.bias), atol=1e-5)
  assert not ours['sampling_offsets']['kernel'].any() and not ours['attention_weights']['kernel'].any()
  assert not ours['attention_weights']['bias'].any()


def test_reference_points_init_on_pool_cell_centres():
  np.testing.assert_allclose(grid_reference_points(2), [[.25, .25], [.75, .25], [.25, .75], [.75, .75]])
  params, _ = _init_and_grads('d_abs_pooled')
  np.testing.assert_allclose(params['reference_points'], grid_reference_points(3))


# ---------------------------------------------------------------------------- D-Abstractor: sampled points


def _zero_offsets(params):
  params = jax.tree.map(lambda a: a, params)
  for name, layer in params.items():
    if name.startswith('layers_'):
      so = layer['encoder_attn']['sampling_offsets']
      so['kernel'], so['bias'] = jnp.zeros_like(so['kernel']), jnp.zeros_like(so['bias'])
  return params


def _neighbourhood(point, grid):
  """The 2 x 2 bilinear neighbours (inside the grid) of a normalised (x, y) point, align_corners=False."""
  h, w = grid
  px, py = point[0] * w - 0.5, point[1] * h - 0.5
  x0, y0 = int(np.floor(px)), int(np.floor(py))
  mask = np.zeros((h, w), bool)
  for yy in (y0, y0 + 1):
    for xx in (x0, x0 + 1):
      if 0 <= yy < h and 0 <= xx < w:
        mask[yy, xx] = True
  return mask


D_LOCAL = dict(name='d_abstractor', num_queries=4, hidden_dim=16, num_heads=4, num_points=3, query_init='learned',
               pos_emb_grid=(7, 9))
# Generic (off-centre) reference points, one on the map's border so part of its 2 x 2 falls outside.
D_REFS = np.array([[0.2, 0.3], [0.61, 0.17], [0.33, 0.8], [0.02, 0.55]], np.float32)


@pytest.mark.parametrize('depth', [1, 2])
def test_d_abstractor_reads_only_sampled_neighbourhoods(depth):
  """Learned queries, offsets zeroed: every sampling point sits on its query's reference point. With one layer,
  output k depends on x exactly at the 2 x 2 neighbourhood of reference point k; with two, the self-attention of
  layer 2 mixes the queries, so each output depends exactly on the union of all neighbourhoods — never elsewhere."""
  cfg, grid = dict(D_LOCAL, depth=depth), (7, 9)
  _, params = _random_params(cfg, grid)
  params = _zero_offsets(dict(params, reference_points=jnp.asarray(D_REFS)))
  touched = _touched(cfg, params, grid)
  hoods = [_neighbourhood(p, grid) for p in D_REFS]
  union = np.any(hoods, axis=0)
  assert 0 < union.sum() < grid[0] * grid[1] / 2
  for k in range(4):
    np.testing.assert_array_equal(touched[k], hoods[k] if depth == 1 else union, err_msg=f'query {k}')


def test_d_abstractor_offsets_move_the_sampled_points():
  """With offsets (random weights here) the queries read beyond their reference neighbourhoods: the sampling
  offsets are unbounded, so the D-Abstractor is not local by construction."""
  cfg, grid = dict(D_LOCAL, depth=1), (7, 9)
  _, params = _random_params(cfg, grid)
  params = dict(params, reference_points=jnp.asarray(D_REFS))
  touched = _touched(cfg, params, grid)
  for k, p in enumerate(D_REFS):
    assert (touched[k] & ~_neighbourhood(p, grid)).any()


# ------------------------------------------------------------------------------- C-Abstractor vs torch


class TorchLayerNorm2d(torch.nn.LayerNorm):
  """timm LayerNorm2d: LayerNorm over channels of an NCHW map (eps 1e-6)."""

  def __init__(self, c):
    super().__init__(c, eps=1e-6)

  def forward(self, x):
    return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                        self.eps).permute(0, 3, 1, 2)


class TorchBottleneck(torch.nn.Module):
  """timm regnet.Bottleneck(in, out, bottle_ratio=1, group_size=1, se_ratio, act=SiLU, norm=LayerNorm2d) as
  Honeybee's RegStage builds it: ConvNormAct 1x1 -> ConvNormAct 3x3 depthwise -> SEModule -> ConvNorm 1x1,
  + shortcut (1x1 conv + norm when the width changes) -> SiLU."""

  def __init__(self, cin, c, se_ratio):
    super().__init__()
    self.conv1, self.norm1 = torch.nn.Conv2d(cin, c, 1, bias=False), TorchLayerNorm2d(c)
    self.conv2, self.norm2 = torch.nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), TorchLayerNorm2d(c)
    r = int(round(cin * se_ratio))
    self.se = (torch.nn.Conv2d(c, r, 1), torch.nn.Conv2d(r, c, 1)) if se_ratio else None
    if self.se:
      self.fc1, self.fc2 = self.se
    self.conv3, self.norm3 = torch.nn.Conv2d(c, c, 1, bias=False), TorchLayerNorm2d(c)
    self.down = (torch.nn.Conv2d(cin, c, 1, bias=False), TorchLayerNorm2d(c)) if cin != c else None
    if self.down:
      self.down_conv, self.down_norm = self.down

  def forward(self, x):
    y = F.silu(self.norm1(self.conv1(x)))
    y = F.silu(self.norm2(self.conv2(y)))
    if self.se:
      y = y * torch.sigmoid(self.fc2(F.silu(self.fc1(y.mean((2, 3), keepdim=True)))))
    y = self.norm3(self.conv3(y))
    shortcut = self.down_norm(self.down_conv(x)) if self.down else x
    return F.silu(y + shortcut)


class TorchCAbstractor(torch.nn.Module):
  """Honeybee Projector.forward + CAbstractor (prenorm, pos_emb, s1, AdaptiveAvgPool2d, s2, build_mlp readout)."""

  def __init__(self, dv, hidden, dt, depth, m, se_ratio, grid):
    super().__init__()
    self.grid, self.m = grid, m
    self.prenorm = torch.nn.LayerNorm(dv, eps=1e-6)
    self.pos_emb = torch.nn.Parameter(torch.zeros(1, grid[0] * grid[1], dv))
    self.s1 = torch.nn.ModuleList([TorchBottleneck(dv if i == 0 else hidden, hidden, se_ratio) for i in range(depth)])
    self.s2 = torch.nn.ModuleList([TorchBottleneck(hidden, hidden, se_ratio) for _ in range(depth)])
    self.readout = torch.nn.Sequential(torch.nn.Linear(hidden, dt), torch.nn.SiLU(), torch.nn.Linear(dt, dt))

  def forward(self, x):
    x = self.prenorm(x) + self.pos_emb
    x = x.transpose(1, 2).reshape(x.shape[0], -1, *self.grid)              # [B, Dv, h, w]
    for blk in self.s1:
      x = blk(x)
    x = F.adaptive_avg_pool2d(x, (self.m, self.m))
    for blk in self.s2:
      x = blk(x)
    return self.readout(x.flatten(2).transpose(1, 2))


def _conv1x1(conv):
  return {'kernel': _t(conv.weight)[:, :, 0, 0].T}


def _dw(conv):
  c = conv.weight.shape[0]
  return {'kernel': _t(conv.weight).reshape(c, -1).T}


def _bottleneck_params(blk):
  p = {'conv1': _conv1x1(blk.conv1), 'norm1': _ln(blk.norm1), 'conv2': _dw(blk.conv2), 'norm2': _ln(blk.norm2),
       'conv3': _conv1x1(blk.conv3), 'norm3': _ln(blk.norm3)}
  if blk.se:
    p['se'] = {'fc1': {'kernel': _conv1x1(blk.fc1)['kernel'], 'bias': _t(blk.fc1.bias)},
               'fc2': {'kernel': _conv1x1(blk.fc2)['kernel'], 'bias': _t(blk.fc2.bias)}}
  if blk.down:
    p['downsample'], p['downsample_norm'] = _conv1x1(blk.down_conv), _ln(blk.down_norm)
  return p


@pytest.mark.parametrize('se_ratio,grid,m', [(0.25, (5, 7), 3), (0.0, (6, 6), 2), (0.5, (4, 4), 3)])
def test_c_abstractor_matches_torch_reference(se_ratio, grid, m):
  seeded(0)
  hidden, depth = 8, 2
  ref = randomize_(TorchCAbstractor(DV, hidden, DT, depth, m, se_ratio, grid), seed=0, std=0.5)
  cfg = dict(name='c_abstractor', num_queries=m * m, depth=depth, hidden_dim=hidden, se_ratio=se_ratio,
             pos_emb_grid=grid, prenorm=True)
  module = projectors.build(cfg, in_dim=DV, out_dim=DT)
  params = {'prenorm': _ln(ref.prenorm), 'pos_emb': _t(ref.pos_emb)[0],
            's1': {f'b{i + 1}': _bottleneck_params(b) for i, b in enumerate(ref.s1)},
            's2': {f'b{i + 1}': _bottleneck_params(b) for i, b in enumerate(ref.s2)},
            'readout_1': _lin(ref.readout[0]), 'readout_2': _lin(ref.readout[2])}
  x = np.random.default_rng(1).standard_normal((B, grid[0] * grid[1], DV)).astype(np.float32)
  _check_tree(module, params, x, grid)
  with torch.no_grad():
    theirs = ref(to_torch(x))
  assert_close(_apply(module, params, x, grid), theirs)


# ---------------------------------------------------------------------------- C-Abstractor: receptive field


def _torch_pool_windows(n, m):
  """Input range of each of torch adaptive_avg_pool1d's m cells over n inputs, read off its Jacobian."""
  jac = torch.autograd.functional.jacobian(lambda t: F.adaptive_avg_pool1d(t, m), torch.zeros(1, 1, n))
  jac = jac.reshape(m, n).numpy()
  return [(int(np.nonzero(r)[0].min()), int(np.nonzero(r)[0].max())) for r in jac]


def _c_abs_region(i, n, m, depth):
  """Rows (or cols) of the input that output cell i reads: s2 widens by `depth` pooled cells, the pool maps cells
  to windows, s1 widens by `depth` pixels (one 3x3 conv per block)."""
  win = _torch_pool_windows(n, m)
  lo, hi = win[max(i - depth, 0)][0], win[min(i + depth, m - 1)][1]
  return max(lo - depth, 0), min(hi + depth, n - 1)


@pytest.mark.parametrize('grid,m,depth', [((12, 9), 4, 1), ((16, 11), 5, 2)])
def test_c_abstractor_receptive_field(grid, m, depth):
  """Without SE, d y[k] / d x is non-zero exactly on token k's receptive field (a rectangle)."""
  cfg = dict(name='c_abstractor', num_queries=m * m, depth=depth, hidden_dim=8, se_ratio=0.0, prenorm=True,
             pos_emb_grid=grid)
  _, params = _random_params(cfg, grid)
  touched = _touched(cfg, params, grid)
  strictly_inside = 0
  for k in range(m * m):
    (r0, r1), (c0, c1) = _c_abs_region(k // m, grid[0], m, depth), _c_abs_region(k % m, grid[1], m, depth)
    expected = np.zeros(grid, bool)
    expected[r0:r1 + 1, c0:c1 + 1] = True
    strictly_inside += int(expected.sum() < expected.size)
    np.testing.assert_array_equal(touched[k], expected, err_msg=f'output token {k}')
  assert strictly_inside > 0, 'the test grid must leave some receptive field smaller than the map'


def test_c_abstractor_se_gate_is_global():
  """Honeybee's default SE multiplies channels by a gate of the map mean: changing the far corner patch changes
  the first token, although it lies outside that token's conv/pool receptive field."""
  grid, m = (12, 9), 4
  cfg = dict(name='c_abstractor', num_queries=m * m, depth=1, hidden_dim=8)
  module, params = _random_params(cfg, grid)
  x = np.asarray(_x(grid, batch=1))
  far = x.copy()
  far[0, -1] += 1.0          # patch (11, 8); token 0 reads rows 0..6, cols 0..5 without SE
  y = _apply(module, params, np.concatenate([x, far]), grid)
  assert float(jnp.abs(y[0, 0] - y[1, 0]).max()) > 0
  module0 = projectors.build(dict(cfg, se_ratio=0.0), in_dim=DV, out_dim=DT)
  _, params0 = _random_params(dict(cfg, se_ratio=0.0), grid)
  y0 = _apply(module0, params0, np.concatenate([x, far]), grid)
  assert float(jnp.abs(y0[0, 0] - y0[1, 0]).max()) == 0
