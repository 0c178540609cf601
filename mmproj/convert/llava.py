"""LLaVA's projector: transformers `LlavaMultiModalProjector` -> mmproj `mlp` (depth 2).

HF: linear_1 (Dv*k -> Dt), ACT2FN[projector_hidden_act], linear_2 (Dt -> Dt), biases per
multimodal_projector_bias; k = number of vision_feature_layer entries (their features are concatenated, so the
projector sees tokens of width Dv*k).
"""

from __future__ import annotations

from typing import Any

from mmproj import projectors
from mmproj.convert import StateDict, activation, converter


@converter('LlavaMultiModalProjector')
def llava_projector(module: Any):
  sd = StateDict.of(module)
  bias = 'linear_1.bias' in sd
  p = {'linear_1': sd.dense('linear_1', bias), 'linear_2': sd.dense('linear_2', bias)}
  sd.finish()
  in_dim, out_dim = p['linear_1']['kernel'].shape
  act = activation(module.act, 'LlavaMultiModalProjector.act (projector_hidden_act)')
  cfg = dict(name='mlp', depth=2, act=act, use_bias=bias)
  return projectors.build(cfg, in_dim=in_dim, out_dim=out_dim), p

