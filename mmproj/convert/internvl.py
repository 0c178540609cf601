"""InternVL's projector: transformers `InternVLMultiModalProjector` -> mmproj `pixel_shuffle` (norm='layernorm',
depth=2, use_bias=True), with the pixel shuffle that `InternVLModel.get_image_features` applies before it folded in.

HF: InternVLModel.pixel_shuffle(features [B, h, w, Dv], downsample_ratio) -> [B, h*r, w*r, Dv/r^2], flattened to
tokens, then layer_norm (nn.LayerNorm(Dv/r^2)) linear_1 (-> Dt) ACT2FN[projector_hidden_act] linear_2 (Dt -> Dt).
The port takes the vision features *before* the shuffle, x [B, h*w, Dv] row-major (what get_image_features
reshapes to its square grid), with grid=(h, w), and returns the projector's output.

The projector itself only holds the shuffled width Dv/r^2 (layer_norm and linear_1 both have that width), so Dv
and r cannot be told apart from its weights: pass `downsample_ratio` (InternVLConfig.downsample_ratio; 0.5, the
default, in every released InternVL) when calling this converter directly. It must give an integer
s = 1/downsample_ratio with s^2 dividing the layer_norm width, else ValueError.
"""

from __future__ import annotations

from typing import Any

from mmproj import projectors
from mmproj.convert.base import StateDict, activation, converter


@converter('InternVLMultiModalProjector')
def internvl_projector(module: Any, downsample_ratio: float = 0.5):
  sd = StateDict.of(module)
  p = {'norm': sd.norm('layer_norm'),
       'mlp': {'linear_1': sd.dense('linear_1'), 'linear_2': sd.dense('linear_2')}}
  sd.finish()
  width = p['norm']['scale'].shape[0]                     # Dv * s * s
  out_dim = p['mlp']['linear_1']['kernel'].shape[1]
  if p['mlp']['linear_1']['kernel'].shape[0] != width:
    raise ValueError(f'InternVLMultiModalProjector: linear_1 input width {p["mlp"]["linear_1"]["kernel"].shape[0]} '
                     f'differs from the layer_norm width {width}')
  s = int(1 / downsample_ratio)  # as InternVLMultiModalProjector sizes itself: int(1 / downsample_ratio)
  if s < 1 or abs(s * downsample_ratio - 1) > 1e-6 or width % (s * s):
    raise ValueError(f'InternVLMultiModalProjector: downsample_ratio={downsample_ratio} does not give an integer '
                     f'scale s with s^2 dividing the layer_norm width {width}')
  act = activation(module.act, 'InternVLMultiModalProjector.act (projector_hidden_act)')
  cfg = dict(name='pixel_shuffle', scale_factor=s, norm='layernorm', norm_eps=float(module.layer_norm.eps),
             depth=2, act=act, use_bias=True)
  return projectors.build(cfg, in_dim=width // (s * s), out_dim=out_dim), p
