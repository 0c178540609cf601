"""Qwen2-VL / Qwen2.5-VL patch mergers: transformers `PatchMerger` (Qwen2-VL, LayerNorm) and
`Qwen2_5_VLPatchMerger` (RMSNorm) -> mmproj `patch_merger` with input_order='windowed'.

HF: ln_q (on each patch, width Dv), view(-1, Dv*m*m) (the m*m patches of a merge window, contiguous in the vision
tower's order), mlp.0 Linear(H, H), mlp.1 nn.GELU, mlp.2 Linear(H, Dt), H = Dv*m*m. The reference takes
x [seq, Dv] in Qwen2-VL's window order and returns [seq/m^2, Dt]; the port takes x[None] ([1, seq, Dv], one image
of grid (h, w) with h*w = seq) with grid=(h, w) and returns [1, seq/m^2, Dt]. For row-major encoder tokens build
the same projector with input_order='row_major' (the mmproj default; `flax_module.clone(input_order='row_major')`):
the parameters are the same.
The merge size m is read off the weights (H / Dv = m^2).
"""

from __future__ import annotations

import math
from typing import Any

from mmproj import projectors
from mmproj.convert.base import StateDict, activation, converter


@converter('PatchMerger', 'Qwen2_5_VLPatchMerger')
def qwen2_vl_patch_merger(module: Any):
  name = type(module).__name__
  ln = module.ln_q
  if hasattr(ln, 'variance_epsilon'):                     # Qwen2_5_VLRMSNorm: weight only
    norm, eps, bias = 'rmsnorm', float(ln.variance_epsilon), False
  elif type(ln).__name__ == 'LayerNorm':                  # torch.nn.LayerNorm
    norm, eps, bias = 'layernorm', float(ln.eps), True
  else:
    raise ValueError(f'{name}: ln_q is a {type(ln).__name__}, expected LayerNorm or Qwen2_5_VLRMSNorm')
  sd = StateDict.of(module)
  p = {'norm': sd.norm('ln_q', bias), 'linear_1': sd.dense('mlp.0'), 'linear_2': sd.dense('mlp.2')}
  sd.finish()
  in_dim = p['norm']['scale'].shape[0]
  hidden, out_dim = p['linear_2']['kernel'].shape
  m = math.isqrt(hidden // in_dim)
  if m * m * in_dim != hidden or p['linear_1']['kernel'].shape != (hidden, hidden):
    raise ValueError(f'{name}: mlp widths {p["linear_1"]["kernel"].shape} / {hidden} are not (Dv*m*m) for the '
                     f'ln_q width Dv={in_dim} and an integer merge size m')
  act = activation(module.mlp[1], f'{name}.mlp[1]')
  cfg = dict(name='patch_merger', spatial_merge_size=m, norm=norm, norm_eps=eps, act=act, input_order='windowed')
  return projectors.build(cfg, in_dim=in_dim, out_dim=out_dim), p
