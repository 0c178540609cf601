"""MultimodalLM: image encoder -> projector -> visual tokens written into the LM's input sequence.

  image [B, H, W, 3] --encoder--> [B, N, Dv] (grid h x w) --projector--> visual [B, M, Dt]
  tokens [B, L] --lm.embed--> [B, L, Dt]; the k-th <image> placeholder of a row is replaced by visual[:, k]
  merged [B, L, Dt] --lm (causal, key-padding mask, explicit positions)--> logits [B, L, V] float32

Shapes are static: the data pipeline writes exactly M = num_image_tokens(cfg.model) placeholders per row (anywhere
in the row; left padding is fine). Params: {'encoder', 'projector', 'lm'} ('lm' only for the blind baseline,
use_image=False), stored in cfg.model.param_dtype.<tower> (float32; a frozen tower may be stored in bfloat16);
compute runs in cfg.model.dtype; logits come back float32.
With encoder_trainable=False the encoder output goes through stop_gradient, so no backward pass runs through it.

The output side (model.output, NExT-GPT / GILL; has_output): the LM emits K signal tokens [IMG0]..[IMGk-1]
(ids model.output.signal_token_id + k) whose embedding rows and vocabulary-head rows are their own parameters
(params['output']: signal_embed, signal_head [K, Dt]), so they train while the LM stays frozen; the LM's last
hidden states at those K positions go through an output projector (mmproj/output_projectors,
params['output']['projector']) into the conditioning [B, L, Dc] of a given generator (mmproj/generators,
params['generator'], always frozen), in place of its own text encoder's encoding of a caption:

  tokens [B, T] ... <sep> [IMG0] .. [IMGk-1] --LM--> hidden at the K signal positions [B, K, Dt]
      --output projector--> cond [B, L, Dc] --generator (flow matching, CFG)--> image [B, S, S, 3]

A projector that declares `injects_into_lm = True` (gated_xattn, Flamingo) is wired differently: nothing is merged.
Each image has one <image> marker in the row (num_image_tokens = 1), which keeps its text embedding; the
projector's tokens are media [B, T_img, M, Dt] that the LM's gated cross-attention blocks (params under 'lm')
attend to, each text token seeing images by media_index = cumsum(markers) (see mmproj/layers/gated_cross_attention.py).
batch['image'] may then hold several images per row, [B, T_img, H, W, 3], one marker each, in order.
"""

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mmproj import generators, output_projectors, projectors
from mmproj.encoders import ENCODERS, build_encoder
from mmproj.layers import ACTIVATIONS, kernels as kernels_lib
from mmproj.layers.gated_cross_attention import media_index
from mmproj.layers.rope import check_rope_scaling
from mmproj.layers.scan import check_remat, check_scan
from mmproj.lm import build_lm
from mmproj.layers.partitioning import constrain

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
# model.modality (the batch key of the media) -> the encoder that reads it.
MODALITIES = {'image': 'vit', 'video': 'vit', 'audio': 'whisper'}
TOWERS = ('encoder', 'projector', 'lm', 'output', 'generator')   # the top-level keys of the params


def param_dtypes(cfg_model: Any) -> dict[str, Any]:
  """{tower: the dtype its parameters are stored in}: cfg.model.param_dtype (float32 for a tower it does not
  name, e.g. in a run saved before the field existed). A layer computes in model.dtype whatever its parameters are
  stored in, so storing a frozen tower in bfloat16 halves its memory and changes nothing else; trained
  parameters stay float32, as do their gradients and optimizer state (mmproj/train/state.py checks)."""
  stored = dict(cfg_model.get('param_dtype') or {})
  return {tower: DTYPES[stored.get(tower, 'float32')] for tower in TOWERS}


def cast_params(params: dict, cfg_model: Any) -> dict:
  """params (arrays or ShapeDtypeStructs, under jit or eval_shape) with each tower's floating leaves in its
  storage dtype (param_dtypes)."""
  dtypes = param_dtypes(cfg_model)

  def cast(dtype):
    return lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p

  return {k: jax.tree.map(cast(dtypes[k]), v) if k in dtypes else v for k, v in params.items()}


def _frozen(cfg: Any) -> ml_collections.FrozenConfigDict:
  if isinstance(cfg, ml_collections.FrozenConfigDict):
    return cfg
  return ml_collections.FrozenConfigDict(cfg)


def _divisible(field: str, value: int, divisor_field: str, divisor: int) -> None:
  if divisor <= 0 or value % divisor:
    raise ValueError(f'{field}={value} is not divisible by {divisor_field}={divisor}')


def _check_vit(enc: Any) -> None:
  """The ViT's fields; ValueError naming model.encoder.<field>."""
  _divisible('model.encoder.image_size', enc.image_size, 'model.encoder.patch_size', enc.patch_size)
  _divisible('model.encoder.width', enc.width, 'model.encoder.num_heads', enc.num_heads)
  if not -enc.depth <= enc.output_layer <= -1:
    raise ValueError(f'model.encoder.output_layer={enc.output_layer} is out of range '
                     f'[-model.encoder.depth, -1] = [{-enc.depth}, -1]')
  if enc.act not in ACTIVATIONS:
    raise ValueError(f'model.encoder.act={enc.act!r} is not one of {sorted(ACTIVATIONS)}')
  mean, std = enc.image_mean, enc.image_std
  if (mean is None) != (std is None):
    raise ValueError('model.encoder.image_mean and model.encoder.image_std must be set together (or both None)')
  for field, value in (('image_mean', mean), ('image_std', std)):
    if value is not None and len(value) != 3:
      raise ValueError(f'model.encoder.{field}={list(value)!r} must have 3 entries (R, G, B)')
  if std is not None and min(std) <= 0:
    raise ValueError(f'model.encoder.image_std={list(std)!r} must be positive')


def _check_video(c: Any, enc: Any, lm_width: int) -> None:
  """model.num_frames against the encoder's temporal patches, and the projector's token count on a whole video
  (a per-image connector reads one frame's grid and would count h*w tokens): traced abstractly, nothing compiles."""
  frames, t = c.get('num_frames'), enc.temporal_patch_size
  if not isinstance(frames, int) or isinstance(frames, bool) or frames < 1:
    raise ValueError(f"model.num_frames={frames!r}: a video model needs the frames per example, an int >= 1")
  _divisible('model.num_frames', frames, 'model.encoder.temporal_patch_size', t)
  grid = encoder_grid(c)
  proj = projectors.build(c.projector, in_dim=enc.width, out_dim=lm_width)
  x = jax.ShapeDtypeStruct((1, encoder_tokens(c), enc.width), jnp.float32)           # one video's tokens
  try:
    out = jax.eval_shape(lambda x: proj.init_with_output(jax.random.key(0), x, grid=grid)[0], x)
  except ValueError as e:                 # the projector's own message, without JAX's traceback note
    raise ValueError(f'{str(e).splitlines()[0]} (model.projector.name={c.projector.name!r} on a video of '
                     f'model.num_frames={frames})') from None
  expected = projectors.num_output_tokens(c.projector, grid)
  if out.shape[1] != expected:
    raise ValueError(
        f'model.projector.name={c.projector.name!r} maps one video ({frames // t} frames of {grid[0]}x{grid[1]} '
        f'tokens) to {out.shape[1]} tokens but counts {expected} from one frame\'s grid: use a video connector '
        f'(llava_next_video, llava_onevision_video, frame_concat around a per-frame one, patch_merger with '
        f'num_frames) or one whose output does not depend on the token count (perceiver, qformer, cross_attention)')


def validate(cfg_model: Any) -> None:
  """Checks cfg.model before anything is traced; raises ValueError naming the offending field. Tower fields are
  read from the modules they build, so a field a config leaves out has the module's default."""
  c = cfg_model
  if c.dtype not in DTYPES:
    raise ValueError(f'model.dtype={c.dtype!r} is not one of {sorted(DTYPES)}')
  for tower, dtype in dict(c.get('param_dtype') or {}).items():
    if tower not in TOWERS:
      raise ValueError(f'model.param_dtype.{tower}: unknown tower; known: {list(TOWERS)}')
    if dtype not in DTYPES:
      raise ValueError(f'model.param_dtype.{tower}={dtype!r} is not one of {sorted(DTYPES)}')
  check_remat(c.remat, 'model.remat')                                  # mmproj/layers/scan.py
  kernels_lib.resolve(c.kernels, 'cpu', c.dtype)                       # ValueError naming model.kernels.*

  lm = build_lm(c.lm)
  if lm.head_dim is None:
    _divisible('model.lm.width', lm.width, 'model.lm.num_heads', lm.num_heads)
  if lm.dim_per_head % 2:
    raise ValueError(f'model.lm.head_dim={lm.dim_per_head} must be even for RoPE')
  _divisible('model.lm.num_heads', lm.num_heads, 'model.lm.num_kv_heads', lm.num_kv_heads)
  check_rope_scaling(lm.rope_scaling)                                  # ValueError naming model.lm.rope_scaling
  if lm.sliding_window is not None and lm.sliding_window < 1:
    raise ValueError(f'model.lm.sliding_window={lm.sliding_window} must be None or >= 1')
  check_remat(lm.remat, 'model.lm.remat')
  check_scan(lm.scan_layers, 'model.lm.scan_layers')
  if c.get('output') is not None and (c.output.get('num_signal_tokens') or c.output.get('projector')):
    _check_output(c, lm)

  if not c.use_image:
    return
  if not 0 <= c.image_token_id < lm.vocab_size:
    raise ValueError(f'model.image_token_id={c.image_token_id} is not in [0, model.lm.vocab_size={lm.vocab_size})')
  if modality(c) not in MODALITIES:
    raise ValueError(f'model.modality={modality(c)!r} is not one of {list(MODALITIES)}')
  if c.encoder.name not in ENCODERS:
    raise ValueError(f'unknown model.encoder.name {c.encoder.name!r}; known: {sorted(ENCODERS)}')
  if c.encoder.name != MODALITIES[modality(c)]:
    raise ValueError(f'model.encoder.name={c.encoder.name!r} does not read model.modality={modality(c)!r} '
                     f'(its encoder is {MODALITIES[modality(c)]!r})')
  enc = build_encoder(c.encoder)
  if c.encoder.name == 'vit':
    _check_vit(enc)
  else:
    enc.check()                                                        # ValueError naming model.encoder.*
  check_scan(enc.scan_layers, 'model.encoder.scan_layers')
  check_remat(enc.remat, 'model.encoder.remat')
  projectors.validate(c.projector, in_dim=enc.width, out_dim=lm.width)
  if modality(c) == 'video':
    _check_video(c, enc, lm.width)
  if injects_into_lm(c):
    projectors.build(c.projector, in_dim=enc.width, out_dim=lm.width).check_injection(lm.depth)
    if lm.scan_layers:
      raise ValueError(f'model.lm.scan_layers=True is not supported with an injecting projector '
                       f'(model.projector.name={c.projector.name!r} puts gated cross-attention blocks between the '
                       f'LM blocks); set it False')


def modality(cfg_model: Any) -> str:
  """model.modality: 'image' (default; configs from before the field read as image), 'audio' or 'video'."""
  return cfg_model.get('modality', 'image') if hasattr(cfg_model, 'get') else 'image'


def encoder_grid(cfg_model: Any) -> tuple[int, ...]:
  """The grid of one example's encoder tokens: (h, w) patches of an image or of one video frame, (T,) audio
  frames."""
  return tuple(build_encoder(cfg_model.encoder).output_grid())


def encoder_passes(cfg_model: Any) -> int:
  """Encoder passes per example: 1 for an image or a clip of audio; a video's frames, or its groups of
  model.encoder.temporal_patch_size frames (Qwen2-VL's temporal patches), each go through the tower."""
  if modality(cfg_model) != 'video':
    return 1
  return int(cfg_model.num_frames) // build_encoder(cfg_model.encoder).temporal_patch_size


def encoder_tokens(cfg_model: Any) -> int:
  """Encoder tokens N of one example: h*w patches of an image, F'*h*w of a video (F' frames or temporal groups, in
  time order), T frames of audio."""
  return encoder_passes(cfg_model) * math.prod(encoder_grid(cfg_model))


def injects_into_lm(cfg_model: Any) -> bool:
  """True when the projector's tokens enter the LM through cross-attention (e.g. gated_xattn), not the sequence."""
  return bool(cfg_model.use_image) and getattr(projectors.get(cfg_model.projector.name), 'injects_into_lm', False)


def has_output(cfg_model: Any) -> bool:
  """True when cfg.model has an output side (model.output with num_signal_tokens > 0)."""
  out = cfg_model.get('output') if hasattr(cfg_model, 'get') else None
  return bool(out) and int(out.get('num_signal_tokens', 0) or 0) > 0


def output_modules(cfg_model: Any, dtype: Any = jnp.float32) -> tuple[Any, Any]:
  """(OutputSide, generator) modules of cfg.model's output side (unbound: usable for their methods)."""
  c = cfg_model.output
  gen = generators.build(c.generator, dtype=dtype)
  length, dim = gen.text_len, gen.text_width
  side = OutputSide(num_signal_tokens=int(c.num_signal_tokens), width=int(cfg_model.lm.width),
                    projector_config=_frozen(dict(c.projector)), out_len=length, out_dim=dim, dtype=dtype)
  return side, gen


def _check_output(c: Any, lm: Any) -> None:
  """model.output: signal ids inside the LM's vocabulary, the output projector's and the generator's fields."""
  out = c.output
  k, first = out.get('num_signal_tokens'), out.get('signal_token_id')
  for field, value in (('num_signal_tokens', k), ('signal_token_id', first)):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f'model.output.{field}={value!r} must be an int >= 1')
  if first + k > lm.vocab_size:
    raise ValueError(f'model.output.signal_token_id={first} + num_signal_tokens={k} exceeds model.lm.vocab_size='
                     f'{lm.vocab_size}')
  if c.use_image and first <= c.image_token_id < first + k:
    raise ValueError(f'model.image_token_id={c.image_token_id} is one of the signal tokens (model.output.'
                     f'signal_token_id={first}, num_signal_tokens={k})')
  try:
    gen = generators.build(out.generator)
  except ValueError as e:                                   # 'generator.<field>: ...' -> 'model.output.generator...'
    raise ValueError(f'model.output.{e}') from None
  length, dim = gen.text_len, gen.text_width
  output_projectors.validate(out.projector, in_dim=lm.width, num_signal_tokens=k, out_len=length, out_dim=dim)


def num_image_tokens(cfg_model: Any) -> int:
  """<image> placeholders per example: M visual tokens for a merging projector, 1 marker for an injecting one
  (gated_xattn), 0 for the blind baseline."""
  if not cfg_model.use_image:
    return 0
  if injects_into_lm(cfg_model):
    return 1
  return projectors.num_output_tokens(cfg_model.projector, encoder_grid(cfg_model))


def projector_param_count(cfg_model: Any) -> int:
  """Parameters attributable to the projector: those under 'projector', plus for an injecting projector the
  gated cross-attention blocks it adds under 'lm'. 0 for the blind baseline."""
  if not cfg_model.use_image:
    return 0
  c = cfg_model
  n = projectors.param_count(c.projector, c.encoder.width, c.lm.width)
  if injects_into_lm(c):
    n += projectors.build(c.projector, in_dim=c.encoder.width, out_dim=c.lm.width).injected_param_count(c.lm.depth)
  return n


def output_projector_param_count(cfg_model: Any) -> int:
  """Parameters of the output side that trains: the output projector and the signal tokens' embedding and head
  rows (2 K Dt). 0 without an output side."""
  if not has_output(cfg_model):
    return 0
  out = cfg_model.output
  gen = generators.build(out.generator)
  k, width = int(out.num_signal_tokens), int(cfg_model.lm.width)
  return output_projectors.param_count(out.projector, width, k, gen.text_len, gen.text_width) + 2 * k * width


def merge_visual_tokens(text_embeds, visual, tokens, image_token_id: int, input_mask=None):
  """Writes visual token k at the k-th placeholder of each row (static shapes: cumsum index + gather + where).

  text_embeds [B, L, D], visual [B, M, D], tokens int [B, L], input_mask [B, L] or None -> [B, L, D].
  Placeholder ids on padding (input_mask == 0) are not counted. Rows with more than M placeholders repeat
  visual token M-1 on the extra ones (the pipeline never produces that).
  """
  is_image = tokens == image_token_id                                       # [B, L]
  if input_mask is not None:
    is_image &= jnp.asarray(input_mask).astype(bool)
  k = jnp.cumsum(is_image.astype(jnp.int32), axis=1) - 1                    # [B, L] placeholder ordinal
  k = jnp.clip(k, 0, visual.shape[1] - 1)
  gathered = jnp.take_along_axis(visual, k[:, :, None], axis=1)             # [B, L, D]
  return jnp.where(is_image[:, :, None], gathered.astype(text_embeds.dtype), text_embeds)


def towers(cfg_model: Any) -> tuple[Any, Any, Any]:
  """(encoder, projector, lm) modules of cfg.model, compute in model.dtype; encoder and projector None for the
  blind baseline. model.remat applies to both towers unless a tower sets its own (model.encoder.remat /
  model.lm.remat). Called unbound, the modules are for their methods (e.g. FLOP counts); MultimodalLM calls it in
  its setup."""
  c, dtype = cfg_model, DTYPES[cfg_model.dtype]

  def with_remat(tower):                 # the tower's own remat, else model.remat (None or absent: not set)
    return {**dict(tower), 'remat': dict(tower).get('remat') or c.remat}

  encoder = projector = cross_attention = None
  if c.use_image:
    encoder = build_encoder(with_remat(c.encoder), dtype)
    projector = projectors.build(c.projector, in_dim=c.encoder.width, out_dim=c.lm.width, dtype=dtype)
    if injects_into_lm(c):
      cross_attention = projector.lm_injection()
  lm = build_lm(with_remat(c.lm), dtype, cross_attention=cross_attention)
  return encoder, projector, lm


class OutputSide(nn.Module):
  """The model's own output-side parameters: signal-token embedding and head rows, and the output projector.

    signal_embed [K, Dt]   the input embeddings of [IMG0]..[IMGk-1] (replacing the LM's rows for those ids)
    signal_head  [K, Dt]   their rows of the vocabulary projection (replacing the LM head's)
    projector              hidden states at the signal tokens [B, K, Dt] -> conditioning [B, L, Dc]
  GILL trains exactly these with the LM frozen (its [IMG] input and output embeddings and GILLMapper)."""
  num_signal_tokens: int
  width: int
  projector_config: Any           # cfg.model.output.projector
  out_len: int
  out_dim: int
  dtype: Any = jnp.float32

  def setup(self):
    init = nn.initializers.normal(0.02)
    self.signal_embed = self.param('signal_embed', init, (self.num_signal_tokens, self.width), jnp.float32)
    self.signal_head = self.param('signal_head', init, (self.num_signal_tokens, self.width), jnp.float32)
    self.projector = output_projectors.build(self.projector_config, in_dim=self.width,
                                             num_signal_tokens=self.num_signal_tokens, out_len=self.out_len,
                                             out_dim=self.out_dim, dtype=self.dtype)

  def embed(self, signal_index):
    """signal_index int [B, T] (k for [IMGk], anything elsewhere) -> rows of signal_embed [B, T, Dt]."""
    k = jnp.clip(signal_index, 0, self.num_signal_tokens - 1)
    return jnp.take(self.signal_embed, k, axis=0).astype(self.dtype)

  def logits(self, normed):
    """The LM's final-normed hidden states [..., Dt] -> the K signal tokens' logits [..., K] float32."""
    return jnp.einsum('...d,kd->...k', normed.astype(self.dtype), self.signal_head.astype(self.dtype)
                      ).astype(jnp.float32)

  def condition(self, signal_states, deterministic: bool = True):
    """[B, K, Dt] -> [B, L, Dc]."""
    return self.projector(signal_states, deterministic=deterministic)


def signal_positions(tokens, first_id: int, num: int):
  """Where each row's signal tokens are: (positions int [B, K] of [IMG0]..[IMGk-1], present bool [B]: the row has
  all K). A row without them gets position 0 for the missing ones (its `present` is False)."""
  hits = tokens[:, None, :] == (first_id + jnp.arange(num))[None, :, None]         # [B, K, T]
  positions = jnp.argmax(hits, axis=-1).astype(jnp.int32)                            # [B, K]: first occurrence
  return positions, jnp.all(jnp.any(hits, axis=-1), axis=-1)


def _with_kernels(method):
  """Runs a MultimodalLM method under its kernel choice (model.kernels, mmproj/layers/kernels.py)."""
  @functools.wraps(method)
  def wrapped(self, *args, **kwargs):
    with kernels_lib.use(self.kernels):
      return method(self, *args, **kwargs)
  return wrapped


class MultimodalLM(nn.Module):
  """Encoder + projector + Llama LM; visual tokens enter the LM at the <image> placeholders.

  Attributes:
    config: cfg.model as a FrozenConfigDict (hashable, so the module can be a static jit argument).
    encoder_trainable: False -> stop_gradient on the encoder output (a frozen tower gets zero grads).
    kernels: the implementations of dense matmuls and attention (model.kernels resolved for a platform).
  """

  config: ml_collections.FrozenConfigDict
  encoder_trainable: bool = True
  kernels: kernels_lib.Kernels = kernels_lib.Kernels()

  @property
  def dtype(self):
    return DTYPES[self.config.dtype]

  @property
  def injects(self) -> bool:
    return injects_into_lm(self.config)

  @property
  def has_output(self) -> bool:
    return has_output(self.config)

  def setup(self):
    self.encoder, self.projector, self.lm = towers(self.config)
    if self.has_output:
      self.output, self.generator = output_modules(self.config, self.dtype)

  def _signal_index(self, tokens):
    """tokens [B, T] -> (is_signal bool [B, T], k int [B, T]: which [IMGk] it is, 0 elsewhere)."""
    k = jnp.asarray(tokens) - int(self.config.output.signal_token_id)
    is_signal = (k >= 0) & (k < int(self.config.output.num_signal_tokens))
    return is_signal, jnp.where(is_signal, k, 0)

  @_with_kernels
  def embed_text(self, tokens):
    """Token ids [B, T] -> embeddings [B, T, Dt]: the LM's table, and the output side's rows for signal tokens."""
    x = self.lm.embed(tokens)                                                # [B, T, Dt]
    if not self.has_output:
      return x
    is_signal, k = self._signal_index(tokens)
    return jnp.where(is_signal[..., None], self.output.embed(k), x)

  @_with_kernels
  def encode(self, media, deterministic: bool = True):
    """The media of a batch (batch[model.modality]) -> visual tokens [B, M, Dt]:
    image [B, H, W, 3] (uint8, or float in [-1, 1]), audio float32 [B, S] (16 kHz waveforms), video [B, F, H, W, 3].

    Injecting projectors also take several images per row, [B, T_img, H, W, 3] -> media [B, T_img, M, Dt]
    (a 4-d image is T_img = 1; audio and video are one item per row, T_img = 1).
    """
    media = jnp.asarray(media)
    several = modality(self.config) == 'image' and media.ndim == 5
    if several and not self.injects:
      raise ValueError(f'image of shape {media.shape}: several images per row need an injecting projector '
                       f'(model.projector.name={self.config.projector.name!r} merges tokens)')
    items = media.reshape((-1,) + media.shape[2:]) if several else media       # [B*T_img, ...]
    feats, grid = self.encoder(items)                                        # [B*T_img, N, Dv]
    feats = constrain(feats, 'act_batch', 'act_seq', 'act_embed')
    if not self.encoder_trainable:
      feats = jax.lax.stop_gradient(feats)
    visual = self.projector(feats, grid=grid, deterministic=deterministic)   # [B*T_img, M, Dt]
    visual = constrain(visual, 'act_batch', 'act_seq', 'act_embed')
    if not self.injects:
      return visual                                                          # [B, M, Dt]
    return visual.reshape((media.shape[0], -1) + visual.shape[1:])           # [B, T_img, M, Dt]

  @_with_kernels
  def lm_inputs(self, batch, deterministic: bool = True):
    """-> (x [B, L, Dt], media [B, T_img, M, Dt] or None, media_index int [B, L] or None).

    Merging projectors: x has the visual tokens at the placeholders, no media. Injecting ones: x is the plain token
    embeddings (markers included) and the media go to the LM's cross-attention.
    """
    tokens = jnp.asarray(batch['tokens'])
    x = constrain(self.embed_text(tokens), 'act_batch', 'act_seq', 'act_embed')  # [B, L, Dt]
    if not self.config.use_image:
      return x, None, None
    visual = self.encode(batch[modality(self.config)], deterministic)       # [B, M, Dt] | [B, T_img, M, Dt]
    if self.injects:
      index = media_index(tokens, self.config.image_token_id, batch['input_mask'])  # [B, L]
      return x, visual, index
    x = merge_visual_tokens(x, visual, tokens, self.config.image_token_id, batch['input_mask'])
    return constrain(x, 'act_batch', 'act_seq', 'act_embed'), None, None

  @_with_kernels
  def embed_inputs(self, batch, deterministic: bool = True):
    """Token embeddings with visual tokens merged in: batch['tokens'] [B, L] -> [B, L, Dt] (an injecting
    projector merges nothing: the plain embeddings)."""
    return self.lm_inputs(batch, deterministic)[0]

  @_with_kernels
  def __call__(self, batch, deterministic: bool = True, return_hidden: bool = False):
    """Full causal forward. batch: tokens/positions/input_mask [B, L] (+ image, + optional segment_ids [B, L]
    for shared-prefix packing, see Llama.__call__). -> logits [B, L, V] float32; with return_hidden=True the
    LM's last hidden states [B, L, Dt] instead, for `head` to project at the positions a loss needs."""
    x, media, index = self.lm_inputs(batch, deterministic)                  # [B, L, Dt]
    segment_ids = batch.get('segment_ids')
    out, _ = self.lm(x, jnp.asarray(batch['positions']), jnp.asarray(batch['input_mask']),
                     segment_ids=None if segment_ids is None else jnp.asarray(segment_ids),
                     media=media, media_index=index, return_hidden=True)
    out = constrain(out, 'act_batch', 'act_seq', 'act_embed')               # [B, L, Dt]
    if self.has_output and self.is_initializing():          # create the output side's and generator's params
      self.signal_condition(out, jnp.asarray(batch['tokens']))
      g = self.generator
      self.generator(jnp.zeros((1, g.text_len), jnp.int32), jnp.zeros((1, g.image_size, g.image_size, 3)),
                     jnp.zeros((1,)))
    if return_hidden:
      return out
    return self.head(out)                                                    # [B, L, V]

  @_with_kernels
  def head(self, hidden):
    """The LM's final norm + vocabulary projection: hidden [B, K, Dt] -> logits [B, K, V] float32 (the signal
    tokens' logits from the output side's rows)."""
    logits = self.lm.head(hidden)
    if self.has_output:
      first, k = int(self.config.output.signal_token_id), int(self.config.output.num_signal_tokens)
      logits = logits.at[..., first:first + k].set(self.output.logits(self.lm.norm(hidden)))
    return constrain(logits, 'act_batch', 'act_seq', 'act_vocab')

  @_with_kernels
  def signal_condition(self, hidden, tokens, deterministic: bool = True):
    """The generator's conditioning from the LM's last hidden states [B, T, Dt] at each row's signal tokens
    (tokens [B, T]) -> (cond [B, L, Dc], present bool [B]: the row holds all K signal tokens)."""
    out = self.config.output
    positions, present = signal_positions(jnp.asarray(tokens), int(out.signal_token_id), int(out.num_signal_tokens))
    states = jnp.take_along_axis(hidden, positions[..., None], axis=1)       # [B, K, Dt]
    return self.output.condition(states, deterministic), present

  def text_condition(self, gen_text):
    """The generator's own text encoder on caption ids gen_text [B, L] -> cond [B, L, Dc] (the alignment target)."""
    return self.generator.encode_text(gen_text)

  @_with_kernels
  def prefill(self, batch, cache_len: int, deterministic: bool = True):
    """Runs the whole left-padded prompt (image included) into a fresh KV cache of `cache_len` slots.

    Returns (logits at the last column [B, V] float32, cache). `cache_len` (static) must be >= L and leave room
    for every token that decode_step will feed. With an injecting projector the cache also holds the media's
    cross-attention keys/values and each row's media_index (see mmproj/lm/llama.py).
    """
    x, media, index = self.lm_inputs(batch, deterministic)                  # [B, L, Dt]
    b, length = x.shape[:2]
    if cache_len < length:
      raise ValueError(f'cache_len={cache_len} is shorter than the prompt length {length}')
    cache = self.lm.init_cache(b, cache_len)
    hidden, cache = self.lm(x, jnp.asarray(batch['positions']), jnp.asarray(batch['input_mask']), cache,
                            media=media, media_index=index, return_hidden=True)
    return self.head(hidden[:, -1]), cache                                   # [B, V]

  @_with_kernels
  def decode_step(self, token, cache):
    """Feeds one token per row. token int [B] -> (logits [B, V] float32, cache advanced by one slot).

    The token's position is the number of real tokens already in the cache (positions = cumsum(mask) - 1).
    """
    token = jnp.asarray(token)[:, None]                                      # [B, 1]
    x = self.embed_text(token)                                               # [B, 1, Dt]
    positions = jnp.sum(cache['mask'], axis=1, dtype=jnp.int32)[:, None]     # [B, 1]
    hidden, cache = self.lm(x, positions, jnp.ones_like(token, jnp.int32), cache, return_hidden=True)
    return self.head(hidden[:, 0]), cache                                    # [B, V]


def build_model(cfg_model: Any, *, encoder_trainable: bool = True, platform: str | None = None) -> MultimodalLM:
  """Validates cfg.model and builds the MultimodalLM, its model.kernels resolved for `platform` (that of the mesh
  it will run on; default jax's default backend)."""
  validate(cfg_model)
  chosen = kernels_lib.resolve(cfg_model.kernels, platform or jax.default_backend(), cfg_model.dtype)
  return MultimodalLM(config=_frozen(cfg_model), encoder_trainable=encoder_trainable, kernels=chosen)
