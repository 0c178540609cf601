"""Feed-forward blocks.

`SwiGLU` (Shazeer 2020, as in Llama): down(act(gate(x)) * up(x)), act silu unless given, output width the input's
unless given (Idefics2's modality projection); HF names gate_proj/up_proj/down_proj, no biases.
`GeluMLP` (ViT/CLIP/SigLIP): fc2(act(fc1(x))) with biases; 'gelu' is the exact erf GELU (PyTorch `nn.GELU()`,
HF "gelu"). Kernels: [D, F] ('embed', 'mlp') in, [F, D] ('mlp', 'embed') out.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmproj.layers import kernels
from mmproj.layers.matmul import dense_dot_general

Dtype = Any


def quick_gelu(x):
  """OpenAI CLIP's x * sigmoid(1.702 x) (HF "quick_gelu")."""
  return x * jax.nn.sigmoid(1.702 * x)


# Activation name (HF spelling in comments) -> function.
ACTIVATIONS = {
    'gelu': lambda x: jax.nn.gelu(x, approximate=False),       # HF "gelu" (exact erf)
    'gelu_tanh': lambda x: jax.nn.gelu(x, approximate=True),   # HF "gelu_pytorch_tanh" (SigLIP)
    'quick_gelu': quick_gelu,                                   # HF "quick_gelu" (OpenAI CLIP)
    'silu': jax.nn.silu,
    'relu': jax.nn.relu,
}


def get_activation(name: str):
  if name not in ACTIVATIONS:
    raise ValueError(f'unknown activation {name!r}; known: {sorted(ACTIVATIONS)}')
  return ACTIVATIONS[name]


def dense(features: int, names: tuple, *, use_bias: bool, dtype: Dtype, name: str | None = None) -> nn.Dense:
  """nn.Dense (lecun-normal kernel, zero bias) with logical axes `names` on the kernel and names[-1:] on the bias;
  params float32, compute in `dtype`. Its matmul is lax.dot_general, or with model.kernels.dense =
  'cpu_transpose_copy' `dense_dot_general` (mmproj/layers/matmul.py)."""
  cpu_form = kernels.current().dense == 'cpu_transpose_copy'
  return nn.Dense(
      features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name,
      dot_general=dense_dot_general if cpu_form else None,
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), names),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, names[-1:]))


class SwiGLU(nn.Module):
  """x [..., D] -> down(act(gate(x)) * up(x)) [..., out_dim or D]; hidden width `hidden_dim`, no biases."""

  hidden_dim: int
  out_dim: int | None = None    # None = the input width D (Llama's MLP); Idefics2's modality projection maps widths
  act: str = 'silu'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):                                                        # x [..., D]
    gate = dense(self.hidden_dim, ('embed', 'mlp'), use_bias=False, dtype=self.dtype, name='gate_proj')(x)
    up = dense(self.hidden_dim, ('embed', 'mlp'), use_bias=False, dtype=self.dtype, name='up_proj')(x)
    h = get_activation(self.act)(gate) * up                                     # [..., F]
    out_dim = self.out_dim or x.shape[-1]
    return dense(out_dim, ('mlp', 'embed'), use_bias=False, dtype=self.dtype, name='down_proj')(h)  # [..., out_dim]


class GeluMLP(nn.Module):
  """x [..., D] -> fc2(act(fc1(x))) [..., D]; `act` defaults to the exact erf GELU."""

  hidden_dim: int
  act: str = 'gelu'
  use_bias: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):                                                        # x [..., D]
    d = x.shape[-1]
    h = dense(self.hidden_dim, ('embed', 'mlp'), use_bias=self.use_bias, dtype=self.dtype, name='fc1')(x)
    h = get_activation(self.act)(h)                                             # [..., F]
    return dense(d, ('mlp', 'embed'), use_bias=self.use_bias, dtype=self.dtype, name='fc2')(h)  # [..., D]
