"""mmproj.layers.matmul (model.kernels.dense='cpu_transpose_copy'): the dense matmul's custom JVP gives jax's own
derivatives, transposes behind a conditional, and leaves the weight gradient out of programs that do not ask for
it; dense layers use it only under that kernel choice."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from mmproj.layers import dense, kernels
from mmproj.layers.matmul import dense_dot_general

DENSE = (((2,), (0,)), ((), ()))


def _loss(dot):
  def loss(x, w):
    y = dot(x, w, DENSE)
    return jnp.sum(jnp.sin(y.astype(jnp.float32)))     # a non-uniform cotangent
  return loss


@pytest.mark.parametrize('dtype,tol', [(jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)])
def test_gradients_equal_jax_autodiff(dtype, tol):
  kx, kw = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (2, 7, 12), dtype)
  w = (jax.random.normal(kw, (12, 5)) / 4).astype(dtype)
  ours = jax.jit(jax.value_and_grad(_loss(dense_dot_general), argnums=(0, 1)))(x, w)
  ref = jax.jit(jax.value_and_grad(_loss(lax.dot_general), argnums=(0, 1)))(x, w)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol)


def test_cpu_weight_gradient_transposes_behind_a_conditional():
  x, w = jnp.ones((2, 3, 4)), jnp.ones((4, 5))
  grad_w = jax.jit(jax.grad(_loss(dense_dot_general), argnums=1))
  assert 'conditional(' in grad_w.lower(x, w).compile().as_text()
  # The conditional's branches are the same transpose, so a NaN in x (which flips the predicate) changes nothing.
  x_nan = x.at[0, 0, 0].set(jnp.nan)
  np.testing.assert_array_equal(np.asarray(grad_w(x_nan, w)),
                                np.asarray(jax.jit(jax.grad(_loss(lax.dot_general), argnums=1))(x_nan, w)))


@pytest.mark.parametrize('how', ['not differentiated', 'gradient dropped'])
def test_frozen_weight_costs_no_weight_gradient(how):
  """A frozen layer compiles without the weight gradient's transpose and matmul, whether its weight is not
  differentiated at all or differentiated and the gradient dropped (trainer.make_train_step's frozen params)."""
  x, w = jnp.ones((2, 3, 4)), jnp.ones((4, 5))
  if how == 'not differentiated':
    fn = jax.grad(_loss(dense_dot_general), argnums=0)
  else:
    fn = lambda x, w: jax.grad(_loss(dense_dot_general), argnums=(0, 1))(x, w)[0]
  hlo = jax.jit(fn).lower(x, w).compile().as_text()
  assert 'conditional(' not in hlo
  assert 'f32[4,5]{1,0} fusion' not in hlo and 'f32[4,5]{1,0} dot' not in hlo


def test_forward_mode_equals_jax():
  x, w = jax.random.normal(jax.random.key(3), (2, 3, 4)), jax.random.normal(jax.random.key(4), (4, 5))
  tx, tw = jnp.ones_like(x), jnp.full_like(w, 0.5)
  ours = jax.jvp(lambda x, w: dense_dot_general(x, w, DENSE), (x, w), (tx, tw))
  ref = jax.jvp(lambda x, w: lax.dot_general(x, w, DENSE), (x, w), (tx, tw))
  for a, b in zip(ours, ref):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_other_contractions_are_plain_dot_general():
  x = jnp.arange(24.0).reshape(2, 3, 4)
  w = jnp.arange(20.0).reshape(4, 5)
  np.testing.assert_array_equal(dense_dot_general(x, w, DENSE), lax.dot_general(x, w, DENSE))
  batched = (((2,), (1,)), ((0,), (0,)))
  v = jnp.ones((2, 4, 3))
  np.testing.assert_array_equal(dense_dot_general(x, v, batched), lax.dot_general(x, v, batched))
  out = dense_dot_general(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), DENSE, preferred_element_type=jnp.float32)
  assert out.dtype == jnp.float32


def test_dense_layer_uses_it_under_remat_and_scan():
  assert dense(6, ('embed', 'mlp'), use_bias=True, dtype=jnp.float32).dot_general is None   # 'xla': nn.Dense's own
  with kernels.use(kernels.Kernels(dense='cpu_transpose_copy')):
    layer = dense(6, ('embed', 'mlp'), use_bias=True, dtype=jnp.float32)
  assert layer.dot_general is dense_dot_general

  class Stack(nn.Module):
    dot_general: object = None           # None: nn.Dense's own (lax.dot_general)

    @nn.compact
    def __call__(self, x):
      def body(block, h, _):
        return jnp.tanh(block(h)), None
      scanned = nn.scan(nn.remat(body), variable_axes={'params': 0}, split_rngs={'params': True}, length=3)
      h, _ = scanned(nn.Dense(8, name='a', dot_general=self.dot_general), x, None)
      return h

  x = jax.random.normal(jax.random.key(1), (2, 5, 8))
  params = Stack(dense_dot_general).init(jax.random.key(2), x)

  def grads(module):
    return jax.jit(jax.grad(lambda p, x: jnp.sum(module.apply(p, x) ** 2), argnums=(0, 1)))(params, x)

  for a, b in zip(jax.tree.leaves(grads(Stack(dense_dot_general))), jax.tree.leaves(grads(Stack()))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
