"""Gemma 3's projector: transformers `Gemma3MultiModalProjector` -> mmproj `avg_pool` (norm='rmsnorm', depth=1,
use_bias=False, adaptive=False).

HF: [B, P*P, Dv] -> grid P x P (P = image_size // patch_size) -> AvgPool2d(kernel = stride = k, k = P //
tokens_per_side) -> mm_soft_emb_norm (Gemma3RMSNorm: x / rms(x) * (1 + weight), eps = vision layer_norm_eps)
-> x @ mm_input_projection_weight ([Dv, Dt], already (in, out): no transpose, no bias).
Port: the same x with grid=(P, P) -> [B, (P/k)^2, Dt]. The RMSNorm scale is stored as 1 + weight (computed in
float32 exactly as the reference does), so mmproj's plain RMSNorm reproduces it; export must subtract 1.
AvgPool2d drops the last P mod k rows/columns; mmproj refuses to drop patches, so such a module is a ValueError.
"""

from __future__ import annotations

from typing import Any

from mmproj import projectors
from mmproj.convert.base import StateDict, converter


@converter('Gemma3MultiModalProjector')
def gemma3_projector(module: Any):
  sd = StateDict.of(module)
  weight = sd.take('mm_input_projection_weight')          # [Dv, Dt]
  in_dim, out_dim = weight.shape
  scale = 1.0 + sd.take('mm_soft_emb_norm.weight', (in_dim,))
  sd.finish()
  side, k = int(module.patches_per_image), int(module.kernel_size)
  if k < 1 or side % k:
    raise ValueError(f'Gemma3MultiModalProjector: patches_per_image={side} is not divisible by the pooling kernel '
                     f'{k} (= patches_per_image // tokens_per_side); AvgPool2d would drop {side % max(k, 1)} '
                     'rows and columns of patches')
  cfg = dict(name='avg_pool', output_grid=(side // k, side // k), adaptive=False, norm='rmsnorm',
             norm_eps=float(module.mm_soft_emb_norm.eps), depth=1, use_bias=False)
  params = {'norm': {'scale': scale}, 'mlp': {'linear_1': {'kernel': weight}}}
  return projectors.build(cfg, in_dim=in_dim, out_dim=out_dim), params
