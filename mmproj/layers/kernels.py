"""Which implementation runs the dense layers' matmuls and attention: `cfg.model.kernels`, an explicit choice.

  model.kernels.dense      'xla'                 nn.Dense's plain lax.dot_general
                           'cpu_transpose_copy'  the same forward, a weight gradient XLA CPU runs faster
                                                 (mmproj/layers/matmul.py)
  model.kernels.attention  'xla'                 jax.nn.dot_product_attention on XLA
                           'query_blocks'        causal self-attention as query blocks that score only the keys up
                                                 to each block's end, with masked_softmax's compact backward
                                                 (mmproj/layers/attention.py); other attention as 'xla'
                           'cudnn'               jax.nn.dot_product_attention(implementation='cudnn'): cuDNN's
                                                 fused (flash) attention on NVIDIA GPUs, for the calls whose shapes
                                                 it takes (attention.cudnn_takes: bf16 / fp16, head dim a multiple
                                                 of 8 up to 128); the others run 'xla'
  'auto' (the default of both) is decided from the platform of the mesh the model runs on: 'cudnn' attention on a
  GPU with bf16 compute, 'xla' for everything else. The CPU-tuned choices are never picked by 'auto'; the
  benchmarks turn them on, and BENCHMARKS.md reports both settings. All choices compute the same function (tests
  compare outputs and gradients).

The model enters `use(kernels)` around its forward pass; `current()` is what the layers read while being traced.
Outside any `use` (a layer applied on its own) everything is 'xla'.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any

DENSE = ('xla', 'cpu_transpose_copy')
ATTENTION = ('xla', 'query_blocks', 'cudnn')


@dataclasses.dataclass(frozen=True)
class Kernels:
  dense: str = 'xla'
  attention: str = 'xla'


_CURRENT: contextvars.ContextVar = contextvars.ContextVar('mmproj_kernels', default=Kernels())


@contextlib.contextmanager
def use(kernels: Kernels):
  token = _CURRENT.set(kernels)
  try:
    yield
  finally:
    _CURRENT.reset(token)


def current() -> Kernels:
  return _CURRENT.get()


def resolve(cfg_kernels: Any, platform: str, dtype: str) -> Kernels:
  """cfg.model.kernels ({'dense', 'attention'}, each a name or 'auto') -> Kernels for a mesh of `platform`
  ('cpu' | 'gpu' | 'tpu') and compute dtype `dtype`; ValueError naming the field for an unknown name."""
  chosen = {}
  for field, names in (('dense', DENSE), ('attention', ATTENTION)):
    value = cfg_kernels[field]
    if value == 'auto':
      value = 'cudnn' if field == 'attention' and platform == 'gpu' and dtype == 'bfloat16' else 'xla'
    if value not in names:
      raise ValueError(f"model.kernels.{field}={value!r} is not one of {list(names) + ['auto']}")
    chosen[field] = value
  return Kernels(**chosen)
