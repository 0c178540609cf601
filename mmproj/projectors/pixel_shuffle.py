"""Pixel-shuffle projector — Idefics3 (Laurençon et al. 2024, "Building and better understanding vision-language
models: insights and future directions", arXiv:2408.12637; also SmolVLM, arXiv:2504.05299) and InternVL 1.5
(Chen et al. 2024, "How Far Are We to GPT-4V? Closing the Gap to Commercial Multimodal Models with Open-Source
Suites", arXiv:2404.16821).

Space-to-depth ("pixel shuffle", ESPCN's pixel unshuffle) trades tokens for width: every s x s block of patches is
concatenated into one token of width Dv*s*s, then an optional norm and a depth-N MLP map it to the LM width.

    x [B, h*w, Dv] ──space-to-depth(s)──> [B, (h/s)*(w/s), Dv*s*s] ──norm?──> ──MLP(depth)──> y [B, M, Dt]

  Idefics3 / SmolVLM (Idefics3Connector):      norm='none',      depth=1, use_bias=False  (modality_projection)
  InternVL (InternVLMultiModalProjector):       norm='layernorm', depth=2, use_bias=True, act='gelu', eps 1e-5
                                                (LayerNorm(Dv*s*s) Linear(Dv*s*s, Dt) GELU Linear(Dt, Dt);
                                                 InternVL's downsample_ratio is 1/s)

Channel order: block (R, C) emits x[R*s + i, C*s + j] for i, j in row-major order, concatenated: channel
(i*s + j)*Dv + d. Both transformers references (Idefics3Connector.pixel_shuffle and InternVLModel.pixel_shuffle,
i.e. InternVL's ps_version 'v2') produce exactly this order — the test checks each against ours; they differ only
in the head. (InternVL's legacy ps_version 'v1' skipped the last transpose, emitting the blocks column-major; it
is not supported.) Output tokens are the blocks in row-major order.

  tokens in -> out:  N = h*w -> M = (h/s) * (w/s)
  params:            K = in_dim * s^2;  norm: 2K ('layernorm') | K ('rmsnorm') | 0 ('none')
                     + K*out_dim + b*out_dim + (depth - 1) * (out_dim*out_dim + b*out_dim),  b = use_bias
  spatial locality:  kept — output token (R, C) depends only on its s x s block of patches (rows R*s..R*s+s-1,
                     columns C*s..C*s+s-1): the norm and MLP act on one token at a time
  shapes:            x [B, h*w, Dv] -> [B, M, Dv*s*s] ('norm': scale/bias [Dv*s*s]) -> MLP linear_1 [Dv*s*s, Dt]
                     ('embed', 'mlp'), linear_k [Dt, Dt] -> y [B, M, Dt]
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mmproj.layers.token_grid import NORMS, check_divisible, check_grid, norm_layer, norm_params, space_to_depth
from mmproj.projectors.registry import check_choice, check_int, register
from mmproj.projectors.mlp import MLPProjector


@register('pixel_shuffle')
class PixelShuffleProjector(nn.Module):
  """Space-to-depth by scale_factor, optional norm, depth-N MLP: [B, h*w, Dv] -> [B, (h/s)*(w/s), Dt]."""

  in_dim: int
  out_dim: int
  scale_factor: int = 2     # s: blocks of s x s patches (InternVL: 1 / downsample_ratio)
  norm: str = 'none'        # on the shuffled width Dv*s*s: 'none' (Idefics3) | 'layernorm' (InternVL) | 'rmsnorm'
  norm_eps: float = 1e-5    # PyTorch nn.LayerNorm's default (InternVL)
  depth: int = 1            # MLP depth: 1 = one Linear (Idefics3), 2 = Linear act Linear (InternVL)
  act: str = 'gelu'         # between MLP layers (HF projector_hidden_act)
  use_bias: bool = False    # Idefics3's modality_projection has none; InternVL's linears do
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, grid=None, deterministic: bool = True):    # x [B, h*w, Dv]
    del deterministic  # no dropout
    s = self.scale_factor
    grid = check_grid(x, grid, 'pixel_shuffle projector')
    check_divisible(grid, s, 'scale_factor', 'pixel_shuffle projector')
    if x.shape[-1] != self.in_dim:
      raise ValueError(f'pixel_shuffle projector expects in_dim={self.in_dim}, got tokens of width {x.shape[-1]}')
    x = space_to_depth(x, grid, s)                                      # [B, M, Dv*s*s]
    norm = norm_layer(self.norm, self.norm_eps, self.dtype)
    if norm is not None:
      x = norm(x)                                                       # [B, M, Dv*s*s]
    return self._head(name='mlp')(x)                                    # [B, M, Dt]

  @nn.nowrap
  def _head(self, **kwargs) -> MLPProjector:
    """The MLP on the shuffled tokens (width Dv*s*s); kwargs (name, parent) go to it."""
    return MLPProjector(in_dim=self.in_dim * self.scale_factor ** 2, out_dim=self.out_dim, depth=self.depth,
                        act=self.act, use_bias=self.use_bias, dtype=self.dtype, **kwargs)

  @nn.nowrap
  def check(self) -> None:
    check_int('scale_factor', self.scale_factor)
    check_choice('norm', self.norm, NORMS)
    self._head(parent=None).check()   # the MLP head's depth and act

  @nn.nowrap
  def num_output_tokens(self, grid) -> int:
    s = self.scale_factor
    check_divisible(grid, s, 'scale_factor', 'pixel_shuffle projector')
    return (grid[0] // s) * (grid[1] // s)

  @nn.nowrap
  def param_count(self) -> int:
    head = self._head(parent=None)
    return norm_params(self.norm, head.in_dim) + head.param_count()
