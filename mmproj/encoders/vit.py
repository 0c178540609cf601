"""Vision Transformer shaped like the CLIP / SigLIP vision towers (Dosovitskiy et al. 2021; Radford et al. 2021;
Zhai et al. 2023), optionally with Qwen2-VL's temporal patches (Wang et al. 2024, "Qwen2-VL: Enhancing
Vision-Language Model's Perception of the World at Any Resolution", arXiv:2409.12191).

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

Video [B, F, H, W, 3] (uint8 or float, normalised like an image): the frames are folded into the batch and each
temporal group of t = temporal_patch_size consecutive frames is encoded on its own, as LLaVA-NeXT-Video and
LLaVA-OneVision encode frames (every group gets the same position embeddings; no attention across groups):
  [B, F, H, W, 3] -> [B*F', t, H, W, 3] -> tower -> [B*F', N, D] -> tokens [B, F'*N, D], F' = F / t
The groups come back in time order, each row-major, with grid = (H/p, W/p) of one group (the mmproj video
convention: F' = tokens // (h*w)). F not divisible by t is a ValueError naming model.encoder.temporal_patch_size
(Qwen2-VL's video processor pads with copies of the last frame instead; pad before calling).
Temporal patches (t > 1, Qwen2-VL's PatchEmbed, a bias-free Conv3d with kernel = stride = (t, p, p)): each patch
is t frames x p x p pixels x 3, embedded by one matmul; an image is its frame repeated t times (Qwen2-VL's image
processor does the same), so an image and a still video of t copies of it give the same tokens. t = 1 (default)
is the per-frame patch of CLIP / SigLIP, with exactly the parameters of an image-only tower.

Parameter names follow HF CLIPVisionTransformer: patch_embedding, class_embedding, position_embedding,
pre_layernorm, layers_{i}/{layer_norm1, self_attn/{q,k,v,o}_proj, layer_norm2, mlp/{fc1, fc2}}, post_layernorm.
With scan_layers the blocks run as one nn.scan and their params are one stacked tree, layers/{layer_norm1, ...}
with a leading [num_blocks] axis (logical 'layers'; mmproj/layers/scan.py); remat ('none' | 'dots' | 'minimal' |
'full', from cfg.model.remat) wraps each block in nn.remat. mmproj.convert.stack_layers / unstack_layers convert
between layers_{i} and the stacked layout.
The patch kernel is stored flattened as [t*p*p*3, D] ('patch', 'embed') in (frame, row, col, channel) order, i.e.
the HF conv weight [D, 3, p, p] transposed to [p, p, 3, D] and reshaped (t = 1), or Qwen2-VL's Conv3d weight
[D, 3, t, p, p] transposed to [t, p, p, 3, D] and reshaped: a 4-d (5-d) kernel would need the logical name 'patch'
on several axes, which flax's logical partitioning rejects.
"""

from typing import Any

import einops
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
  """Non-overlapping t x p x p patches -> linear map to width: [B, H, W, C] (t = 1) or [B, t, H, W, C] ->
  [B, h*w, D], grid (h, w); the flattened patch is in (frame, row, col, channel) order, as the kernel rows."""

  patch_size: int
  width: int
  dtype: Dtype = jnp.float32
  temporal_patch_size: int = 1

  @nn.nowrap
  def output_grid(self) -> tuple[int, int]:
    """The patch grid (h, w) of one image (or video frame), from the fields alone."""
    n = self.image_size // self.patch_size
    return n, n

  @nn.compact
  def __call__(self, pixels):                                             # [B, H, W, C] or [B, t, H, W, C]
    if pixels.ndim == 4:
      pixels = pixels[:, None]                                            # [B, 1, H, W, C]
    b, t, hh, ww, c = pixels.shape
    if t != self.temporal_patch_size:
      raise ValueError(f'patch embedding of temporal_patch_size={self.temporal_patch_size} got {t} frames per group')
    p = self.patch_size
    h, w = hh // p, ww // p
    x = einops.rearrange(pixels, 'b t (h p) (w q) c -> b (h w) (t p q c)', h=h, p=p, w=w, q=p)  # [B, N, t*p*p*C]
    kernel = self.param('kernel', nn.with_logical_partitioning(nn.initializers.lecun_normal(), ('patch', 'embed')),
                        (t * p * p * c, self.width), jnp.float32)         # [t*p*p*C, D]
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
  temporal_patch_size: int = 1  # frames per patch (Qwen2-VL: 2); 1 = per-frame patches
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
    """Matmul FLOPs (2 per multiply-add) of one image's forward pass (one temporal group of t frames: a video of
    F frames costs F / t times this), N = (image_size / p)^2 patches, S = N (+1 with cls_token) tokens, D width,
    F mlp_dim:
      embed      patch embedding                                    2 * N * (3 t p^2) * D
      per block (`blocks` = num_blocks of them):
        weights    q, k, v, o, fc1, fc2                             2 * S * (4 D^2 + 2 D F)
        attention  scores q k^T and weighted sum p v                2 * 2 * S^2 * D
        last       fc2, the block's last matmul (the one remat='full' does not recompute)   2 * S * F * D"""
    n = (self.image_size // self.patch_size) ** 2
    s, d, f = n + int(self.cls_token), self.width, self.mlp_dim
    return dict(embed=2 * n * 3 * self.temporal_patch_size * self.patch_size ** 2 * d, blocks=self.num_blocks,
                weights=2 * s * (4 * d * d + 2 * d * f), attention=2 * 2 * s * s * d, last=2 * s * f * d)

  @nn.nowrap
  def output_grid(self) -> tuple[int, int]:
    """The patch grid (h, w) of one image (or video frame), from the fields alone."""
    n = self.image_size // self.patch_size
    return n, n

  @nn.compact
  def __call__(self, pixels):                                             # image [B, H, W, 3] | video [B, F, H, W, 3]
    b, groups, pixels = self._frame_groups(pixels)                        # [B*F', t, H, W, 3] (image: [B, H, W, 3])
    x = to_float_image(pixels, self.image_mean, self.image_std).astype(self.dtype)
    x, grid = PatchEmbedding(self.patch_size, self.width, self.dtype, self.temporal_patch_size,
                             name='patch_embedding')(x)                   # [B*F', N, D]
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
      x = x[:, 1:]                                                        # [B*F', N, D]
    if groups is not None:
      x = einops.rearrange(x, '(b f) n d -> b (f n) d', b=b, f=groups)    # [B, F'*N, D], groups in time order
    return x, grid

  @nn.nowrap
  def _frame_groups(self, pixels):
    """image [B, H, W, 3] or video [B, F, H, W, 3] -> (B, F' or None for an image, pixels for the patch embedding):
    an image with t = 1 passes unchanged ([B, H, W, 3]); otherwise [B*F', t, H, W, 3], an image being its frame
    repeated t times (F' = 1). ValueError naming the field when t does not divide F."""
    if pixels.ndim not in (4, 5):
      raise ValueError(f'ViT input must be an image [B, H, W, 3] or a video [B, F, H, W, 3], got shape {pixels.shape}')
    if pixels.shape[-3:-1] != (self.image_size, self.image_size):
      raise ValueError(f'image of shape {pixels.shape} does not match image_size={self.image_size}')
    t = self.temporal_patch_size
    if not isinstance(t, int) or isinstance(t, bool) or t < 1:
      raise ValueError(f'model.encoder.temporal_patch_size must be an int >= 1, got {t!r}')
    if pixels.ndim == 4:
      if t == 1:
        return pixels.shape[0], None, pixels                              # [B, H, W, 3], as an image-only tower
      return pixels.shape[0], None, jnp.repeat(pixels[:, None], t, axis=1)   # [B, t, H, W, 3]
    b, f = pixels.shape[:2]
    if f % t:
      raise ValueError(f'video of F={f} frames (shape {pixels.shape}) is not a whole number of temporal patches of '
                       f'model.encoder.temporal_patch_size={t}')
    return b, f // t, einops.rearrange(pixels, 'b (g t) h w c -> (b g) t h w c', t=t)   # [B*F', t, H, W, 3]
