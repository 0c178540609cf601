"""MobileVLM LDP and MobileVLM V2 LDPv2: parity with torch references transcribed from MobileVLM's code
(torchvision MobileNetV3 InvertedResidual with timm LayerNormAct2d and SqueezeExcitation; AdaptiveAvgPool2d + PEG)
on odd and even grids, the depthwise conv vs torch, and exact receptive fields. Generic checks (shapes, param
counts, gradients, bad configs) for both are in test_projector_abstractors.py.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parity_utils import assert_close, randomize_, seeded, to_torch

from mmproj import projectors
from mmproj.layers.feature_map import DepthwiseConv2d, conv_out_size

torch = pytest.importorskip('torch')
F = torch.nn.functional

DV, DT, B = 12, 16, 2


def run_once(fn, *args):
  """jit fn, compile at XLA backend optimisation level 0 (each graph runs once: compile time is the cost)."""
  return jax.jit(fn).lower(*args).compile(compiler_options={'xla_backend_optimization_level': 0})(*args)


def _x(grid, seed=0, batch=B):
  return np.random.default_rng(seed).standard_normal((batch, grid[0] * grid[1], DV)).astype(np.float32)


def _t(p):
  return p.detach().numpy()


def _lin(m):
  return {'kernel': _t(m.weight).T, 'bias': _t(m.bias)}


def _ln(m):
  return {'scale': _t(m.weight), 'bias': _t(m.bias)}


def _conv1x1(conv, bias=False):
  p = {'kernel': _t(conv.weight)[:, :, 0, 0].T}
  if bias:
    p['bias'] = _t(conv.bias)
  return p


def _dw(conv, bias=False):
  c = conv.weight.shape[0]
  p = {'kernel': _t(conv.weight).reshape(c, -1).T}
  if bias:
    p['bias'] = _t(conv.bias)
  return p


def _check_tree(module, params, x, grid):
  abstract = jax.eval_shape(lambda x: module.init(jax.random.key(0), x, grid=grid), jnp.asarray(x))
  assert jax.tree.map(lambda s: tuple(s.shape), nn.unbox(abstract['params'])) == jax.tree.map(np.shape, params)


def _apply(module, params, x, grid):
  return run_once(lambda p, x: module.apply({'params': p}, x, grid=grid), params, jnp.asarray(x))


# ------------------------------------------------------------------------------------------ depthwise conv


@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize('hw', [(5, 7), (6, 6), (1, 2)])
def test_depthwise_conv_matches_torch(stride, hw):
  rng = seeded(0)
  c = 4
  conv = torch.nn.Conv2d(c, c, 3, stride, 1, groups=c, bias=True)
  randomize_(conv)
  x = rng.standard_normal((2, *hw, c)).astype(np.float32)
  params = _dw(conv, bias=True)
  ours = DepthwiseConv2d(3, stride, use_bias=True).apply({'params': params}, jnp.asarray(x))
  with torch.no_grad():
    theirs = conv(to_torch(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
  assert ours.shape[1:3] == (conv_out_size(hw[0], 3, stride), conv_out_size(hw[1], 3, stride))
  assert_close(ours, theirs)


# ----------------------------------------------------------------------------------------------------- LDP


def make_divisible(v, divisor=8, min_value=None):
  """torchvision.models._utils._make_divisible, as MobileNetV3 sizes its SE layers."""
  min_value = min_value or divisor
  new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
  if new_v < 0.9 * v:
    new_v += divisor
  return new_v


class LayerNormAct2d(torch.nn.LayerNorm):
  """timm LayerNormAct2d(act_layer=None): LayerNorm over channels of NCHW (eps 1e-5), no activation."""

  def forward(self, x):
    return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                        self.eps).permute(0, 3, 1, 2)


class InvertedResidual(torch.nn.Module):
  """torchvision InvertedResidual(InvertedResidualConfig(C, 3, C, C, use_se, 'HS', stride, 1, 1), LayerNormAct2d,
  SqueezeExcitation(scale_activation=Hardsigmoid)): no expand conv (expanded == input), depthwise ConvNormAct
  (Hardswish), SE (ReLU, hard-sigmoid), project ConvNorm; residual iff stride 1."""

  def __init__(self, c, stride, use_se):
    super().__init__()
    self.stride, self.use_se = stride, use_se
    self.dw = torch.nn.Conv2d(c, c, 3, stride, 1, groups=c, bias=False)
    self.dw_norm = LayerNormAct2d(c)
    if use_se:
      s = make_divisible(c // 4, 8)
      self.fc1, self.fc2 = torch.nn.Conv2d(c, s, 1), torch.nn.Conv2d(s, c, 1)
    self.pw = torch.nn.Conv2d(c, c, 1, bias=False)
    self.pw_norm = LayerNormAct2d(c)

  def forward(self, x):
    y = F.hardswish(self.dw_norm(self.dw(x)))
    if self.use_se:
      y = y * F.hardsigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(y, 1)))))
    y = self.pw_norm(self.pw(y))
    return y + x if self.stride == 1 else y


class TorchLDP(torch.nn.Module):
  """MobileVLM LDPBlock on an (h, w) grid: mlp (Linear GELU Linear) -> mb_block (stride 1, stride 2)."""

  def __init__(self, dv, d, use_se, grid):
    super().__init__()
    self.grid = grid
    self.mlp = torch.nn.Sequential(torch.nn.Linear(dv, d), torch.nn.GELU(), torch.nn.Linear(d, d))
    self.blocks = torch.nn.ModuleList([InvertedResidual(d, 1, use_se), InvertedResidual(d, 2, use_se)])

  def forward(self, x):
    x = self.mlp(x)
    x = x.permute(0, 2, 1).reshape(x.shape[0], -1, *self.grid)
    for blk in self.blocks:
      x = blk(x)
    return x.flatten(2).permute(0, 2, 1)


def _ldp_params(ref):
  p = {'linear_1': _lin(ref.mlp[0]), 'linear_2': _lin(ref.mlp[2])}
  for i, blk in enumerate(ref.blocks):
    b = {'depthwise': _dw(blk.dw), 'depthwise_norm': _ln(blk.dw_norm), 'project': _conv1x1(blk.pw),
         'project_norm': _ln(blk.pw_norm)}
    if blk.use_se:
      b['se'] = {'fc1': _conv1x1(blk.fc1, bias=True), 'fc2': _conv1x1(blk.fc2, bias=True)}
    p[f'block_{i + 1}'] = b
  return p


@pytest.mark.parametrize('use_se,grid,d', [(True, (5, 7), DT), (False, (6, 6), DT), (True, (4, 3), 40)])
def test_ldp_matches_torch_reference(use_se, grid, d):
  """Odd grids included (the stride-2 conv keeps the last row/column: ceil(h/2) x ceil(w/2)); d=40 gives SE width
  make_divisible(10, 8) = 16 (the round-up branch)."""
  seeded(0)
  ref = randomize_(TorchLDP(DV, d, use_se, grid), seed=0, std=0.5)
  module = projectors.build(dict(name='ldp', use_se=use_se), in_dim=DV, out_dim=d)
  params, x = _ldp_params(ref), _x(grid)
  _check_tree(module, params, x, grid)
  with torch.no_grad():
    theirs = ref(to_torch(x))
  assert theirs.shape[1] == projectors.num_output_tokens(dict(name='ldp'), grid)
  assert_close(_apply(module, params, x, grid), theirs)


# --------------------------------------------------------------------------------------------------- LDPv2


class TorchLDPv2(torch.nn.Module):
  """MobileVLM V2 LDPNetV2Projector on an (h, w) grid: FeatureIRLayer -> TokenDownLayer (AdaptiveAvgPool2d to
  ceil(h/pool) x ceil(w/pool); MobileVLM V2 uses (12, 12) on 24 x 24) -> PosInjectLayer (PEG + residual)."""

  def __init__(self, dv, d, grid, pool):
    super().__init__()
    self.grid, self.out = grid, (-(-grid[0] // pool), -(-grid[1] // pool))
    self.mlp = torch.nn.Sequential(torch.nn.Linear(dv, d), torch.nn.GELU(), torch.nn.Linear(d, d))
    self.peg = torch.nn.Conv2d(d, d, 3, 1, 1, bias=True, groups=d)

  def forward(self, x):
    x = self.mlp(x)
    x = x.permute(0, 2, 1).reshape(x.shape[0], -1, *self.grid)
    x = F.adaptive_avg_pool2d(x, self.out)
    x = self.peg(x) + x
    return x.flatten(2).transpose(1, 2)


@pytest.mark.parametrize('grid,pool', [((6, 6), 2), ((5, 7), 2), ((7, 8), 3)])
def test_ldpv2_matches_torch_reference(grid, pool):
  seeded(0)
  ref = randomize_(TorchLDPv2(DV, DT, grid, pool), seed=0, std=0.5)
  module = projectors.build(dict(name='ldpv2', pool=pool), in_dim=DV, out_dim=DT)
  params = {'linear_1': _lin(ref.mlp[0]), 'linear_2': _lin(ref.mlp[2]), 'peg': _dw(ref.peg, bias=True)}
  x = _x(grid)
  _check_tree(module, params, x, grid)
  with torch.no_grad():
    theirs = ref(to_torch(x))
  assert theirs.shape[1] == projectors.num_output_tokens(dict(name='ldpv2', pool=pool), grid)
  assert_close(_apply(module, params, x, grid), theirs)


# ------------------------------------------------------------------------------------------ receptive fields


def _random_params(cfg, grid, seed=0, std=0.3):
  module = projectors.build(cfg, in_dim=DV, out_dim=DT)
  x = jax.ShapeDtypeStruct((1, grid[0] * grid[1], DV), jnp.float32)
  shapes = nn.unbox(jax.eval_shape(lambda x: module.init(jax.random.key(0), x, grid=grid), x)['params'])
  rng = np.random.default_rng(seed)
  return module, jax.tree.map(lambda s: jnp.asarray(rng.normal(0, std, s.shape), jnp.float32), shapes)


def _touched(module, params, grid):
  """[M, h, w]: where d (y[0, k] . r) / d x is non-zero, for one image."""
  r = jnp.asarray(np.random.default_rng(7).standard_normal(DT), jnp.float32)

  def touched(params, x):
    jac = jax.jacrev(lambda x: module.apply({'params': params}, x, grid=grid)[0] @ r)(x)   # [M, 1, N, Dv]
    return jnp.any(jac[:, 0] != 0, axis=-1).reshape(-1, *grid)
  return np.asarray(run_once(touched, params, jnp.asarray(_x(grid, batch=1))))


def _torch_pool_windows(n, m):
  """(first, last) input index of each of torch adaptive_avg_pool1d's m cells over n inputs, from its Jacobian."""
  jac = torch.autograd.functional.jacobian(lambda t: F.adaptive_avg_pool1d(t, m), torch.zeros(1, 1, n))
  jac = jac.reshape(m, n).numpy()
  return [(int(np.nonzero(r)[0].min()), int(np.nonzero(r)[0].max())) for r in jac]


def _check_regions(touched, grid, out_grid, region):
  rows, cols = out_grid
  assert touched.shape == (rows * cols, *grid)
  for k in range(rows * cols):
    (r0, r1), (c0, c1) = region(k // cols, grid[0], rows), region(k % cols, grid[1], cols)
    expected = np.zeros(grid, bool)
    expected[r0:r1 + 1, c0:c1 + 1] = True
    np.testing.assert_array_equal(touched[k], expected, err_msg=f'output token {k}')


@pytest.mark.parametrize('grid', [(9, 8)])
def test_ldp_receptive_field(grid):
  """SE-free LDP: output (i, j) reads exactly input rows 2i-2..2i+2, cols 2j-2..2j+2 (clipped)."""
  module, params = _random_params(dict(name='ldp', use_se=False), grid)
  out = (-(-grid[0] // 2), -(-grid[1] // 2))
  _check_regions(_touched(module, params, grid), grid, out,
                 lambda i, n, m: (max(2 * i - 2, 0), min(2 * i + 2, n - 1)))


def test_ldp_se_gate_is_global():
  """With SE (MobileVLM's code) the squeeze over the whole map reaches every token: the far corner patch changes
  the first output token, though it lies outside that token's conv receptive field."""
  grid = (9, 8)
  x = _x(grid, batch=1)
  far = x.copy()
  far[0, -1] += 1.0
  for use_se in (True, False):
    module, params = _random_params(dict(name='ldp', use_se=use_se), grid)
    y = _apply(module, params, np.concatenate([x, far]), grid)
    assert (float(jnp.abs(y[0, 0] - y[1, 0]).max()) > 0) == use_se


@pytest.mark.parametrize('grid,pool', [((10, 9), 2), ((11, 7), 3)])
def test_ldpv2_receptive_field(grid, pool):
  """Output (i, j) reads exactly the pool windows of pooled cells i-1..i+1, j-1..j+1 (the PEG's 3x3), clipped;
  windows taken from torch's own adaptive_avg_pool1d Jacobian (uneven on odd sizes)."""
  module, params = _random_params(dict(name='ldpv2', pool=pool), grid)
  out = (-(-grid[0] // pool), -(-grid[1] // pool))

  def region(i, n, m):
    win = _torch_pool_windows(n, m)
    return win[max(i - 1, 0)][0], win[min(i + 1, m - 1)][1]
  _check_regions(_touched(module, params, grid), grid, out, region)
