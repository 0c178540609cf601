"""LDP, the Lightweight Downsample Projector — MobileVLM (Chu, Qiao, Lin, Xu, Yang, Hu, Wei, Zhang, Zhang, Wei,
Shen, 2023, "MobileVLM: A Fast, Strong and Open Vision Language Assistant for Mobile Devices", arXiv:2312.16886).

A token-wise MLP to the LM width, then two MobileNetV2/V3 inverted-residual blocks on the token map; the second
has stride 2 and quarters the token count:

  x [B, N, Dv] --Linear GELU Linear--> [B, h, w, D]                                   (pointwise MLP, D = Dt)
    --block 1 (stride 1):  DW 3x3, LN, Hardswish -> SE -> PW 1x1, LN;  + x (residual)   [B, h, w, D]
    --block 2 (stride 2):  DW 3x3 /2, LN, Hardswish -> SE -> PW 1x1, LN                 [B, h', w', D]
    --> y [B, h'*w', D]

Blocks are torchvision `InvertedResidual(InvertedResidualConfig(D, 3, D, D, use_se=True, 'HS', stride, 1, 1))`
with timm `LayerNormAct2d(act_layer=None)` as norm, as in MobileVLM's code: expansion 1 (so no expand conv),
bias-free convs, LayerNorm over channels at every position (eps 1e-5), Hardswish x * relu6(x + 3) / 6, and a
torchvision SqueezeExcitation (ReLU, hard-sigmoid gate, S = make_divisible(D // 4, 8) hidden channels). The
paper's figure omits SE but the released code uses it, so `use_se=True` is the default; `use_se=False` gives the
SE-free (strictly local) variant. The residual only exists on the stride-1 block (torchvision: stride 1 and
Cin == Cout).

  tokens in -> out:  N = h * w -> M = ceil(h / 2) * ceil(w / 2)  (3x3 conv, stride 2, padding 1, as torch; odd
                     grids keep their last row/column through the zero-padded border)
  params:            (Dv*D + D) + (D*D + D)                                   (MLP)
                     + 2 * (9*D + D*D + 4*D + [use_se] (2*D*S + S + D))       (two blocks: DW, PW, two LNs, SE)
  spatial locality:  kept without SE: output (i, j) depends only on input rows 2i-2..2i+2 and columns 2j-2..2j+2
                     (clipped to the grid): block 2 reads block-1 rows 2i-1..2i+1, each of which reads +-1 row.
                     With SE (the default, as released) every block also gates each channel by the map's global
                     mean, a weak global dependence.
  shapes:            x [B, h*w, Dv] -> mlp [B, h*w, D] -> [B, h, w, D] -> block1 [B, h, w, D]
                     -> block2 [B, ceil(h/2), ceil(w/2), D] -> y [B, M, D]

Param names: linear_1, linear_2 (MLP, HF-LLaVA style), block_1 / block_2 each with depthwise [9, D] ('patch',
'mlp'), depthwise_norm, se (fc1, fc2), project [D, D] ('mlp', 'embed'), project_norm.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmproj.layers import LayerNorm, dense
from mmproj.layers.feature_map import DepthwiseConv2d, SqueezeExcite, map_to_tokens, tokens_to_map
from mmproj.layers.token_grid import require_2d
from mmproj.projectors.registry import check_positive, register


def make_divisible(v: float, divisor: int = 8) -> int:
  """torchvision `_make_divisible`: nearest multiple of `divisor`, at least `divisor`, never < 90% of v."""
  new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
  return new_v + divisor if new_v < 0.9 * v else new_v


def pointwise_mlp(x, out_dim: int, dtype):
  """MobileVLM's token-wise Linear GELU Linear (exact erf GELU, torch nn.GELU())."""
  x = dense(out_dim, ('embed', 'mlp'), use_bias=True, dtype=dtype, name='linear_1')(x)   # [B, N, D]
  x = jax.nn.gelu(x, approximate=False)
  return dense(out_dim, ('mlp', 'embed'), use_bias=True, dtype=dtype, name='linear_2')(x)  # [B, N, D]


class InvertedResidual(nn.Module):
  """torchvision MobileNetV3 InvertedResidual with expansion 1 and LayerNorm: [B, h, w, D] -> [B, h', w', D]."""

  stride: int = 1
  use_se: bool = True
  norm_eps: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):                                                  # x [B, h, w, D]
    d = x.shape[-1]
    y = DepthwiseConv2d(3, self.stride, use_bias=False, dtype=self.dtype, name='depthwise')(x)  # [B, h', w', D]
    y = jax.nn.hard_swish(LayerNorm(self.norm_eps, self.dtype, 'depthwise_norm')(y))
    if self.use_se:
      y = SqueezeExcite(make_divisible(d // 4), act='relu', gate='hard_sigmoid', dtype=self.dtype, name='se')(y)
    y = dense(d, ('mlp', 'embed'), use_bias=False, dtype=self.dtype, name='project')(y)   # [B, h', w', D]
    y = LayerNorm(self.norm_eps, self.dtype, 'project_norm')(y)
    return y + x if self.stride == 1 else y                               # [B, h', w', D]


@register('ldp')
class LDPProjector(nn.Module):
  """MobileVLM LDP: pointwise MLP -> inverted residual (stride 1) -> inverted residual (stride 2)."""

  in_dim: int
  out_dim: int
  use_se: bool = True             # squeeze-excitation in both blocks (MobileVLM's released code)
  norm_eps: float = 1e-5          # timm LayerNormAct2d
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, grid, deterministic: bool = True):          # x [B, N, Dv]
    del deterministic  # no dropout
    who = 'ldp projector'
    require_2d(grid, who)   # 3x3 depthwise convolutions over the patch map
    if x.shape[-1] != self.in_dim:
      raise ValueError(f'{who} expects in_dim={self.in_dim}, got tokens of width {x.shape[-1]}')
    tokens_to_map(x, grid, who)   # checks N == h * w before any compute
    x = pointwise_mlp(x, self.out_dim, self.dtype)                        # [B, N, D]
    x = tokens_to_map(x, grid, who)                                       # [B, h, w, D]
    for i, stride in enumerate((1, 2)):
      x = InvertedResidual(stride, self.use_se, self.norm_eps, self.dtype, name=f'block_{i + 1}')(x)
    return map_to_tokens(x)                                               # [B, ceil(h/2)*ceil(w/2), D]

  @nn.nowrap
  def check(self) -> None:
    if not isinstance(self.use_se, bool):
      raise ValueError(f'model.projector.use_se must be a bool, got {self.use_se!r}')
    check_positive('norm_eps', self.norm_eps)

  @nn.nowrap
  def num_output_tokens(self, grid) -> int:
    require_2d(grid, 'ldp projector')
    return -(-grid[0] // 2) * -(-grid[1] // 2)

  @nn.nowrap
  def param_count(self) -> int:
    dv, d = self.in_dim, self.out_dim
    s = make_divisible(d // 4)
    block = 9 * d + d * d + 4 * d + (2 * d * s + s + d if self.use_se else 0)
    return (dv * d + d) + (d * d + d) + 2 * block
