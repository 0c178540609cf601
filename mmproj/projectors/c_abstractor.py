"""C-Abstractor — Honeybee (Cha, Kang, Mun, Roh, 2024, "Honeybee: Locality-enhanced Projector for Multimodal
LLM", CVPR 2024, arXiv:2312.06742).

Convolutions keep the visual map's locality while an adaptive average pool abstracts it to M = m x m tokens:

  x [B, N, Dv] --(prenorm LN)--(+ pos_emb)--> map [B, h, w, Dv]
    --s1: `depth` ResNet bottleneck blocks--> [B, h, w, Dh]
    --adaptive average pool--> [B, m, m, Dh]
    --s2: `depth` ResNet bottleneck blocks--> [B, m, m, Dh]
    --readout MLP: Linear (SiLU Linear) * (mlp_depth - 1)--> y [B, M, Dt]

Block = timm RegNet `Bottleneck` as Honeybee builds it (`RegStage(stride=1, act=SiLU, norm=LayerNorm2d)`,
bottle_ratio 1, group_size 1 -> the 3 x 3 conv is depthwise), all convs bias-free, NHWC:
  conv1 1x1 Cin->C, LN, SiLU  ->  conv2 3x3 depthwise, LN, SiLU  ->  SE (optional)  ->  conv3 1x1 C->C, LN
  + shortcut (identity, or 1x1 conv + LN when Cin != C)  ->  SiLU
LN = LayerNorm over channels at every position (timm LayerNorm2d, eps 1e-6). SE = timm SEModule on the
bottleneck with R = round(Cin * se_ratio) hidden channels, SiLU, sigmoid gate (se_ratio 0.25 in Honeybee;
se_ratio=0, or R rounding to 0, drops it). Honeybee's optional eos ("think") tokens and CLS handling are not
part of this module.

  tokens in -> out:  N = h * w -> M = num_queries = m * m (any grid; the pool uses torch AdaptiveAvgPool2d's
                     uneven windows [floor(i*h/m), ceil((i+1)*h/m)) when m does not divide h or w)
  params:            block(Cin, C) = Cin*C + 9*C + C*C + 6*C                  (conv1, depthwise conv2, conv3, 3 LNs)
                                     + [se_ratio > 0] (2*C*R + R + C),  R = round(Cin * se_ratio)
                                     + [Cin != C] (Cin*C + 2*C)               (projection shortcut + LN)
                     total = [prenorm] 2*Dv + [pos_emb_grid (h0, w0)] h0*w0*Dv
                             + block(Dv, Dh) + (2*depth - 1) * block(Dh, Dh)
                             + Dh*Dt + Dt + (mlp_depth - 1) * (Dt*Dt + Dt)       (Dh = hidden_dim or Dv)
  spatial locality:  kept by the conv/pool path: without SE (se_ratio=0) output cell (i, j) depends only on the
                     pool windows of cells i-depth..i+depth (likewise j), widened by `depth` pixels on each side
                     (one 3x3 conv per block). With SE (Honeybee's default) every block also multiplies each
                     channel by a gate computed from the whole map's mean, so a weak global dependence remains.
  shapes:            x [B, h*w, Dv] -> [B, h, w, Dv] -> s1 [B, h, w, Dh] -> pool [B, m, m, Dh] -> s2 [B, m, m, Dh]
                     -> [B, M, Dh] -> readout [B, M, Dt]

Param names follow timm/Honeybee: s1/b1..b{depth}, s2/b1.., each block conv1, norm1, conv2, norm2, se (fc1, fc2),
conv3, norm3, downsample, downsample_norm; readout_1..readout_{mlp_depth}; pos_emb [h0*w0, Dv] ('pos', 'embed').
1x1 convs are dense kernels [Cin, C]; the depthwise kernel is [9, C] ('patch', 'mlp').
"""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from mmproj.layers import ACTIVATIONS, LayerNorm, dense, get_activation
from mmproj.layers.feature_map import DepthwiseConv2d, SqueezeExcite, map_to_tokens, square_side, tokens_to_map
from mmproj.layers.token_grid import avg_pool_2d, require_2d
from mmproj.projectors.mlp import dense_stack, dense_stack_param_count
from mmproj.projectors.registry import check_choice, check_int, register


def se_channels(in_channels: int, se_ratio: float) -> int:
  """timm Bottleneck: SE hidden width round(Cin * se_ratio) (0 = no SE)."""
  return int(round(in_channels * se_ratio)) if se_ratio else 0


def block_param_count(cin: int, c: int, se_ratio: float) -> int:
  """block(Cin, C) from the module docstring."""
  r = se_channels(cin, se_ratio)
  n = cin * c + 9 * c + c * c + 6 * c
  if r:
    n += 2 * c * r + r + c
  if cin != c:
    n += cin * c + 2 * c
  return n


def check_pos_emb_grid(pos_emb_grid: Any, field: str = 'model.projector.pos_emb_grid') -> None:
  if pos_emb_grid is None:
    return
  if not isinstance(pos_emb_grid, (tuple, list)) or len(pos_emb_grid) != 2 or not all(
      isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in pos_emb_grid):
    raise ValueError(f'{field} must be None or an encoder grid (h, w) of positive ints, got {pos_emb_grid!r}')


def check_grid_matches_pos_emb(grid, pos_emb_grid, who: str) -> None:
  """A learned position table fits one grid: ValueError naming both when the call's grid differs."""
  if pos_emb_grid is not None and tuple(grid) != tuple(pos_emb_grid):
    raise ValueError(f'{who}: grid={tuple(grid)} does not match model.projector.pos_emb_grid='
                     f'{tuple(pos_emb_grid)} (the learned position embedding has one row per patch of that grid)')


def check_abstractor_fields(module: nn.Module) -> None:
  """The fields both Honeybee abstractors have: num_queries (a square), depth, mlp_depth, hidden_dim, act and
  pos_emb_grid; ValueError naming the field."""
  square_side(module.num_queries, 'model.projector.num_queries')
  for key in ('depth', 'mlp_depth'):
    check_int(key, getattr(module, key))
  check_int('hidden_dim', module.hidden_dim, optional=True)
  check_choice('act', module.act, ACTIVATIONS)
  check_pos_emb_grid(module.pos_emb_grid)


def position_embedding(module: nn.Module, pos_emb_grid, dim: int, dtype):
  """The learned table `pos_emb` [h0*w0, D] ('pos', 'embed'), N(0, 0.02) init, as a map [h0, w0, D]."""
  h0, w0 = pos_emb_grid
  pos = module.param('pos_emb', nn.with_logical_partitioning(nn.initializers.normal(0.02), ('pos', 'embed')),
                     (h0 * w0, dim), jnp.float32)                         # [h0*w0, D]
  return pos.astype(dtype).reshape(h0, w0, dim)                           # [h0, w0, D]


class RegBottleneck(nn.Module):
  """timm RegNet Bottleneck (bottle_ratio 1, depthwise 3x3, SE after the 3x3): [B, h, w, Cin] -> [B, h, w, C]."""

  features: int
  se_ratio: float = 0.25
  act: str = 'silu'
  norm_eps: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):                                                  # x [B, h, w, Cin]
    c, act = self.features, get_activation(self.act)

    def norm(name):
      return LayerNorm(self.norm_eps, self.dtype, name)

    y = dense(c, ('embed', 'mlp'), use_bias=False, dtype=self.dtype, name='conv1')(x)   # [B, h, w, C]
    y = act(norm('norm1')(y))
    y = DepthwiseConv2d(3, 1, use_bias=False, dtype=self.dtype, name='conv2')(y)        # [B, h, w, C]
    y = act(norm('norm2')(y))
    r = se_channels(x.shape[-1], self.se_ratio)
    if r:
      y = SqueezeExcite(r, act=self.act, gate='sigmoid', dtype=self.dtype, name='se')(y)
    y = dense(c, ('mlp', 'embed'), use_bias=False, dtype=self.dtype, name='conv3')(y)   # [B, h, w, C]
    y = norm('norm3')(y)
    shortcut = x
    if x.shape[-1] != c:   # channel change: projection shortcut (timm downsample_conv, 1x1 conv + norm)
      shortcut = dense(c, ('embed', 'mlp'), use_bias=False, dtype=self.dtype, name='downsample')(x)
      shortcut = norm('downsample_norm')(shortcut)
    return act(y + shortcut)                                              # [B, h, w, C]


class RegStage(nn.Module):
  """`depth` bottlenecks b1..b{depth}; the first maps Cin -> C."""

  depth: int
  features: int
  se_ratio: float = 0.25
  act: str = 'silu'
  norm_eps: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):                                                  # x [B, h, w, Cin]
    for i in range(self.depth):
      x = RegBottleneck(self.features, self.se_ratio, self.act, self.norm_eps, self.dtype, name=f'b{i + 1}')(x)
    return x                                                              # [B, h, w, C]


@register('c_abstractor')
class CAbstractor(nn.Module):
  """Honeybee C-Abstractor: ResNet blocks -> adaptive avg pool to m x m -> ResNet blocks -> MLP readout."""

  in_dim: int
  out_dim: int
  num_queries: int = 144          # M = m * m output tokens
  depth: int = 3                  # bottleneck blocks before and after the pool
  hidden_dim: int | None = None   # Dh, the blocks' width (None = in_dim)
  mlp_depth: int = 2              # readout Linear layers
  se_ratio: float = 0.25          # SE hidden = round(Cin * se_ratio); 0 = no SE (strictly local)
  act: str = 'silu'               # blocks and readout (Honeybee: SiLU)
  pos_emb_grid: Sequence[int] | None = None   # (h0, w0): learned position embedding for that encoder grid
  prenorm: bool = False           # LayerNorm on the encoder tokens first
  norm_eps: float = 1e-6          # timm LayerNorm / LayerNorm2d
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, grid, deterministic: bool = True):          # x [B, N, Dv]
    del deterministic  # no dropout
    who = f'c_abstractor projector (num_queries={self.num_queries})'
    require_2d(grid, who)   # a convolutional / 2-D sampling map of the patches
    if x.shape[-1] != self.in_dim:
      raise ValueError(f'{who} expects in_dim={self.in_dim}, got tokens of width {x.shape[-1]}')
    m = square_side(self.num_queries, 'model.projector.num_queries')
    check_grid_matches_pos_emb(grid, self.pos_emb_grid, who)
    hidden = self.hidden_dim or self.in_dim
    x = tokens_to_map(x.astype(self.dtype), grid, who)                    # [B, h, w, Dv]
    if self.prenorm:
      x = LayerNorm(self.norm_eps, self.dtype, 'prenorm')(x)              # [B, h, w, Dv]
    if self.pos_emb_grid is not None:
      x = x + position_embedding(self, self.pos_emb_grid, self.in_dim, self.dtype)  # [B, h, w, Dv]
    stage = dict(se_ratio=self.se_ratio, act=self.act, norm_eps=self.norm_eps, dtype=self.dtype)
    x = RegStage(self.depth, hidden, **stage, name='s1')(x)               # [B, h, w, Dh]
    x = avg_pool_2d(map_to_tokens(x), grid, (m, m)).reshape(-1, m, m, hidden)   # [B, m, m, Dh]
    x = RegStage(self.depth, hidden, **stage, name='s2')(x)               # [B, m, m, Dh]
    x = map_to_tokens(x)                                                  # [B, M, Dh]
    return dense_stack(x, self.out_dim, self.mlp_depth, self.act, True, self.dtype, 'readout')  # [B, M, Dt]

  @nn.nowrap
  def check(self) -> None:
    check_abstractor_fields(self)
    se = self.se_ratio
    if isinstance(se, bool) or not isinstance(se, (int, float)) or not 0 <= se <= 1:
      raise ValueError(f'model.projector.se_ratio must be a number in [0, 1] (0 = no SE), got {se!r}')

  @nn.nowrap
  def num_output_tokens(self, grid) -> int:
    require_2d(grid, 'c_abstractor projector')
    return self.num_queries

  @nn.nowrap
  def param_count(self) -> int:
    dv, se = self.in_dim, self.se_ratio
    hidden = self.hidden_dim or dv
    pos = self.pos_emb_grid
    n = 2 * dv * bool(self.prenorm) + (pos[0] * pos[1] * dv if pos is not None else 0)
    n += block_param_count(dv, hidden, se) + (2 * self.depth - 1) * block_param_count(hidden, hidden, se)
    return n + dense_stack_param_count(hidden, self.out_dim, self.mlp_depth)
