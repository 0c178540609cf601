"""Idefics3 / SmolVLM connector: transformers `Idefics3Connector` (and the identical `SmolVLMConnector`) -> mmproj
`pixel_shuffle` (norm='none', depth=1, use_bias=False).

HF: pixel_shuffle(x, scale_factor) then modality_projection.proj, a Linear(Dv*s*s, Dt) without bias. The
reference takes x [B, N, Dv] of a square grid (it assumes h = w = sqrt(N)); the port takes the same x with
grid=(sqrt(N), sqrt(N)) (and any h x w grid divisible by s).
"""

from __future__ import annotations

from typing import Any

from mmproj import projectors
from mmproj.convert.base import StateDict, converter


@converter('Idefics3Connector', 'SmolVLMConnector')
def idefics3_connector(module: Any):
  sd = StateDict.of(module)
  kernel = sd.kernel('modality_projection.proj')          # [Dv*s*s, Dt]
  sd.finish()
  s = int(module.scale_factor)
  width, out_dim = kernel.shape
  if width % (s * s):
    raise ValueError(f'{type(module).__name__}: modality_projection input width {width} is not divisible by '
                     f'scale_factor**2 = {s * s}')
  cfg = dict(name='pixel_shuffle', scale_factor=s, norm='none', depth=1, use_bias=False)
  return projectors.build(cfg, in_dim=width // (s * s), out_dim=out_dim), {'mlp': {'linear_1': {'kernel': kernel}}}
