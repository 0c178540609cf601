"""The "given" generator: a text-conditioned rectified-flow DiT with its own causal text encoder, one params tree.

It plays Stable Diffusion's role for the draw world (issue 22): an output projector maps an LLM's signal-token
states to the conditioning this generator's text encoder would give the caption, and the generator, frozen, turns
it into an image. Three parts, after the papers they come from:

  text encoder (CLIP's text tower shaped, Radford et al. 2021), caption tokens [B, L] int32 -> cond [B, L, Dc]
    token_embed [V, Dc] + position_embed [L, Dc] (learned)
    blocks: x + self_attn(LN(x)) with a causal mask; x + mlp(LN(x))      (pre-LN, GELU-tanh)
    final_norm: LN over all L positions. cond is every position's state, pads included, as Stable Diffusion
    conditions on all 77 CLIP states; Dc = text_width.
  null conditioning: a learned [L, Dc] table, the "empty caption" of classifier-free guidance (Ho & Salimans
    2022); training replaces a caption's cond by it with probability train.caption_dropout (mmproj/stage0_generator.py).
  velocity model (DiT, Peebles & Xie 2023, with PixArt-alpha's cross-attention, Chen et al. 2023)
    x_t [B, S, S, 3] -> patchify (p x p patches, row-major) -> patch_embed -> [B, N, D], N = (S/p)^2
    + fixed 2-D sin-cos positions [N, D]
    c = time_fc2(silu(time_fc1(sinusoidal features of t))) (+ pooled_proj(mean over L of cond) when pooled_text)
                                                                                       [B, D]
    blocks, each with adaLN-zero modulation from c (6 vectors of [B, D], from a zero-initialised Dense, so every
    block starts as the identity but for its cross-attention):
      x = x + gate_attn * self_attn(LN(x) * (1 + scale_attn) + shift_attn)
      x = x + cross_attn(LN(x), cond)                                                  (keys/values [B, L, Dc])
      x = x + gate_mlp * mlp(LN(x) * (1 + scale_mlp) + shift_mlp)
    final_layer: LN(x) * (1 + scale) + shift -> Dense(p*p*3) (zero-initialised) -> unpatchify -> out [B, S, S, 3]
  The LNs that adaLN modulates have no parameters of their own (DiT).

Time runs from t = 0 (noise) to t = 1 (data): x_t = (1 - t) * noise + t * x, the velocity dx_t/dt = x - noise
(rectified flow, Liu et al. 2023; mmproj/generators/flow.py trains and samples it). Images are in [-1, 1].
What the network's output `out` is (generator.prediction):
  'data'      the clean image x (Li & He 2025, "Back to Basics: Let Denoising Generative Models Denoise", JiT):
              velocity = (out - x_t) / max(1 - t, MIN_REMAINING_TIME). The default: a pixel-space transformer then
              predicts an image, which lies near a low-dimensional manifold, instead of having to pass the noise
              of every pixel through its patch tokens. In 600-step trials of the draw-world recipe (batch 64),
              'velocity' drew scattered patch-sized fragments (recogniser: 3.7% of objects right at guidance 3),
              'data' whole objects of the right colour in the right cell (colour 92%, cell 97%, objects 26%).
  'velocity'  the velocity itself (SD3, SiT).
The loss is the velocity's either way (flow.py).

Param tree: text_encoder/{token_embed, position_embed, block_{i}/{norm1, attn, norm2, mlp}, final_norm}, null_cond,
patch_embed, time_fc1, time_fc2, pooled_proj (pooled_text), block_{i}/{modulation, attn, cross_norm, cross_attn,
mlp}, final_layer/{modulation, proj}. The fields are the generator's config (saved as JSON beside the params by
mmproj.generators.save); `check_config` names a bad field as generator.<field>.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmproj.layers import Attention, CrossAttention, GeluMLP, LayerNorm, causal_padding_mask
from mmproj.layers.mlp import dense

Dtype = Any

TIME_SAMPLINGS = ('uniform', 'logit_normal')   # how training draws t (flow.py: flow_matching_loss)
PREDICTIONS = ('data', 'velocity')              # what the network outputs (module docstring)
MIN_REMAINING_TIME = 0.05                       # 'data': the velocity divides by 1 - t, clipped to this (JiT's 0.05)
TIME_FREQUENCIES = 256                          # sinusoidal features of t fed to the time MLP (DiT's 256)


def sincos_positions(width: int, rows: int, cols: int) -> np.ndarray:
  """Fixed 2-D sin-cos position table [rows * cols, width], row-major: the first half of the channels encodes the
  row, the second the column, each as sin and cos of the index at width/4 geometric frequencies (MAE / DiT)."""
  if width % 4:
    raise ValueError(f'generator.width={width}: 2-D sin-cos positions need a multiple of 4')
  quarter = width // 4
  freqs = 1.0 / 10_000 ** (np.arange(quarter, dtype=np.float64) / quarter)       # [W/4]
  row, col = np.meshgrid(np.arange(rows), np.arange(cols), indexing='ij')
  def encode(index):                                                            # [rows*cols] -> [rows*cols, W/2]
    angles = index.reshape(-1, 1) * freqs[None]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
  return np.concatenate([encode(row), encode(col)], axis=1).astype(np.float32)   # [rows*cols, W]


def time_features(t, dim: int = TIME_FREQUENCIES):
  """t [B] in [0, 1] -> sinusoidal features [B, dim] of 1000 t (DiT's timestep embedding, on its 0..1000 scale)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(10_000.0) * jnp.arange(half, dtype=jnp.float32) / half)  # [dim/2]
  angles = (1000.0 * t.astype(jnp.float32))[:, None] * freqs[None]                    # [B, dim/2]
  return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)                # [B, dim]


def modulate(x, shift, scale):
  """adaLN: x [B, N, D] * (1 + scale [B, D]) + shift [B, D]."""
  return x * (1.0 + scale[:, None]) + shift[:, None]


def _plain_norm(eps: float, name: str) -> nn.LayerNorm:
  """The parameter-free LayerNorm adaLN modulates."""
  return nn.LayerNorm(epsilon=eps, use_bias=False, use_scale=False, name=name)


def _zero_dense(features: int, name: str, dtype: Dtype) -> nn.Dense:
  """A Dense whose kernel and bias start at zero (adaLN-zero modulation, the zero-initialised output layer)."""
  return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, name=name,
                  kernel_init=nn.with_logical_partitioning(nn.initializers.zeros, ('embed', 'mlp')),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('mlp',)))


class TextBlock(nn.Module):
  """Pre-LN causal block (CLIP's text tower): x + attn(LN(x)); x + mlp(LN(x)).  [B, L, Dc] -> [B, L, Dc]."""
  num_heads: int
  mlp_dim: int
  norm_eps: float
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask):                                                # x [B, L, Dc], mask [B, L, L]
    d = x.shape[-1]
    h = LayerNorm(self.norm_eps, self.dtype, name='norm1')(x)
    h, _ = Attention(self.num_heads, self.num_heads, d // self.num_heads, use_bias=True, dtype=self.dtype,
                     name='attn')(h, mask=mask, causal=True)                 # [B, L, Dc]
    x = x + h
    h = LayerNorm(self.norm_eps, self.dtype, name='norm2')(x)
    return x + GeluMLP(self.mlp_dim, act='gelu_tanh', dtype=self.dtype, name='mlp')(h)


class TextEncoder(nn.Module):
  """Caption tokens [B, L] -> every position's final state [B, L, Dc] (module docstring)."""
  vocab_size: int
  length: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  norm_eps: float
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens):                                                 # [B, L] int32
    b, length = tokens.shape
    if length != self.length:
      raise ValueError(f'caption tokens of length {length}; generator.text_len is {self.length} (pad with '
                       'mmproj.generators.caption_tokens)')
    x = nn.Embed(self.vocab_size, self.width, dtype=self.dtype, param_dtype=jnp.float32, name='token_embed',
                 embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ('vocab', 'embed')))(tokens)
    pos = self.param('position_embed', nn.with_logical_partitioning(nn.initializers.normal(0.01), ('pos', 'embed')),
                     (self.length, self.width), jnp.float32)                 # [L, Dc]
    x = x + pos.astype(self.dtype)[None]                                      # [B, L, Dc]
    slots = jnp.arange(length)
    mask = causal_padding_mask(slots, slots, jnp.ones((b, length), jnp.int32))  # [B, L, L]: causal, pads included
    for i in range(self.depth):
      x = TextBlock(self.num_heads, self.mlp_dim, self.norm_eps, self.dtype, name=f'block_{i}')(x, mask)
    return LayerNorm(self.norm_eps, self.dtype, name='final_norm')(x)         # [B, L, Dc]


class DiTBlock(nn.Module):
  """adaLN-zero self-attention, cross-attention to cond, adaLN-zero MLP (module docstring).  [B, N, D] -> same."""
  num_heads: int
  mlp_dim: int
  norm_eps: float
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, c, cond):                       # x [B, N, D], c [B, D], cond [B, L, Dc]
    d = x.shape[-1]
    mod = _zero_dense(6 * d, 'modulation', self.dtype)(nn.silu(c))                # [B, 6D]
    shift_attn, scale_attn, gate_attn, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
    h = modulate(_plain_norm(self.norm_eps, 'norm1')(x), shift_attn, scale_attn)
    h, _ = Attention(self.num_heads, self.num_heads, d // self.num_heads, use_bias=True, dtype=self.dtype,
                     name='attn')(h)                                               # [B, N, D]
    x = x + gate_attn[:, None] * h
    h = LayerNorm(self.norm_eps, self.dtype, name='cross_norm')(x)
    x = x + CrossAttention(self.num_heads, d // self.num_heads, use_bias=True, dtype=self.dtype,
                           name='cross_attn')(h, cond)                             # [B, N, D]
    h = modulate(_plain_norm(self.norm_eps, 'norm2')(x), shift_mlp, scale_mlp)
    return x + gate_mlp[:, None] * GeluMLP(self.mlp_dim, act='gelu_tanh', dtype=self.dtype, name='mlp')(h)


class FinalLayer(nn.Module):
  """adaLN (shift, scale) then a zero-initialised Dense to the patch pixels: [B, N, D] -> [B, N, p*p*3]."""
  patch_pixels: int
  norm_eps: float
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, c):                                                  # x [B, N, D], c [B, D]
    shift, scale = jnp.split(_zero_dense(2 * x.shape[-1], 'modulation', self.dtype)(nn.silu(c)), 2, axis=-1)
    x = modulate(_plain_norm(self.norm_eps, 'norm')(x), shift, scale)
    return _zero_dense(self.patch_pixels, 'proj', self.dtype)(x)             # [B, N, p*p*3]


class Generator(nn.Module):
  """Text encoder + DiT velocity model + learned null conditioning (module docstring). Use through its methods:

    cond = Generator.apply(v, tokens, method='encode_text')        # tokens int32 [B, L] -> [B, L, Dc]
    vel  = Generator.apply(v, x_t, t, cond, method='velocity')     # x_t [B, S, S, 3] f32, t [B] -> [B, S, S, 3]
    null = Generator.apply(v, batch_size, method='null_condition') # [B, L, Dc]
  or as a submodule of a bigger model (its params then sit under that submodule's name). `init` runs __call__,
  which touches every part, so one init creates the whole tree (mmproj.generators.init_params).
  """
  vocab_size: int
  text_len: int                 # L: the caption tokens the text encoder reads (pads included)
  text_width: int               # Dc: the conditioning width
  text_depth: int
  text_heads: int
  text_mlp_dim: int
  image_size: int               # S
  patch_size: int               # p: N = (S / p)^2 image tokens
  width: int                    # D
  depth: int
  num_heads: int
  mlp_dim: int
  pooled_text: bool = True      # add a projection of the mean conditioning state to the adaLN input
  time_sampling: str = 'logit_normal'   # TIME_SAMPLINGS: the training distribution of t (SD3's logit-normal(0, 1))
  prediction: str = 'data'      # PREDICTIONS: what the network outputs (module docstring)
  norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32    # compute dtype (not part of the saved config)

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  def setup(self):
    check_config(config_of(self))
    self.text_encoder = TextEncoder(self.vocab_size, self.text_len, self.text_width, self.text_depth,
                                    self.text_heads, self.text_mlp_dim, self.norm_eps, self.dtype)
    self.null_cond = self.param('null_cond', nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                         ('pos', 'embed')),
                                (self.text_len, self.text_width), jnp.float32)     # [L, Dc]
    self.patch_embed = dense(self.width, ('patch', 'embed'), use_bias=True, dtype=self.dtype, name='patch_embed')
    self.time_fc1 = dense(self.width, ('embed', 'mlp'), use_bias=True, dtype=self.dtype, name='time_fc1')
    self.time_fc2 = dense(self.width, ('mlp', 'embed'), use_bias=True, dtype=self.dtype, name='time_fc2')
    if self.pooled_text:
      self.pooled_proj = dense(self.width, ('embed', 'mlp'), use_bias=True, dtype=self.dtype, name='pooled_proj')
    self.blocks = [DiTBlock(self.num_heads, self.mlp_dim, self.norm_eps, self.dtype, name=f'block_{i}')
                   for i in range(self.depth)]
    self.final_layer = FinalLayer(self.patch_size ** 2 * 3, self.norm_eps, self.dtype)

  def encode_text(self, tokens):
    """tokens int32 [B, L] -> cond [B, L, Dc]."""
    return self.text_encoder(tokens)

  def null_condition(self, batch_size: int):
    """The learned null conditioning, [B, L, Dc]."""
    return jnp.broadcast_to(self.null_cond.astype(self.dtype)[None], (batch_size, self.text_len, self.text_width))

  def velocity(self, x_t, t, cond):
    """x_t [B, S, S, 3] float (images in [-1, 1] at t = 1), t [B] float in [0, 1], cond [B, L, Dc] ->
    the velocity dx_t/dt [B, S, S, 3] float32."""
    b, s = x_t.shape[0], self.image_size
    if x_t.shape[1:] != (s, s, 3):
      raise ValueError(f'velocity: x_t has shape {x_t.shape}; generator.image_size={s} needs [B, {s}, {s}, 3]')
    if cond.shape[1:] != (self.text_len, self.text_width):
      raise ValueError(f'velocity: cond has shape {cond.shape}; the generator is conditioned on [B, '
                       f'{self.text_len}, {self.text_width}] (generator.text_len, generator.text_width)')
    p, g = self.patch_size, self.grid
    x = einops.rearrange(x_t.astype(self.dtype), 'b (h p) (w q) c -> b (h w) (p q c)', p=p, q=p)  # [B, N, p*p*3]
    x = self.patch_embed(x) + jnp.asarray(sincos_positions(self.width, g, g), self.dtype)[None]  # [B, N, D]
    c = self.time_fc2(nn.silu(self.time_fc1(time_features(jnp.broadcast_to(t, (b,))).astype(self.dtype))))  # [B, D]
    cond = cond.astype(self.dtype)
    if self.pooled_text:
      c = c + self.pooled_proj(cond.mean(axis=1))                                 # [B, D]
    for block in self.blocks:
      x = block(x, c, cond)                                                       # [B, N, D]
    x = self.final_layer(x, c)                                                    # [B, N, p*p*3]
    out = einops.rearrange(x, 'b (h w) (p q c) -> b (h p) (w q) c', h=g, p=p, q=p).astype(jnp.float32)
    if self.prediction == 'velocity':
      return out                                                                  # [B, S, S, 3]
    remaining = jnp.maximum(1.0 - jnp.broadcast_to(t, (b,)).astype(jnp.float32), MIN_REMAINING_TIME)  # [B]
    return (out - x_t.astype(jnp.float32)) / remaining[:, None, None, None]      # [B, S, S, 3]

  def __call__(self, tokens, x_t, t):
    """Every part once (for init): the velocity at (x_t, t) conditioned on tokens' text, plus 0 * the null
    conditioning so that its table is created too.  -> [B, S, S, 3]."""
    cond = self.encode_text(tokens)
    return self.velocity(x_t, t, cond + 0.0 * self.null_condition(tokens.shape[0]))


# ----------------------------------------------------------------------------------------------- config


CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(Generator) if f.name not in ('parent', 'name', 'dtype'))
REQUIRED_FIELDS = tuple(f.name for f in dataclasses.fields(Generator)
                        if f.name in CONFIG_FIELDS and f.default is dataclasses.MISSING)


def config_of(generator: Generator) -> dict[str, Any]:
  """The generator's config: every field but dtype, defaults filled in (what save() writes as JSON)."""
  return {f: getattr(generator, f) for f in CONFIG_FIELDS}


def check_config(cfg: Any) -> dict[str, Any]:
  """cfg (dict / ConfigDict of Generator fields) -> a plain dict with defaults filled in; ValueError naming
  generator.<field> for an unknown, missing or inconsistent field."""
  cfg = dict(cfg)
  unknown = sorted(set(cfg) - set(CONFIG_FIELDS))
  if unknown:
    raise ValueError(f'generator.{unknown[0]}: unknown field; the generator has {", ".join(CONFIG_FIELDS)}')
  missing = [f for f in REQUIRED_FIELDS if f not in cfg]
  if missing:
    raise ValueError(f'generator.{missing[0]}: missing (required: {", ".join(REQUIRED_FIELDS)})')
  defaults = {f.name: f.default for f in dataclasses.fields(Generator) if f.name in CONFIG_FIELDS
              and f.default is not dataclasses.MISSING}
  cfg = {**defaults, **cfg}
  for f in REQUIRED_FIELDS:
    if not isinstance(cfg[f], (int, np.integer)) or isinstance(cfg[f], bool) or cfg[f] < 1:
      raise ValueError(f'generator.{f}: must be a positive int, got {cfg[f]!r}')
  if cfg['image_size'] % cfg['patch_size']:
    raise ValueError(f"generator.patch_size={cfg['patch_size']} does not divide generator.image_size="
                     f"{cfg['image_size']}")
  for width, heads in (('width', 'num_heads'), ('text_width', 'text_heads')):
    if cfg[width] % cfg[heads]:
      raise ValueError(f'generator.{heads}={cfg[heads]} does not divide generator.{width}={cfg[width]}')
  if cfg['width'] % 4:
    raise ValueError(f"generator.width={cfg['width']}: the 2-D sin-cos positions need a multiple of 4")
  if cfg['prediction'] not in PREDICTIONS:
    raise ValueError(f"generator.prediction={cfg['prediction']!r}: expected one of {PREDICTIONS}")
  if cfg['time_sampling'] not in TIME_SAMPLINGS:
    raise ValueError(f"generator.time_sampling={cfg['time_sampling']!r}: expected one of {TIME_SAMPLINGS}")
  return cfg


def build(cfg: Any, dtype: Dtype = jnp.float32) -> Generator:
  """The generator of cfg (dict / ConfigDict of its fields; check_config's errors)."""
  return Generator(**check_config(cfg), dtype=dtype)


def init_params(generator: Generator, rng) -> dict:
  """Fresh params of `generator` (plain arrays, logical-axis boxes removed); jitted, since flax's eager init of
  the many small layers compiles each op on its own (several times slower on a CPU)."""
  s = generator.image_size

  def init(rng):
    variables = generator.init(rng, jnp.zeros((1, generator.text_len), jnp.int32), jnp.zeros((1, s, s, 3)),
                               jnp.zeros((1,)))
    return nn.unbox(variables['params'])
  return jax.jit(init)(rng)


def param_count(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
