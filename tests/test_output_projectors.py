"""Output projectors (mmproj/output_projectors): signal-token states [B, K, D_lm] -> generator conditioning
[B, L, Dc].

Output shapes and dtypes over several (K, L, widths), K == L and K != L, odd sizes (traced only); the documented
parameter count against the initialised tree; logical axis names; gradients reaching every parameter through an
MSE; a few Adam steps fitting a fixed random target; the MLP's per-token map when K == L; dropout acting only
when deterministic=False; config errors naming model.output.projector.<field>; the unknown-name error.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mmproj import output_projectors

LOGICAL_NAMES = {'embed', 'mlp', 'heads', 'kv_heads', 'head_dim', 'norm', 'pos', None}

# name -> (cfg, D_lm, K, L, Dc): both families, K < L, K > L and K == L, odd widths.
CASES = {
    'mlp_mix': (dict(name='mlp', hidden_dim=12), 10, 4, 7, 6),
    'mlp_same': (dict(name='mlp', depth=1), 9, 5, 5, 7),
    'mlp_deep': (dict(name='mlp', depth=3, hidden_dim=5, act='silu', dropout=0.2), 11, 3, 2, 5),
    'transformer': (dict(name='transformer', d_model=12, num_heads=3, mlp_dim=20, encoder_depth=1, decoder_depth=1,
                         dropout=0.2), 10, 4, 7, 6),
    'transformer_noenc': (dict(name='transformer', d_model=8, num_heads=2, encoder_depth=0, decoder_depth=1,
                               act='gelu'), 7, 3, 3, 5),
}
GRAD_CASES = ('mlp_mix', 'mlp_same', 'mlp_deep', 'transformer')
FIT_CASES = ('mlp_mix', 'transformer')       # the Adam fit (reusing the gradient test's compiled function)
DROPOUT_CASES = ('mlp_deep', 'transformer')  # dropout > 0


def normal(seed, shape):
  """float32 N(0, 1) from numpy (eager jax.random would compile a sampler per shape)."""
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def build(case, dtype=jnp.float32):
  cfg, d_lm, k, l, dc = CASES[case]
  proj = output_projectors.build(ml_collections.ConfigDict(cfg), in_dim=d_lm, num_signal_tokens=k, out_len=l,
                                 out_dim=dc, dtype=dtype)
  return proj, normal(0, (3, k, d_lm)), normal(1, (3, l, dc))     # h [B, K, D_lm], target [B, L, Dc]


def mse(proj, params, h, target, **kw):
  """Mean squared error of the projector's output to target [B, L, Dc]."""
  y = proj.apply({'params': params}, h, **kw)                      # [B, L, Dc]
  return jnp.mean(jnp.square(y - target))


@functools.cache
def built(case):
  """build(case), once per case: (proj, h, target)."""
  return build(case)


@functools.cache
def random_params(case, std=0.3):
  """N(0, std) params of the case's tree (from jax.eval_shape: no initializer compiles); random norm scales and
  biases rather than ones and zeros keep the numerical checks meaningful."""
  proj, h, _ = built(case)
  shapes = nn.unbox(jax.eval_shape(lambda: proj.init(jax.random.key(0), h))['params'])
  rng = np.random.default_rng(2)
  return jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape) * std, jnp.float32), shapes)


@functools.cache
def real_params(case):
  """The params the real initializers give (one compile of init)."""
  proj, h, _ = built(case)
  return nn.unbox(jax.jit(proj.init)(jax.random.key(0), h)['params'])    # the tree random_params gives


@functools.cache
def loss_and_grad(case):
  """The jitted MSE and its gradient w.r.t. the params, for the case's fixed h and target (one compile)."""
  proj, h, target = built(case)
  return jax.jit(jax.value_and_grad(lambda p: mse(proj, p, h, target)))


# ------------------------------------------------------------------------------------------ shapes and counts

@pytest.mark.parametrize('name,extra', [('mlp', dict(depth=2)), ('mlp', dict(depth=1)),
                                        ('transformer', dict(d_model=6, num_heads=2, encoder_depth=2,
                                                             decoder_depth=3))])
@pytest.mark.parametrize('d_lm,k,l,dc', [(8, 4, 4, 8), (13, 1, 7, 5), (5, 6, 3, 11), (16, 8, 77, 12)])
def test_output_shape_and_param_count(name, extra, d_lm, k, l, dc):
  cfg = dict(name=name, **extra)
  proj = output_projectors.build(cfg, in_dim=d_lm, num_signal_tokens=k, out_len=l, out_dim=dc)
  h = jax.ShapeDtypeStruct((2, k, d_lm), jnp.float32)
  boxed = jax.eval_shape(lambda h: proj.init(jax.random.key(0), h), h)['params']     # traced, not compiled
  params = nn.unbox(boxed)
  y = jax.eval_shape(lambda p, h: proj.apply({'params': p}, h), params, h)
  assert y.shape == (2, l, dc) and y.dtype == jnp.float32
  n = sum(a.size for a in jax.tree.leaves(params))
  assert n == proj.param_count() == output_projectors.param_count(cfg, d_lm, k, l, dc)
  assert {a.dtype for a in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  for path, leaf in jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda a: isinstance(a, nn.Partitioned)):
    assert isinstance(leaf, nn.Partitioned), f'{jax.tree_util.keystr(path)} has no logical axis names'
    assert set(leaf.names) <= LOGICAL_NAMES and len(leaf.names) == leaf.value.ndim, jax.tree_util.keystr(path)
  if name == 'mlp':     # the token mixing exists exactly when K != L
    assert ('mix_kernel' in params) == (k != l) and ('mix_bias' in params) == (k != l)


@pytest.mark.parametrize('case', sorted(CASES))
def test_param_count_matches_the_initialised_tree(case):
  cfg, d_lm, k, l, dc = CASES[case]
  proj, h, _ = built(case)
  shapes = jax.eval_shape(lambda: proj.init(jax.random.key(0), h))['params']
  assert sum(a.size for a in jax.tree.leaves(nn.unbox(shapes))) == proj.param_count()
  assert output_projectors.param_count(cfg, d_lm, k, l, dc) == proj.param_count()


def test_param_count_formulas_by_hand():
  """The docstrings' formulas at GILLMapper's default sizes (d 512, 4 + 4 layers, FF 2048) and an MLP."""
  d, f = 512, 2048
  attn, ff = 4 * d * d + 4 * d, 2 * d * f + f + d
  gill = (4096 * d + d) + 77 * d + 4 * (4 * d + attn + ff) + 2 * d + 4 * (6 * d + 2 * attn + ff) + 2 * d + d * 768 + 768
  assert output_projectors.param_count(dict(name='transformer'), 4096, 8, 77, 768) == gill
  mlp = (32 * 16 + 16) + 2 * (16 * 16 + 16) + (16 * 24 + 24) + 4 * 9 + 9 * 24
  assert output_projectors.param_count(dict(name='mlp', depth=4, hidden_dim=16), 32, 4, 9, 24) == mlp


def test_bf16_compute_keeps_f32_params():
  proj, h, _ = build('transformer', dtype=jnp.bfloat16)
  params = nn.unbox(jax.eval_shape(lambda: proj.init(jax.random.key(0), h))['params'])
  assert {a.dtype for a in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  assert jax.eval_shape(lambda p: proj.apply({'params': p}, h), params).dtype == jnp.bfloat16


# ---------------------------------------------------------------------------------------- gradients, fitting

# One compiled backward per case (compiling dominates the run time); transformer_noenc runs forward below.
@pytest.mark.parametrize('case', GRAD_CASES)
def test_gradients_reach_every_parameter(case):
  loss, grads = loss_and_grad(case)(random_params(case))
  assert np.isfinite(loss)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.all(np.isfinite(g)), f'{jax.tree_util.keystr(path)}: non-finite gradient'
    assert np.any(g != 0), f'{jax.tree_util.keystr(path)} gets no gradient'


@pytest.mark.parametrize('case', FIT_CASES)
def test_adam_fits_a_fixed_random_target(case):
  """From the real initializers, 100 Adam steps (lr 3e-2) on one fixed batch bring the MSE to a random N(0, 1)
  target below 1/10 of its start (about 1/17 for mlp_mix, 1/10^4 for the transformer). The loss and gradient
  function is the one the gradient test compiled; the update is a second, small program."""
  params = real_params(case)
  opt = optax.adam(3e-2)

  @jax.jit
  def update(grads, state, params):
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state, losses = opt.init(params), []
  for _ in range(100):
    loss, grads = loss_and_grad(case)(params)
    params, state = update(grads, state, params)
    losses.append(loss)
  first, last = float(losses[0]), float(loss_and_grad(case)(params)[0])
  assert np.isfinite(last) and last < first / 10, (first, last)


def test_mlp_without_mixing_maps_each_token_alone():
  """K == L: output token i depends on signal token i only (no mixing along the token axis)."""
  proj, h, _ = built('mlp_same')
  params = random_params('mlp_same')
  apply = jax.jit(lambda h: proj.apply({'params': params}, h))
  y, y2 = apply(h), apply(h.at[:, 2].add(1.0))
  changed = np.any(np.asarray(y2 != y), axis=(0, 2))              # [L]
  assert changed.tolist() == [i == 2 for i in range(h.shape[1])]


# --------------------------------------------------------------------------------------------------- dropout

@pytest.mark.parametrize('case', DROPOUT_CASES)
def test_dropout_acts_only_when_not_deterministic(case):
  proj, h, _ = built(case)
  params = random_params(case)

  @jax.jit
  def run(key):
    det = proj.apply({'params': params}, h, deterministic=True, rngs={'dropout': key})
    train = proj.apply({'params': params}, h, deterministic=False, rngs={'dropout': key})
    return det, train, proj.apply({'params': params}, h)           # deterministic by default, no rng

  det_a, train_a, default = run(jax.random.key(1))
  det_b, train_b, _ = run(jax.random.key(2))
  np.testing.assert_array_equal(det_a, det_b)                       # the dropout rng is not read
  np.testing.assert_array_equal(det_a, default)
  assert not np.allclose(train_a, det_a) and not np.allclose(train_a, train_b)
  assert np.all(np.isfinite(train_a))


def test_zero_dropout_is_deterministic_either_way():
  """dropout 0.0 (the default): the same output with deterministic=False; also the encoder-less transformer's
  forward from its real initializers (K == L, odd widths) is finite."""
  proj, h, _ = built('transformer_noenc')
  params = real_params('transformer_noenc')

  @jax.jit
  def run(key):
    return (proj.apply({'params': params}, h, deterministic=True),
            proj.apply({'params': params}, h, deterministic=False, rngs={'dropout': key}))

  det, train = run(jax.random.key(3))
  assert det.shape == (3, 3, 5) and np.all(np.isfinite(det))
  np.testing.assert_array_equal(train, det)


# ------------------------------------------------------------------------------------------------ bad configs

BAD = [
    (dict(name='mlp', depth=0), 'model.output.projector.depth'),
    (dict(name='mlp', depth=True), 'model.output.projector.depth'),
    (dict(name='mlp', hidden_dim=0), 'model.output.projector.hidden_dim'),
    (dict(name='mlp', act='swish'), 'model.output.projector.act'),
    (dict(name='mlp', dropout=1.0), 'model.output.projector.dropout'),
    (dict(name='mlp', widht=3), 'model.output.projector.widht'),
    (dict(name='transformer', d_model=0), 'model.output.projector.d_model'),
    (dict(name='transformer', d_model=12, num_heads=5), 'model.output.projector.num_heads'),
    (dict(name='transformer', mlp_dim=-1), 'model.output.projector.mlp_dim'),
    (dict(name='transformer', encoder_depth=-1), 'model.output.projector.encoder_depth'),
    (dict(name='transformer', decoder_depth=0), 'model.output.projector.decoder_depth'),
    (dict(name='transformer', dropout=-0.1), 'model.output.projector.dropout'),
    (dict(name='transformer', norm_eps=0.0), 'model.output.projector.norm_eps'),
    (dict(name='transformer', num_queries=77), 'model.output.projector.num_queries'),
    (dict(name='mlp', out_len=9), 'model.output.projector.out_len'),   # cfg's size disagrees with the argument
]


@pytest.mark.parametrize('cfg,field', BAD, ids=[f'{c["name"]}-{f.rsplit(".", 1)[1]}' for c, f in BAD])
def test_config_errors_name_the_field(cfg, field):
  with pytest.raises(ValueError, match=field.replace('.', r'\.')):
    output_projectors.build(ml_collections.ConfigDict(cfg), in_dim=8, num_signal_tokens=4, out_len=6, out_dim=8)


@pytest.mark.parametrize('size', ['in_dim', 'num_signal_tokens', 'out_len', 'out_dim'])
def test_size_arguments_are_checked(size):
  sizes = dict(in_dim=8, num_signal_tokens=4, out_len=6, out_dim=8)
  sizes[size] = 0
  with pytest.raises(ValueError, match=rf'model\.output\.projector\.{size}'):
    output_projectors.build(dict(name='mlp'), **sizes)


def test_unknown_name_lists_the_known_ones():
  with pytest.raises(ValueError, match=r"model\.output\.projector\.name 'qformer'.*\['mlp', 'transformer'\]"):
    output_projectors.build(dict(name='qformer'), in_dim=8, num_signal_tokens=4, out_len=6, out_dim=8)


def test_hidden_states_of_the_wrong_shape_are_refused():
  proj, h, _ = built('mlp_mix')
  params = random_params('mlp_mix')
  for bad in (h[:, :3], h[..., :9]):                              # K - 1 tokens; D_lm - 1 wide
    with pytest.raises(ValueError, match=r'expects h \[B, K=4, D_lm=10\]'):
      proj.apply({'params': params}, bad)
