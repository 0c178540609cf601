"""Perceiver Resampler — Flamingo (Alayrac et al. 2022, "Flamingo: a Visual Language Model for Few-Shot
Learning", arXiv:2204.14198; OpenFlamingo's PerceiverResampler, Idefics v1's IdeficsPerceiverResampler), and the
Idefics2 variant (Laurençon et al. 2024, "What matters when building vision-language models?", arXiv:2405.02246;
transformers Idefics2Connector = modality projection + Idefics2PerceiverResampler).

M learned latents cross-attend to the visual tokens; keys/values come from concat(context, latents), so latents
also attend to each other. The output is always M tokens, whatever the number of visual tokens or frames.

  x [B, N, Dv] ──(idefics2: modality_projection SwiGLU Dv -> P -> Dt)──> context [B, N, D]
               (+ frame_embeddings[f] on the tokens of frame f, when max_frames > 0)
  latents [M, D] (learned) ──> z [B, M, D]
  depth x:  kv = concat(norm_c(context), norm_l(z))          # [B, N + M, D]
            z = z + o_proj(attn(q_proj(norm_l(z)), k_proj(kv), v_proj(kv)))            # [B, M, D]
            z = z + FF(norm_ff(z))                                                      # [B, M, D]
  z = norm(z) ──(flamingo: out_proj Linear D -> Dt)──> y [B, M, Dt]

Variants (field `variant`):
  'flamingo': LayerNorm (eps 1e-5, PyTorch's), FF = Linear(D, ff_mult*D) act Linear(ff_mult*D, D) without
              biases, act 'gelu' (OpenFlamingo; Idefics v1 uses 'relu'); perceiver width D = Dv (as in
              OpenFlamingo), then `out_proj` Linear(Dv, Dt) with bias (always, so the output is LM-width and the
              LM sees a learned map of the normed latents).
  'idefics2': RMSNorm (eps 1e-6), FF = SwiGLU down(act(gate(z)) * up(z)) with hidden ff_mult*D, act 'silu';
              the modality projection SwiGLU(Dv -> proj_hidden -> Dt) comes first, so D = Dt.
  Both: GQA attention (num_kv_heads < num_heads), no attention biases, optional per-head q/k norms
  (`qk_norm`, Idefics v1's qk_layer_norms_perceiver). `proj` overrides the variant's projection:
  'linear' (out_proj after), 'swiglu' (modality projection before), 'none' (needs in_dim == out_dim; the bare
  HF resampler classes).

Video / several frames: pass x [B, F*h*w, Dv] — F frames of grid (h, w) concatenated in time order, each
row-major; F = N // (h*w) is read from the token count and `grid`. With max_frames > 0 a learned time embedding
[max_frames, D] is added to every token of frame f (OpenFlamingo's frame_embs); with max_frames = 0 the frames are
one unordered set of tokens. All F frames are resampled into one set of M latents (OpenFlamingo, per media item).
Audio: x [B, T, Dv] with grid=(T,) is one frame of T tokens (the latents attend to all of them; no time position
is added here, any comes from the encoder).

Optional keyword `mask` [B, N] (nonzero = real token) hides padded visual tokens (Idefics2's patch attention
mask); latents are always visible.

  tokens in -> out:  N = F*h*w -> M = num_latents
  params:            with D the perceiver width (Dv for proj 'linear'/'none', Dt for 'swiglu'), F_ff = ff_mult*D,
                     H = num_heads, Hkv = num_kv_heads (default H), Dh = head_dim, n(D) = 2*D (LayerNorm) or
                     D (RMSNorm):
                       num_latents*D + max_frames*D
                       + depth * (3*n(D) + D*H*Dh + 2*D*Hkv*Dh + H*Dh*D + [qk_norm]*2*n(Dh)
                                  + 2*D*F_ff (flamingo) or 3*D*F_ff (idefics2))
                       + n(D)
                       + Dv*Dt + Dt (proj 'linear')  or  2*Dv*P + P*Dt (proj 'swiglu', P = proj_hidden)
  spatial locality:  not kept — every latent attends to every visual token (a learned, content-based pooling)
  shapes:            x [B, N, Dv], mask [B, N] -> context [B, N, D]; latents [M, D] ('pos', 'embed');
                     frame_embeddings [max_frames, D] ('pos', 'embed'); q [B, M, H, Dh], k/v [B, N+M, Hkv, Dh]
                     -> y [B, M, Dt]

Parameter names follow HF Idefics2 (layers_i/{input_latents_norm, input_context_norm, self_attn, post_attention_
layernorm, mlp}, norm) for both variants; mlp is fc1/fc2 (flamingo) or gate_proj/up_proj/down_proj (idefics2).
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mmproj.layers import ACTIVATIONS, GeluMLP, SwiGLU, dense, padding_mask
from mmproj.layers.cross_attention import CrossAttention, make_norm, norm_param_count
from mmproj.layers.token_grid import grid_tokens
from mmproj.projectors.registry import check_choice, check_int, check_positive, register
from mmproj.projectors.cross_attention import check_num_kv_heads

VARIANTS = {
    #            norm     FF        act     eps   proj
    'flamingo': ('layer', 'gelu_mlp', 'gelu', 1e-5, 'linear'),
    'idefics2': ('rms', 'swiglu', 'silu', 1e-6, 'swiglu'),
}
PROJS = ('none', 'linear', 'swiglu')


class PerceiverLayer(nn.Module):
  """One resampler block: latents attend to concat(context, latents), then a feed-forward; both residual."""

  norm: str
  ff: str
  act: str
  eps: float
  num_heads: int
  num_kv_heads: int | None
  head_dim: int
  ff_mult: int
  qk_norm: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z, context, mask=None):                  # z [B, M, D], context [B, N, D]
    d = z.shape[-1]
    z_n = make_norm(self.norm, self.eps, self.dtype, 'input_latents_norm')(z)            # [B, M, D]
    c_n = make_norm(self.norm, self.eps, self.dtype, 'input_context_norm')(context)      # [B, N, D]
    kv = jnp.concatenate([c_n, z_n], axis=1)                                             # [B, N + M, D]
    z = z + CrossAttention(
        self.num_heads, self.head_dim, num_kv_heads=self.num_kv_heads, out_features=d,
        qk_norm=self.norm if self.qk_norm else None, norm_eps=self.eps, dtype=self.dtype,
        name='self_attn')(z_n, kv, mask=mask)                                            # [B, M, D]
    h = make_norm(self.norm, self.eps, self.dtype, 'post_attention_layernorm')(z)        # [B, M, D]
    if self.ff == 'swiglu':
      h = SwiGLU(self.ff_mult * d, act=self.act, dtype=self.dtype, name='mlp')(h)   # HF Idefics2MLP
    else:
      h = GeluMLP(self.ff_mult * d, act=self.act, use_bias=False, dtype=self.dtype, name='mlp')(h)
    return z + h                                                                         # [B, M, D]


@register('perceiver')
class PerceiverResampler(nn.Module):
  """M learned latents resample N visual tokens (any N, any number of frames): [B, N, Dv] -> [B, M, Dt]."""

  in_dim: int
  out_dim: int
  variant: str = 'flamingo'           # 'flamingo' (OpenFlamingo / Idefics v1) or 'idefics2'
  num_latents: int = 64
  depth: int = 6
  num_heads: int = 8
  num_kv_heads: int | None = None     # None = num_heads; fewer = GQA (Idefics2)
  head_dim: int = 64
  ff_mult: int = 4                    # FF hidden = ff_mult * D
  act: str | None = None              # None = the variant's ('gelu' / 'silu'); Idefics v1: 'relu'
  norm_eps: float | None = None       # None = the variant's (1e-5 / 1e-6)
  qk_norm: bool = False               # per-head norms on q and k (Idefics v1 qk_layer_norms_perceiver)
  max_frames: int = 0                 # > 0: learned time embeddings for up to max_frames frames
  proj: str | None = None             # None = the variant's ('linear' / 'swiglu'); 'none' needs in_dim == out_dim
  proj_hidden: int | None = None      # SwiGLU modality projection hidden; None = ff_mult * out_dim
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, grid=None, deterministic: bool = True, mask=None):           # x [B, N, Dv]
    del deterministic  # no dropout
    norm, ff, act, eps, proj = self._resolve()
    b, n, dv = x.shape
    if dv != self.in_dim:
      raise ValueError(f'perceiver projector expects in_dim={self.in_dim}, got tokens of width {dv}')
    if proj == 'none' and self.in_dim != self.out_dim:
      raise ValueError(f'model.projector.proj="none" needs in_dim == out_dim, got {self.in_dim} != {self.out_dim}')
    frames = self._num_frames(n, grid)

    context = x.astype(self.dtype)                                                       # [B, N, Dv]
    if proj == 'swiglu':
      hidden = self.proj_hidden or self.ff_mult * self.out_dim
      context = SwiGLU(hidden, self.out_dim, act, dtype=self.dtype,
                       name='modality_projection')(context)                              # [B, N, Dt]
    d = context.shape[-1]
    if self.max_frames:
      # Small init: an untrained time table should not swamp the visual features it is added to.
      table = self.param('frame_embeddings', nn.with_logical_partitioning(
          nn.initializers.normal(0.02), ('pos', 'embed')), (self.max_frames, d), jnp.float32)  # [F_max, D]
      per_token = jnp.repeat(table[:frames], n // frames, axis=0)                        # [N, D] frame of token
      context = context + per_token.astype(self.dtype)[None]                             # [B, N, D]

    # N(0, 1) as OpenFlamingo's torch.randn; every block normalises the latents before using them.
    latents = self.param('latents', nn.with_logical_partitioning(
        nn.initializers.normal(1.0), ('pos', 'embed')), (self.num_latents, d), jnp.float32)  # [M, D]
    z = jnp.broadcast_to(latents.astype(self.dtype)[None], (b, self.num_latents, d))     # [B, M, D]

    attn_mask = None
    if mask is not None:
      if mask.shape != (b, n):
        raise ValueError(f'perceiver mask must be [B, N] = {(b, n)}, got {mask.shape}')
      keys_ok = jnp.concatenate([mask.astype(bool), jnp.ones((b, self.num_latents), bool)], axis=1)  # [B, N+M]
      attn_mask = padding_mask(keys_ok, self.num_latents)                                # [B, M, N + M]

    for i in range(self.depth):
      z = PerceiverLayer(norm, ff, act, eps, self.num_heads, self.num_kv_heads, self.head_dim, self.ff_mult,
                         self.qk_norm, dtype=self.dtype, name=f'layers_{i}')(z, context, attn_mask)  # [B, M, D]
    z = make_norm(norm, eps, self.dtype, 'norm')(z)                                      # [B, M, D]
    if proj == 'linear':
      z = dense(self.out_dim, ('embed', 'mlp'), use_bias=True, dtype=self.dtype, name='out_proj')(z)  # [B, M, Dt]
    return z                                                                             # [B, M, Dt]

  def _num_frames(self, n: int, grid) -> int:
    """Frames F in x [B, F*h*w, Dv] (grid (h, w)) or x [B, F*T, Dv] (grid (T,)); 1 without a grid."""
    if grid is None:
      return 1
    hw = grid_tokens(grid, 'perceiver')
    if hw <= 0 or n % hw:
      raise ValueError(f'perceiver: {n} visual tokens are not a whole number of frames of grid {tuple(grid)}')
    frames = n // hw
    if self.max_frames and frames > self.max_frames:
      raise ValueError(f'perceiver: {frames} frames of grid {tuple(grid)} exceed '
                       f'model.projector.max_frames={self.max_frames}')
    return frames

  @nn.nowrap
  def _resolve(self):
    """(norm kind, FF kind, act, eps, proj) with the variant's defaults filled in for the None fields."""
    norm, ff, v_act, v_eps, v_proj = VARIANTS[check_choice('variant', self.variant, VARIANTS)]
    return norm, ff, self.act or v_act, self.norm_eps or v_eps, self.proj or v_proj

  @nn.nowrap
  def check(self) -> None:
    check_choice('variant', self.variant, VARIANTS)
    for key, low in (('num_latents', 1), ('depth', 1), ('head_dim', 1), ('ff_mult', 1), ('max_frames', 0)):
      check_int(key, getattr(self, key), low)
    check_int('proj_hidden', self.proj_hidden, optional=True)
    check_num_kv_heads(self.num_kv_heads, check_int('num_heads', self.num_heads))
    check_choice('act', self.act, ACTIVATIONS, optional=True)       # None: the variant's
    check_choice('proj', self.proj, PROJS, optional=True)
    check_positive('norm_eps', self.norm_eps, optional=True)        # None: the variant's

  @nn.nowrap
  def num_output_tokens(self, grid) -> int:
    return self.num_latents

  @nn.nowrap
  def param_count(self) -> int:
    norm, ff, _, _, proj = self._resolve()
    dv, dt, h, dh = self.in_dim, self.out_dim, self.num_heads, self.head_dim
    d = dt if proj == 'swiglu' else dv
    attn = CrossAttention.param_count(d, d, d, h, dh, self.num_kv_heads, qk_norm=norm if self.qk_norm else None)
    ffn = (3 if ff == 'swiglu' else 2) * d * self.ff_mult * d
    layer = 3 * norm_param_count(norm, d) + attn + ffn
    n = self.num_latents * d + self.max_frames * d + self.depth * layer + norm_param_count(norm, d)
    if proj == 'linear':
      n += dv * dt + dt
    elif proj == 'swiglu':
      hidden = self.proj_hidden or self.ff_mult * dt
      n += 2 * dv * hidden + hidden * dt
    return n
