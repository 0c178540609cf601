"""Qwen2-VL / Qwen2.5-VL: the patch mergers, transformers `PatchMerger` (Qwen2-VL, LayerNorm) and
`Qwen2_5_VLPatchMerger` (RMSNorm) -> mmproj `patch_merger` with input_order='windowed'; and the vision tower's
temporal patch embedding, `PatchEmbed` / `Qwen2_5_VisionPatchEmbed` -> mmproj.encoders.vit.PatchEmbedding.

HF: ln_q (on each patch, width Dv), view(-1, Dv*m*m) (the m*m patches of a merge window, contiguous in the vision
tower's order), mlp.0 Linear(H, H), mlp.1 nn.GELU, mlp.2 Linear(H, Dt), H = Dv*m*m. The reference takes
x [seq, Dv] in Qwen2-VL's window order and returns [seq/m^2, Dt]; the port takes x[None] ([1, seq, Dv], one image
of grid (h, w) with h*w = seq) with grid=(h, w) and returns [1, seq/m^2, Dt]. For row-major encoder tokens build
the same projector with input_order='row_major' (the mmproj default; `flax_module.clone(input_order='row_major')`):
the parameters are the same.
The merge size m is read off the weights (H / Dv = m^2). A video of grid_t temporal groups is the same merger with
num_frames=grid_t (`flax_module.clone(num_frames=grid_t)`): the reference's sequence is the groups one after
another, each in window order.

PatchEmbed: a bias-free Conv3d [D, C, t, p, p] with kernel = stride = (t, p, p) on the image processor's flattened
patches [seq, C*t*p*p] (channel, frame, row, col order). Ours embeds pixels [B, t, H, W, C] (one temporal group per
batch row) by a matmul with the kernel [t*p*p*C, D] in (frame, row, col, channel) order, and a bias (zero here, as
for CLIP's bias-free patch conv), returning row-major tokens [B, h*w, D]; the reference returns them in the
processor's merge-window order. `patch_embed_params` is the weight mapping alone, for whole-tower converters.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from mmproj import projectors
from mmproj.convert.base import StateDict, activation, converter
from mmproj.encoders.vit import PatchEmbedding


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


def patch_embed_params(sd: StateDict, key: str = 'proj.weight') -> dict[str, np.ndarray]:
  """Qwen2-VL's Conv3d weight `key` [D, C, t, p, p] taken from sd -> {'kernel': [t*p*p*C, D] (frame, row, col,
  channel), 'bias': zeros [D]}; ValueError naming the key for another shape."""
  w = sd.take(key)
  if w.ndim != 5 or w.shape[3] != w.shape[4]:
    raise ValueError(f'{sd.where}: {key} has shape {w.shape}, expected a Conv3d weight (D, C, t, p, p)')
  d = w.shape[0]
  kernel = w.transpose(2, 3, 4, 1, 0).reshape(-1, d)                          # [t*p*p*C, D]
  return {'kernel': kernel, 'bias': np.zeros((d,), np.float32)}


@converter('PatchEmbed', 'Qwen2_5_VisionPatchEmbed')
def qwen2_vl_patch_embed(module: Any):
  name = type(module).__name__
  conv = module.proj
  if conv.bias is not None:
    raise ValueError(f'{name}: proj has a bias; Qwen2-VL\'s patch Conv3d is bias-free')
  t, p = int(module.temporal_patch_size), int(module.patch_size)
  if tuple(conv.kernel_size) != (t, p, p) or tuple(conv.stride) != (t, p, p):
    raise ValueError(f'{name}: proj kernel {tuple(conv.kernel_size)} / stride {tuple(conv.stride)} are not '
                     f'(temporal_patch_size, patch_size, patch_size) = {(t, p, p)}')
  sd = StateDict.of(module)
  params = patch_embed_params(sd)
  sd.finish()
  return PatchEmbedding(patch_size=p, width=params['kernel'].shape[1], temporal_patch_size=t), params
