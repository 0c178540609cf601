"""model.kernels.dense = 'cpu_transpose_copy': a dense layer's matmul, y = x W, with a weight gradient in the form
XLA CPU runs at its matmul rate (mmproj/layers/kernels.py; the default, 'xla', is nn.Dense's plain dot_general).

The weight gradient dW = x^T dy contracts over the tokens, the leading axis of both operands. XLA CPU runs plain
(x W) and right-transposed (dy W^T) matmuls as YNNPACK kernels but this left-transposed one as a slower Eigen dot;
where it does transpose an operand first, it fuses the transpose into the operand's elementwise producer (the
bias add, the GELU), a strided loop much slower than a plain transpose copy. `python -m benchmarks.diagnose
matmul-forms` measures the forms; BENCHMARKS.md has the figures, with the one measured shape where this loses.

`dense_dot_general` (nn.Dense's `dot_general` in `mmproj.layers.dense` under this choice) has the same forward and
a custom JVP whose weight term is written with that copy, so that reverse mode transposes it into the fast form:
  y' = x' W + x W'   with   x W' = T(x)^T W'     T(x) = x^T as a plain copy [D, T] (T = tokens, all lead axes)
  -> dx = dy W^T [..., D],   dW = T(x) dy [D, F]
T(x) is the transpose inside a lax.cond: XLA does not fuse across a conditional, so x is the materialised array its
other consumers read and the transpose is a layout copy; both branches are the same transpose, so the predicate
(read from x) never changes the result.
A JVP rule (not a VJP) keeps the dots plain dot_general primitives, so remat policies ('dots') and the traced FLOP
counts (mmproj.train.flops) see what they see without it, and a frozen weight (no tangent) costs no copy.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero


def _transposed_copy(x2):                                               # x2 [T, D] -> [D, T]
  # The predicate is data so that XLA cannot fold the conditional away; both branches are identical.
  return lax.cond(jnp.isnan(x2[0, 0]), jnp.transpose, jnp.transpose, x2)


def _dense(x, w, precision):                                            # x [..., D], w [D, F] -> [..., F]
  return lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _dense_matmul(x, w, precision):
  return _dense(x, w, precision)


@functools.partial(_dense_matmul.defjvp, symbolic_zeros=True)
def _dense_matmul_jvp(precision, primals, tangents):
  x, w = primals
  x_dot, w_dot = tangents
  y = _dense(x, w, precision)                                           # [..., F]
  terms = []
  if not isinstance(x_dot, SymbolicZero):
    terms.append(_dense(x_dot, w, precision))                           # transposes to dx = dy W^T
  if not isinstance(w_dot, SymbolicZero) and x.size:
    xt = _transposed_copy(x.reshape(-1, x.shape[-1]))                   # [D, T]
    # (xt^T) W' transposes to dW = xt dy: XLA folds the ^T into the dot's dimensions, a plain [D, T] x [T, F].
    terms.append(lax.dot_general(xt, w_dot, (((0,), (0,)), ((), ())), precision=precision).reshape(y.shape))
  y_dot = functools.reduce(jnp.add, terms) if terms else jnp.zeros_like(y)
  return y, y_dot


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """lax.dot_general with the custom JVP above for nn.Dense's contraction (last axis of lhs with the first of a
  2-D rhs, no batch axes, no preferred_element_type); any other call is plain lax.dot_general."""
  dense_form = (((lhs.ndim - 1,), (0,)), ((), ()))
  if (rhs.ndim != 2 or preferred_element_type is not None or lhs.ndim < 2 or lhs.dtype != rhs.dtype
      or tuple(map(tuple, dimension_numbers[0])) != dense_form[0] or any(map(len, dimension_numbers[1]))):
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type)
  return _dense_matmul(lhs, rhs, precision)
