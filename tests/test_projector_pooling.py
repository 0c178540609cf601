"""Locality-keeping compressing projectors: pixel_shuffle (Idefics3 / SmolVLM / InternVL), patch_merger
(Qwen2-VL / Qwen2.5-VL) and avg_pool (DeCo / Gemma 3).

Generic checks for every projector (output shape and token count, exact param_count, logical axis names, finite
gradients, receptive field, bad configs), then parity against the transformers modules through mmproj.convert.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parity_utils import assert_close, randomize_, seeded, to_torch

from mmproj import convert, projectors
from mmproj.layers import token_grid

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

DV, DT, B = 6, 10, 2

# (cfg, grid): defaults and the reference-shaped settings, odd grids / odd factors included.
CASES = {
    'pixel_shuffle_idefics3': (dict(name='pixel_shuffle', scale_factor=2), (4, 6)),
    'pixel_shuffle_internvl_s3': (dict(name='pixel_shuffle', scale_factor=3, norm='layernorm', depth=2,
                                       use_bias=True), (6, 3)),
    'pixel_shuffle_rms_depth3': (dict(name='pixel_shuffle', scale_factor=1, norm='rmsnorm', depth=3), (3, 5)),
    'patch_merger_qwen2': (dict(name='patch_merger'), (4, 6)),
    'patch_merger_qwen25_m3': (dict(name='patch_merger', spatial_merge_size=3, norm='rmsnorm'), (3, 6)),
    'avg_pool_deco': (dict(name='avg_pool', output_grid=(2, 3)), (4, 6)),
    'avg_pool_gemma3': (dict(name='avg_pool', output_grid=2, norm='rmsnorm', depth=1, use_bias=False), (6, 6)),
    'avg_pool_adaptive': (dict(name='avg_pool', output_grid=(3, 2), adaptive=True, norm='layernorm'), (5, 7)),
}


def _init(cfg, grid, seed=0):
  """(module, params, boxed abstract params, x). Params are N(0, 0.5) draws in the shapes init gives (no biases or
  scales left at 0/1 to hide a bug; and compiling flax's initialisers costs seconds on CPU)."""
  module = projectors.build(cfg, in_dim=DV, out_dim=DT)
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(B, grid[0] * grid[1], DV)).astype(np.float32))
  boxed = jax.eval_shape(lambda x: module.init(jax.random.key(0), x, grid=grid), x)['params']
  params = jax.tree.map(lambda s: jnp.asarray(0.5 * rng.normal(size=s.shape), s.dtype), nn.unbox(boxed))
  return module, params, boxed, x


def _apply(module, params, x, grid):
  return jax.jit(lambda p, x: module.apply({'params': p}, x, grid=grid))(params, jnp.asarray(x))


def _blocks(grid, s):
  """Expected receptive fields of s x s block merging: one (rows, cols) pair per output token, row-major."""
  h, w = grid
  return [(range(r * s, r * s + s), range(c * s, c * s + s)) for r in range(h // s) for c in range(w // s)]


def _torch_pool_regions(grid, out_grid):
  """Receptive fields of torch's own adaptive_avg_pool2d, read off its Jacobian (independent of our bins)."""
  h, w = grid
  jac = torch.autograd.functional.jacobian(
      lambda t: torch.nn.functional.adaptive_avg_pool2d(t, out_grid), torch.zeros(1, 1, h, w))
  jac = jac.reshape(out_grid[0] * out_grid[1], h, w).numpy()
  return [(sorted(set(np.nonzero(j)[0])), sorted(set(np.nonzero(j)[1]))) for j in jac]


def _expected_regions(cfg, grid):
  if cfg['name'] == 'pixel_shuffle':
    return _blocks(grid, cfg.get('scale_factor', 2))
  if cfg['name'] == 'patch_merger':
    return _blocks(grid, cfg.get('spatial_merge_size', 2))
  og = cfg['output_grid']
  return _torch_pool_regions(grid, (og, og) if isinstance(og, int) else og)


@pytest.mark.parametrize('case', sorted(CASES))
def test_shape_params_axes(case):
  cfg, grid = CASES[case]
  module, params, boxed, x = _init(cfg, grid)
  y = _apply(module, params, x, grid)
  assert y.shape == (B, projectors.num_output_tokens(cfg, grid), DT)
  assert y.dtype == jnp.float32
  n_params = sum(p.size for p in jax.tree.leaves(params))
  assert n_params == projectors.param_count(cfg, DV, DT)
  for leaf in jax.tree.leaves(boxed, is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned)):
    assert isinstance(leaf, nn.LogicallyPartitioned), 'every param carries logical axis names'
    assert len(leaf.names) == leaf.value.ndim and len(set(leaf.names)) == len(leaf.names), leaf.names
    assert leaf.value.dtype == jnp.float32


def test_param_count_formulas():
  """The docstring formulas written out for the shapes-world setting (Dv=96, Dt=128, grid 6x6)."""
  k = 96 * 4
  assert projectors.param_count(dict(name='pixel_shuffle'), 96, 128) == k * 128
  assert projectors.param_count(dict(name='pixel_shuffle', norm='layernorm', depth=2, use_bias=True), 96, 128) \
      == 2 * k + (k * 128 + 128) + (128 * 128 + 128)
  assert projectors.param_count(dict(name='patch_merger', norm='rmsnorm'), 96, 128) \
      == 96 + (k * k + k) + (k * 128 + 128)
  assert projectors.param_count(dict(name='avg_pool', output_grid=3), 96, 128) == (96 * 128 + 128) + (128 * 128 + 128)
  assert projectors.param_count(dict(name='avg_pool', output_grid=3, norm='rmsnorm', depth=1, use_bias=False),
                                96, 128) == 96 + 96 * 128


@pytest.mark.parametrize('case', sorted(CASES))
def test_finite_gradients(case):
  cfg, grid = CASES[case]
  module, params, _, x = _init(cfg, grid)
  loss = lambda p, x: jnp.mean(module.apply({'params': p}, x, grid=grid) ** 2)
  gp, gx = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
  for g in jax.tree.leaves(gp) + [gx]:
    assert bool(jnp.all(jnp.isfinite(g)))
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(gp)), 'every param gets a gradient'


@pytest.mark.parametrize('case', sorted(CASES))
def test_receptive_field(case):
  """d y[0, k] / d x is non-zero exactly on token k's s x s block / pooling window (and zero for the other image)."""
  cfg, grid = CASES[case]
  module, params, _, x = _init(cfg, grid)
  h, w = grid
  jac = jax.jit(jax.jacrev(lambda x: module.apply({'params': params}, x, grid=grid)[0]))(x)  # [M, Dt, B, N, Dv]
  touched = np.asarray(jnp.any(jac != 0, axis=(1, 4)))                                 # [M, B, N]
  regions = _expected_regions(cfg, grid)
  assert len(regions) == touched.shape[0]
  assert not touched[:, 1].any(), 'no mixing across the batch'
  for k, (rows, cols) in enumerate(regions):
    expected = np.zeros((h, w), bool)
    expected[np.ix_(list(rows), list(cols))] = True
    np.testing.assert_array_equal(touched[k, 0].reshape(h, w), expected, err_msg=f'output token {k}')


@pytest.mark.parametrize('cfg,grid,field', [
    (dict(name='pixel_shuffle', scale_factor=2), (5, 6), 'scale_factor'),
    (dict(name='pixel_shuffle', scale_factor=3), (6, 4), 'scale_factor'),
    (dict(name='patch_merger'), (4, 3), 'spatial_merge_size'),
    (dict(name='patch_merger', input_order='windowed'), (3, 4), 'spatial_merge_size'),
    (dict(name='avg_pool', output_grid=(2, 3)), (5, 7), 'output_grid'),
    (dict(name='avg_pool', output_grid=(2, 8), adaptive=True), (5, 7), 'output_grid'),
])
def test_grid_not_divisible_names_field_and_grid(cfg, grid, field):
  module = projectors.build(cfg, in_dim=DV, out_dim=DT)
  x = jnp.zeros((1, grid[0] * grid[1], DV))
  pattern = rf'{grid[0]}x{grid[1]}.*model\.projector\.{field}|model\.projector\.{field}.*{grid[0]}x{grid[1]}'
  with pytest.raises(ValueError, match=pattern):
    module.init(jax.random.key(0), x, grid=grid)
  with pytest.raises(ValueError, match=pattern):
    projectors.num_output_tokens(cfg, grid)


def test_token_count_must_match_grid():
  module = projectors.build(dict(name='pixel_shuffle'), in_dim=DV, out_dim=DT)
  with pytest.raises(ValueError, match=r'grid 4x4 = 16 tokens'):
    module.init(jax.random.key(0), jnp.zeros((1, 15, DV)), grid=(4, 4))


@pytest.mark.parametrize('cfg,field', [
    (dict(name='pixel_shuffle', scale_factor=0), 'scale_factor'),
    (dict(name='pixel_shuffle', norm='batchnorm'), 'norm'),
    (dict(name='pixel_shuffle', depth=0), 'depth'),
    (dict(name='pixel_shuffle', act='tanh'), 'act'),
    (dict(name='patch_merger', spatial_merge_size=2.0), 'spatial_merge_size'),
    (dict(name='patch_merger', norm='none'), 'norm'),
    (dict(name='patch_merger', input_order='column_major'), 'input_order'),
    (dict(name='avg_pool'), 'output_grid'),
    (dict(name='avg_pool', output_grid=(2, 0)), 'output_grid'),
    (dict(name='avg_pool', output_grid=(1, 2, 3)), 'output_grid'),
    (dict(name='avg_pool', output_grid=2, depth=-1), 'depth'),
    (dict(name='avg_pool', output_grid=2, pool=2), 'pool'),
])
def test_bad_config_names_field(cfg, field):
  with pytest.raises(ValueError, match=rf'model\.projector\.{field}'):
    projectors.build(cfg, in_dim=DV, out_dim=DT)


def test_windowed_input_order_equals_row_major():
  """input_order='windowed' on Qwen2-VL-ordered tokens == 'row_major' on the same patches in row-major order."""
  cfg, grid = dict(name='patch_merger', spatial_merge_size=2), (4, 6)
  module, params, _, x = _init(cfg, grid)
  windowed = projectors.build(dict(cfg, input_order='windowed'), in_dim=DV, out_dim=DT)
  x_win = _to_qwen_window_order(np.asarray(x), grid, 2)
  assert_close(_apply(windowed, params, x_win, grid), _apply(module, params, x, grid))


def test_bfloat16_compute():
  """dtype=bfloat16: params stay float32, compute and output in bfloat16, close to float32."""
  cfg, grid = CASES['avg_pool_adaptive']
  module32, params, _, x = _init(cfg, grid)
  module = module32.clone(dtype=jnp.bfloat16)
  abstract = jax.eval_shape(lambda x: module.init(jax.random.key(0), x, grid=grid), x.astype(jnp.bfloat16))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nn.unbox(abstract['params'])))
  y16 = _apply(module, params, x.astype(jnp.bfloat16), grid)
  assert y16.dtype == jnp.bfloat16
  y32 = _apply(module32, params, x, grid)
  np.testing.assert_allclose(np.asarray(y16, np.float32), y32, atol=0.1 * float(jnp.abs(y32).max()))


# ---------------------------------------------------------------------------------------------------- parity


def _check_port(module, params, x, grid):
  """The converted params have exactly the tree and shapes the module initialises (a trainable checkpoint)."""
  init = nn.unbox(jax.eval_shape(lambda x: module.init(jax.random.key(0), x, grid=grid), jnp.asarray(x))['params'])
  assert jax.tree.structure(init) == jax.tree.structure(params)
  assert jax.tree.map(np.shape, init) == jax.tree.map(np.shape, params)


def test_space_to_depth_matches_both_references():
  """Idefics3 and InternVL order the s*s*Dv channels identically (i, j, d); ours matches both, non-square too."""
  from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector
  from transformers.models.internvl.modeling_internvl import InternVLModel
  rng = seeded(0)
  for (h, w), s in [((6, 6), 2), ((6, 6), 3), ((8, 8), 4), ((4, 6), 2)]:
    x = rng.normal(size=(B, h * w, 5)).astype(np.float32)
    ours = token_grid.space_to_depth(jnp.asarray(x), (h, w), s)
    if s != 3:  # InternVL checks `height % (1/s)` in floats, which fails for 1/3
      internvl = InternVLModel.pixel_shuffle(None, to_torch(x).reshape(B, h, w, 5), scale_factor=1 / s)
      assert_close(ours, internvl.reshape(B, -1, 5 * s * s), atol=0, what='InternVL pixel_shuffle')
    if h == w:  # Idefics3's shuffle assumes a square grid
      assert_close(ours, Idefics3Connector.pixel_shuffle(None, to_torch(x), s), atol=0, what='Idefics3')


@pytest.mark.parametrize('cls_name,dv,dt,s,side', [
    ('Idefics3Connector', 6, 10, 2, 6),
    ('Idefics3Connector', 5, 7, 3, 9),
    ('SmolVLMConnector', 3, 8, 4, 8),
])
def test_idefics3_connector_parity(cls_name, dv, dt, s, side):
  if cls_name == 'SmolVLMConnector':
    from transformers import SmolVLMConfig as Config
    from transformers.models.smolvlm.modeling_smolvlm import SmolVLMConnector as Connector
  else:
    from transformers import Idefics3Config as Config
    from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector as Connector
  cfg = Config(vision_config=dict(hidden_size=dv, num_attention_heads=1), scale_factor=s,
               text_config=dict(hidden_size=dt, num_attention_heads=1, num_key_value_heads=1, head_dim=4))
  hf = randomize_(Connector(cfg))
  x = seeded(1).normal(size=(B, side * side, dv)).astype(np.float32)
  module, params = convert.from_transformers(hf)
  assert module.scale_factor == s and module.in_dim == dv
  _check_port(module, params, x, (side, side))
  with torch.no_grad():
    ref = hf(to_torch(x))
  assert_close(_apply(module, params, x, (side, side)), ref)


def _internvl_reference(proj, features, downsample_ratio):
  """InternVLModel.get_image_features after the vision tower, line for line: square grid, pixel_shuffle, flatten,
  multi_modal_projector."""
  from transformers.models.internvl.modeling_internvl import InternVLModel
  batch_size, channels = features.shape[0], features.shape[1]
  feature_size = int(channels ** 0.5)
  features = features.reshape(batch_size, feature_size, feature_size, -1)
  features = InternVLModel.pixel_shuffle(None, features, scale_factor=downsample_ratio)
  features = features.reshape(batch_size, -1, features.shape[-1])
  return proj(features)


@pytest.mark.parametrize('dv,dt,ratio,side,act', [
    (6, 10, 0.5, 6, 'gelu'),
    (3, 7, 0.25, 8, 'gelu_pytorch_tanh'),
    (5, 9, 0.5, 10, 'silu'),
])
def test_internvl_projector_parity(dv, dt, ratio, side, act):
  from transformers import InternVLConfig
  from transformers.models.internvl.modeling_internvl import InternVLMultiModalProjector
  cfg = InternVLConfig(vision_config=dict(hidden_size=dv, num_attention_heads=1), downsample_ratio=ratio,
                       text_config=dict(model_type='qwen2', hidden_size=dt, num_attention_heads=1,
                                        num_key_value_heads=1), projector_hidden_act=act)
  hf = randomize_(InternVLMultiModalProjector(cfg))
  x = seeded(2).normal(size=(B, side * side, dv)).astype(np.float32)
  if ratio == 0.5:
    module, params = convert.from_transformers(hf)
  else:  # the projector's weights only hold Dv / ratio^2: the ratio is passed in
    module, params = convert.internvl.internvl_projector(hf, downsample_ratio=ratio)
  assert module.scale_factor == round(1 / ratio) and module.in_dim == dv
  _check_port(module, params, x, (side, side))
  with torch.no_grad():
    ref = _internvl_reference(hf, to_torch(x), ratio)
  assert_close(_apply(module, params, x, (side, side)), ref)


def test_internvl_bad_ratio_is_named():
  from transformers import InternVLConfig
  from transformers.models.internvl.modeling_internvl import InternVLMultiModalProjector
  cfg = InternVLConfig(vision_config=dict(hidden_size=3, num_attention_heads=1), downsample_ratio=0.5,
                       text_config=dict(model_type='qwen2', hidden_size=8, num_attention_heads=1,
                                        num_key_value_heads=1))
  with pytest.raises(ValueError, match=r'downsample_ratio=0.4'):
    convert.internvl.internvl_projector(InternVLMultiModalProjector(cfg), downsample_ratio=0.4)
  with pytest.raises(ValueError, match=r'downsample_ratio=0.25.*layer_norm width 12'):
    convert.internvl.internvl_projector(InternVLMultiModalProjector(cfg), downsample_ratio=0.25)


def _to_qwen_window_order(x, grid, m):
  """Row-major tokens [B, h*w, D] -> Qwen2-VL's vision-tower order, taken from transformers' own
  get_vision_position_ids (the (row, col) of every token of the merged-window sequence)."""
  from transformers.vision_utils import get_vision_position_ids
  h, w = grid
  pos = get_vision_position_ids(torch.tensor([[1, h, w]]), m).numpy()             # [h*w, 2] (row, col)
  return np.asarray(x)[:, pos[:, 0] * w + pos[:, 1]]


@pytest.mark.parametrize('cls_name', ['PatchMerger', 'Qwen2_5_VLPatchMerger'])
@pytest.mark.parametrize('dv,dt,m,grid', [(6, 10, 2, (4, 6)), (5, 7, 3, (3, 6)), (4, 9, 2, (2, 2))])
def test_qwen2_vl_patch_merger_parity(cls_name, dv, dt, m, grid):
  if cls_name == 'PatchMerger':
    from transformers.models.qwen2_vl.modeling_qwen2_vl import PatchMerger as Merger
  else:
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLPatchMerger as Merger
  hf = randomize_(Merger(dim=dt, context_dim=dv, spatial_merge_size=m))
  module, params = convert.from_transformers(hf)
  assert (module.spatial_merge_size, module.input_order) == (m, 'windowed')
  assert module.norm == ('layernorm' if cls_name == 'PatchMerger' else 'rmsnorm')
  n, n_out = grid[0] * grid[1], grid[0] * grid[1] // (m * m)
  x_row = seeded(3).normal(size=(B, n, dv)).astype(np.float32)                    # row-major encoder tokens
  x_win = _to_qwen_window_order(x_row, grid, m)                                   # the reference's order
  _check_port(module, params, x_win, grid)
  with torch.no_grad():  # the reference takes the images' windowed sequences concatenated: [B*n, Dv]
    ref = hf(to_torch(x_win.reshape(B * n, dv))).reshape(B, n_out, dt)
  # 1) the port, on the reference's own input (one image per batch row)
  assert_close(_apply(module, params, x_win, grid), ref, what='windowed')
  assert_close(_apply(module, params, x_win[:1], grid), ref[:1], what='one image')
  # 2) the same params on row-major tokens, as mmproj's encoder emits them
  row_major = module.clone(input_order='row_major')
  assert_close(_apply(row_major, params, x_row, grid), ref, what='row_major')


def _gemma3_projector(dv, dt, side, tokens_per_side, eps=1e-6):
  from transformers import Gemma3Config
  from transformers.models.gemma3.modeling_gemma3 import Gemma3MultiModalProjector
  patch = 2
  cfg = Gemma3Config(
      vision_config=dict(model_type='siglip_vision_model', hidden_size=dv, num_attention_heads=1,
                         image_size=side * patch, patch_size=patch, layer_norm_eps=eps),
      text_config=dict(hidden_size=dt, num_attention_heads=1, num_key_value_heads=1, head_dim=4),
      mm_tokens_per_image=tokens_per_side ** 2)
  return randomize_(Gemma3MultiModalProjector(cfg))


@pytest.mark.parametrize('dv,dt,side,tokens_per_side,eps', [
    (6, 10, 6, 3, 1e-6),
    (5, 7, 9, 3, 1e-5),
    (4, 8, 8, 2, 1e-6),
    (3, 5, 5, 5, 1e-6),   # kernel 1: the norm and projection alone
])
def test_gemma3_projector_parity(dv, dt, side, tokens_per_side, eps):
  hf = _gemma3_projector(dv, dt, side, tokens_per_side, eps)
  module, params = convert.from_transformers(hf)
  assert tuple(module.output_grid) == (tokens_per_side, tokens_per_side) and module.norm_eps == eps
  x = seeded(4).normal(size=(B, side * side, dv)).astype(np.float32)
  _check_port(module, params, x, (side, side))
  with torch.no_grad():
    ref = hf(to_torch(x))
  assert_close(_apply(module, params, x, (side, side)), ref)


def test_gemma3_dropping_pool_is_refused():
  hf = _gemma3_projector(4, 8, 7, 3)   # AvgPool2d(2) on 7x7 would silently drop the last row and column
  with pytest.raises(ValueError, match=r'patches_per_image=7 is not divisible by the pooling kernel 2'):
    convert.from_transformers(hf)


@pytest.mark.parametrize('grid,out_grid,adaptive', [((5, 7), (3, 2), True), ((4, 6), (2, 3), False),
                                                    ((6, 4), (4, 3), True), ((3, 5), (1, 1), False)])
def test_deco_parity_non_square(grid, out_grid, adaptive):
  """DeCo = torch adaptive_avg_pool2d on the (non-square) grid + LLaVA-1.5's mlp2x_gelu, against torch."""
  from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
  from transformers.models.llava.modeling_llava import LlavaMultiModalProjector
  llava = randomize_(LlavaMultiModalProjector(LlavaConfig(
      vision_config=CLIPVisionConfig(hidden_size=DV, num_attention_heads=1),
      text_config=LlamaConfig(hidden_size=DT, num_attention_heads=1, num_key_value_heads=1))))
  _, mlp_params = convert.from_transformers(llava)
  module = projectors.build(dict(name='avg_pool', output_grid=out_grid, adaptive=adaptive), in_dim=DV, out_dim=DT)
  params = {'mlp': mlp_params}
  h, w = grid
  x = seeded(5).normal(size=(B, h * w, DV)).astype(np.float32)
  _check_port(module, params, x, grid)
  with torch.no_grad():
    pooled = torch.nn.functional.adaptive_avg_pool2d(to_torch(x).transpose(1, 2).reshape(B, DV, h, w), out_grid)
    ref = llava(pooled.flatten(2).transpose(1, 2))
    pooled = pooled.flatten(2).transpose(1, 2)
  assert_close(token_grid.avg_pool_2d(jnp.asarray(x), grid, out_grid), pooled, what='pooling')
  assert_close(_apply(module, params, x, grid), ref)
