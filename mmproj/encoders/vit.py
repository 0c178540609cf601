"""Vision Transformer shaped like the CLIP / SigLIP vision towers (Dosovitskiy et al. 2021; Radford et al. 2021;
Zhai et al. 2023).

  image uint8 [B, H, W, 3] --(x / 127.5 - 1, or (x / 255 - image_mean) / image_std)--> float [B, H, W, 3]
                                                                        (a float image is used as given)
  patch_embedding: stride-p conv == patchify + matmul   -> [B, N, D]    N = (H/p) * (W/p), row-major grid
  (+ class_embedding prepended when cls_token, CLIP)    -> [B, N(+1), D]
  + position_embedding (learned)                         -> [B, N(+1), D]
  pre_layernorm (optional, CLIP's "pre_layrnorm")
  blocks: x + self_attn(layer_norm1(x)); x + mlp(layer_norm2(x))   (pre-LN, bidirectional, no RoPE)
  output_layer: -1 = last block's output, -2 = penultimate (LLaVA), ...; only the blocks up to that one are
    built, so a truncated tower has no dead parameters (an HF converter skips the unused top blocks).
  post_layernorm (optional, SigLIP's): applied to all tokens of the selected block's output. HF applies it only to
    the last block's output, so for parity with hidden_states[k < -1] set final_norm=False.
  -> patch tokens [B, N, D] (CLS dropped), grid (H/p, W/p)

Parameter names follow HF CLIPVisionTransformer: patch_embedding, class_embedding, position_embedding,
pre_layernorm, layers_{i}/{layer_norm1, self_attn/{q,k,v,o}_proj, layer_norm2, mlp/{fc1, fc2}}, post_layernorm.
With scan_layers the blocks run as one nn.scan and their params are one stacked tree, layers/{layer_norm1, ...}
with a leading [num_blocks] axis (logical 'layers'; mmproj/layers/scan.py); remat ('none' | 'dots' | 'minimal' |
'full', from cfg.model.remat) wraps each block in nn.remat. mmproj.convert.stack_layers / unstack_layers convert
between layers_{i} and the stacked layout.
The patch kernel is stored flattened as [p*p*3, D] ('patch', 'embed') in (row, col, channel) order, i.e. the HF conv
weight [D, 3, p, p] transposed to [p, p, 3, D] and reshaped: a 4-d kernel would need the logical name 'patch' on
three axes, which flax's logical partitioning rejects.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mmproj.layers import Attention, GeluMLP, LayerNorm
from mmproj.layers.scan import check_remat, check_scan, remat_block, scan_blocks

Dtype = Any


def to_float_image(image, mean=None, std=None):
  """uint8 [B, H, W, C] in [0, 255] -> float32: x / 127.5 - 1 when mean/std are None, else the HF image
  processors' rescale + normalise, (x / 255 - mean) / std per channel. A floating image is returned unchanged
  (it is taken as already normalised, e.g. the output of mmproj.data.preprocess.ImageProcessor)."""
  if jnp.issubdtype(image.dtype, jnp.floating):
    return image
  if mean is None and std is None:
    return image.astype(jnp.float32) / 127.5 - 1.0
  if mean is None or std is None:
    raise ValueError('model.encoder.image_mean and image_std must be set together')
  x = image.astype(jnp.float32) * jnp.float32(1 / 255)
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


class PatchEmbedding(nn.Module):
  """Non-overlapping p x p patches -> linear map to width: [B, H, W, C] -> [B, h*w, D], grid (h, w)."""

  patch_size: int
  width: int
  dtype: Dtype = jnp.float32

  @nn.nowrap
  def output_grid(self) -> tuple[int, int]:
    """The patch grid (h, w) of one image (or video frame), from the fields alone."""
    n = self.image_size // self.patch_size
    return n, n

  @nn.compact
  def __call__(self, image):                                              # [B, H, W, C]
    b, hh, ww, c = image.shape
    p = self.patch_size
    h, w = hh // p, ww // p
    x = image.reshape(b, h, p, w, p, c).transpose(0, 1, 3, 2, 4, 5)       # [B, h, w, p, p, C]
    x = x.reshape(b, h * w, p * p * c)                                    # [B, N, p*p*C]
    kernel = self.param('kernel', nn.with_logical_partitioning(nn.initializers.lecun_normal(), ('patch', 'embed')),
                        (p * p * c, self.width), jnp.float32)             # [p*p*C, D]
    bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros, ('embed',)),
                      (self.width,), jnp.float32)                         # [D]
    x = x @ kernel.astype(self.dtype) + bias.astype(self.dtype)           # [B, N, D]
    return x, (h, w)                                                      # [B, N, D]


class EncoderBlock(nn.Module):
  """Pre-LN transformer block: x + MHA(LN(x)); x + MLP(LN(x)).  [B, N, D] -> [B, N, D]."""

  num_heads: int
  mlp_dim: int
  act: str = 'gelu'
  norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):                                                  # [B, N, D]
    d = x.shape[-1]
    h = LayerNorm(self.norm_eps, self.dtype, name='layer_norm1')(x)
    h, _ = Attention(self.num_heads, self.num_heads, d // self.num_heads, use_bias=True, use_rope=False,
                     dtype=self.dtype, name='self_attn')(h)               # [B, N, D]
    x = x + h
    h = LayerNorm(self.norm_eps, self.dtype, name='layer_norm2')(x)
    x = x + GeluMLP(self.mlp_dim, act=self.act, dtype=self.dtype, name='mlp')(h)
    return x                                                              # [B, N, D]


class ScanEncoderBlock(EncoderBlock):
  """EncoderBlock with the (carry) -> (carry, y) signature nn.scan wants: x [B, N, D] -> ([B, N, D], None)."""

  def __call__(self, x):                                                  # [B, N, D]
    return super().__call__(x), None


class ViT(nn.Module):
  """CLIP/SigLIP-shaped vision tower returning patch tokens [B, N, D] and the patch grid (h, w)."""

  image_size: int
  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  output_layer: int = -1
  cls_token: bool = False
  pre_norm: bool = False
  final_norm: bool = True
  norm_eps: float = 1e-6
  act: str = 'gelu'
  image_mean: tuple[float, ...] | None = None   # per-channel normalisation of uint8 input (CLIP: OPENAI_CLIP_MEAN)
  image_std: tuple[float, ...] | None = None    # None, None: x / 127.5 - 1 (= mean 0.5, std 0.5: SigLIP's)
  scan_layers: bool = False     # one nn.scan over the num_blocks blocks (params under layers/ with a leading axis)
  remat: str = 'none'           # 'none' | 'dots' | 'minimal' | 'full' (mmproj/layers/scan.py)
  dtype: Dtype = jnp.float32

  @property
  def grid(self) -> tuple[int, int]:
    return self.image_size // self.patch_size, self.image_size // self.patch_size

  @property
  def num_blocks(self) -> int:
    """Blocks actually run: up to and including the one selected by `output_layer`."""
    if not -self.depth <= self.output_layer <= -1:
      raise ValueError(f'output_layer={self.output_layer} out of range [-{self.depth}, -1]')
    return self.depth + self.output_layer + 1

  def matmul_flops(self) -> dict[str, int]:
    """Matmul FLOPs (2 per multiply-add) of one image's forward pass, N = (image_size / p)^2 patches, S = N (+1
    with cls_token) tokens, D width, F mlp_dim:
      embed      patch embedding                                    2 * N * (3 p^2) * D
      per block (`blocks` = num_blocks of them):
        weights    q, k, v, o, fc1, fc2                             2 * S * (4 D^2 + 2 D F)
        attention  scores q k^T and weighted sum p v                2 * 2 * S^2 * D
        last       fc2, the block's last matmul (the one remat='full' does not recompute)   2 * S * F * D"""
    n = (self.image_size // self.patch_size) ** 2
    s, d, f = n + int(self.cls_token), self.width, self.mlp_dim
    return dict(embed=2 * n * 3 * self.patch_size ** 2 * d, blocks=self.num_blocks,
                weights=2 * s * (4 * d * d + 2 * d * f), attention=2 * 2 * s * s * d, last=2 * s * f * d)

  @nn.nowrap
  def output_grid(self) -> tuple[int, int]:
    """The patch grid (h, w) of one image (or video frame), from the fields alone."""
    n = self.image_size // self.patch_size
    return n, n

  @nn.compact
  def __call__(self, image):                                              # [B, H, W, 3]
    if image.shape[1:3] != (self.image_size, self.image_size):
      raise ValueError(f'image of shape {image.shape} does not match image_size={self.image_size}')
    x = to_float_image(image, self.image_mean, self.image_std).astype(self.dtype)                          # [B, H, W, 3]
    x, grid = PatchEmbedding(self.patch_size, self.width, self.dtype, name='patch_embedding')(x)
    if self.cls_token:
      cls = self.param('class_embedding',
                       nn.with_logical_partitioning(nn.initializers.normal(0.02), ('embed',)),
                       (self.width,), jnp.float32)                        # [D]
      cls = jnp.broadcast_to(cls.astype(self.dtype), (x.shape[0], 1, self.width))
      x = jnp.concatenate([cls, x], axis=1)                               # [B, 1+N, D]
    pos = self.param('position_embedding',
                     nn.with_logical_partitioning(nn.initializers.normal(0.02), ('pos', 'embed')),
                     (x.shape[1], self.width), jnp.float32)               # [N(+1), D]
    x = x + pos.astype(self.dtype)[None]
    if self.pre_norm:
      x = LayerNorm(self.norm_eps, self.dtype, name='pre_layernorm')(x)
    check_remat(self.remat)
    block = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, act=self.act, norm_eps=self.norm_eps,
                 dtype=self.dtype)
    if check_scan(self.scan_layers, 'model.encoder.scan_layers'):
      x, _ = scan_blocks(ScanEncoderBlock, self.num_blocks, remat=self.remat)(**block, name='layers')(x)
    else:
      block_cls = remat_block(EncoderBlock, self.remat)
      for i in range(self.num_blocks):
        x = block_cls(**block, name=f'layers_{i}')(x)                     # [B, N(+1), D]
    if self.final_norm:
      x = LayerNorm(self.norm_eps, self.dtype, name='post_layernorm')(x)
    if self.cls_token:
      x = x[:, 1:]                                                        # [B, N, D]
    return x, grid
