"""Projectors vs their transformers references: forward + backward, f32, same weights.

For every projector family with a converter (mmproj/convert/), at the sizes of a released model:

  ours    jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, inputs), loss = mean(y ** 2): gradients of
          every parameter and every float input
  theirs  the PyTorch module (eval mode: no dropout; attention 'sdpa', what from_pretrained picks), the same loss,
          .backward() into every parameter and input (grads reset to None before each call)

The torch module gets random weights (fan-in scaled normals, norm scales near 1, gates non-zero so every path
carries signal), is converted with mmproj.convert.from_transformers (or the converter function the family's docs
name), and both outputs and input gradients must agree (relative max error <= PARITY_RTOL) before anything is
timed. Timing is interleaved (ours, theirs, ours, ...), warm-up excluded, median of opts.iters.

Reported per row: both medians, ratio = torch / ours (> 1: ours is faster), our matmul GFLOP/s (matmul FLOPs of
the traced fwd+bwd program, mmproj.train.flops.jaxpr_matmul_flops, over our median time) and that as a fraction of
the f32 matmul peak XLA reaches on this host while the row runs (measure_matmul_peak's best-call rule, sampled in
every timed round by benchmarks.PeakProbe).
Each case has a kind: 'matmul' (token-wise MLPs: the roofline goal applies), 'attention' (attention-based
resamplers / cross-attention: the 1.3x goal applies) or 'memory' (pooling dominates; only the 1.0x goal).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks import GOAL_SETTING, SETTINGS, Options, PeakProbe, Row, Section, format_profile, interleaved
from benchmarks import kernels_of, median, profile_jax, profile_torch, ratio, spread, xla_cost

PARITY_RTOL = 2e-3        # max |ours - theirs| / max |theirs|, outputs and input gradients
GOAL_SPEEDUP = 1.0        # every projector vs its reference, f32
GOAL_ROOFLINE = 0.85      # matmul-bound projectors: fraction of the measured f32 matmul peak
GOAL_ATTENTION = 1.3      # attention-heavy projectors vs their reference


@dataclasses.dataclass
class Pair:
  """A reference module and its port. `torch_call(tensors)` / `flax_call(params, arrays)` take the float inputs by
  name (the differentiated ones, `inputs`) and return outputs of the same shape; constants such as masks are
  closed over."""
  torch_module: Any
  torch_call: Callable[[dict], Any]
  flax_call: Callable[[Any, dict], Any]
  params: Any
  inputs: dict[str, np.ndarray]
  shapes: str


@dataclasses.dataclass
class Case:
  name: str
  reference: str
  kind: str                               # 'matmul' | 'attention' | 'memory'
  build: Callable[[bool], Pair]           # quick -> Pair
  note: str = ''


# ------------------------------------------------------------------------------------------------ helpers


def init_weights_(module: Any, seed: int = 0) -> Any:
  """Random weights a forward + backward carries signal through: 2-d+ tensors N(0, 1/fan_in) (fan_in = last
  axis), biases N(0, 0.02), other vectors (norm scales, gates) 1 + N(0, 0.1). Returns the module in eval mode."""
  import torch

  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if p.ndim >= 2:
        p.copy_(noise * p.shape[-1] ** -0.5)
      elif name.endswith('bias'):
        p.copy_(noise * 0.02)
      else:
        p.copy_(1.0 + 0.1 * noise)
  return module.eval()


def _sdpa(cfg: Any) -> Any:
  cfg._attn_implementation = 'sdpa'
  return cfg


def _normal(rng: np.random.Generator, *shape: int) -> np.ndarray:
  return rng.standard_normal(shape, dtype=np.float32)


def _apply(module, grid, **static):
  """flax_call for a projector taking one input 'x' with a grid."""
  return lambda params, a: module.apply({'params': params}, a['x'], grid=grid, **static)


# ------------------------------------------------------------------------------------------------ cases


def llava_mlp(quick: bool) -> Pair:
  """LLaVA-1.5: CLIP-L/14-336 tokens (576 x 1024) -> Vicuna-7B width 4096, 2-layer GELU MLP; batch 2."""
  from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
  from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

  from mmproj import convert

  dv, dt, side, b, heads = (32, 48, 4, 2, 2) if quick else (1024, 4096, 24, 2, 16)
  cfg = LlavaConfig(vision_config=CLIPVisionConfig(hidden_size=dv, num_attention_heads=heads),
                    text_config=LlamaConfig(hidden_size=dt, num_attention_heads=heads, num_key_value_heads=heads),
                    projector_hidden_act='gelu')
  hf = init_weights_(LlavaMultiModalProjector(cfg), 1)
  module, params = convert.from_transformers(hf)
  x = _normal(np.random.default_rng(1), b, side * side, dv)
  return Pair(hf, lambda t: hf(t['x']), _apply(module, (side, side)), params, {'x': x},
              f'x [{b}, {side * side}, {dv}] -> [{b}, {side * side}, {dt}]')


def qformer(quick: bool) -> Pair:
  """BLIP-2 Q-Former (Blip2QFormerModel): 12 layers of width 768, cross-attention every 2nd layer to EVA-g's
  257 x 1408 tokens, 32 queries; batch 2."""
  from transformers import Blip2QFormerConfig, Blip2QFormerModel

  from mmproj.convert import blip2

  if quick:
    d, layers, heads, mlp, dv, n, q, b = 24, 2, 2, 48, 20, 9, 4, 2
  else:
    d, layers, heads, mlp, dv, n, q, b = 768, 12, 12, 3072, 1408, 257, 32, 2
  cfg = _sdpa(Blip2QFormerConfig(hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
                                 intermediate_size=mlp, encoder_hidden_size=dv, cross_attention_frequency=2))
  hf = init_weights_(Blip2QFormerModel(cfg), 2)
  module, params = blip2.blip2_qformer(hf, num_query_tokens=q)
  rng = np.random.default_rng(2)
  inputs = {'x': _normal(rng, b, n, dv), 'queries': _normal(rng, b, q, d)}

  def torch_call(t):
    return hf(query_embeds=t['queries'], encoder_hidden_states=t['x']).last_hidden_state

  def flax_call(p, a):
    return module.apply({'params': p}, a['x'], grid=(1, n), query_embeds=a['queries'])

  return Pair(hf, torch_call, flax_call, params, inputs, f'x [{b}, {n}, {dv}], queries [{b}, {q}, {d}] -> '
              f'[{b}, {q}, {d}]; {layers} layers')


def idefics2_perceiver(quick: bool) -> Pair:
  """Idefics2-8B's perceiver resampler (Idefics2PerceiverResampler): 729 context tokens of width 4096 -> 64
  latents, depth 3, 16 heads x 128 (4 kv heads), SwiGLU 4 x 4096; batch 1, all-ones context mask."""
  from transformers.models.idefics2.configuration_idefics2 import Idefics2PerceiverConfig
  from transformers.models.idefics2.modeling_idefics2 import Idefics2PerceiverResampler

  from mmproj import convert

  if quick:
    d, latents, depth, heads, kv, hd, side, b = 32, 4, 2, 4, 2, 8, 3, 1
  else:
    d, latents, depth, heads, kv, hd, side, b = 4096, 64, 3, 16, 4, 128, 27, 1
  cfg = _sdpa(Idefics2PerceiverConfig(hidden_size=d, resampler_n_latents=latents, resampler_depth=depth,
                                      resampler_n_heads=heads, num_key_value_heads=kv, resampler_head_dim=hd,
                                      rms_norm_eps=1e-5, hidden_act='silu'))
  hf = init_weights_(Idefics2PerceiverResampler(cfg), 3)
  module, params = convert.from_transformers(hf)
  n = side * side
  mask = np.ones((b, n), np.int64)
  torch_mask = __import__('torch').from_numpy(mask)
  x = _normal(np.random.default_rng(3), b, n, d)
  return Pair(hf, lambda t: hf(context=t['x'], attention_mask=torch_mask),
              _apply(module, (side, side), mask=mask), params, {'x': x},
              f'x [{b}, {n}, {d}] -> [{b}, {latents}, {d}]; depth {depth}, {heads}x{hd} heads ({kv} kv)')


def mllama_cross_attention(quick: bool) -> Pair:
  """Llama 3.2-11B-Vision's gated cross-attention decoder layer (MllamaCrossAttentionDecoderLayer): width 4096,
  32 heads (8 kv), SwiGLU 14336; 128 text tokens attending to one image tile (1601 vision tokens); batch 1."""
  import torch
  from transformers.models.mllama.configuration_mllama import MllamaTextConfig
  from transformers.models.mllama.modeling_mllama import MllamaCrossAttentionDecoderLayer
  from transformers.models.mllama.modeling_mllama import _prepare_cross_attention_mask

  from mmproj import convert

  d, heads, kv, ff, t, s, b = (32, 4, 2, 48, 8, 10, 1) if quick else (4096, 32, 8, 14336, 128, 1601, 1)
  cfg = _sdpa(MllamaTextConfig(hidden_size=d, num_attention_heads=heads, num_key_value_heads=kv,
                               intermediate_size=ff, num_hidden_layers=2, cross_attention_layers=[1],
                               rms_norm_eps=1e-5, vocab_size=32))
  hf = init_weights_(MllamaCrossAttentionDecoderLayer(cfg, layer_idx=1), 4)
  block, params = convert.from_transformers(hf)
  hf_mask = np.ones((b, t, 1, 1), np.int64)                  # [B, T, images, tiles]: every token sees the tile
  attn_mask, row_mask = _prepare_cross_attention_mask(torch.from_numpy(hf_mask), s, torch.float32)
  mask = np.ones((b, t, s), bool)
  rng = np.random.default_rng(4)
  inputs = {'x': _normal(rng, b, t, d), 'media': _normal(rng, b, s, d)}

  def torch_call(tt):
    out = hf(tt['x'], cross_attention_states=tt['media'], cross_attention_mask=attn_mask, attention_mask=None,
             full_text_row_masked_out_mask=row_mask)
    return out[0] if isinstance(out, tuple) else out

  def flax_call(p, a):
    return block.apply({'params': p}, a['x'], grid=(1, s), media=a['media'], mask=mask)

  return Pair(hf, torch_call, flax_call, params, inputs,
              f'text [{b}, {t}, {d}], media [{b}, {s}, {d}] -> [{b}, {t}, {d}]; {heads} heads ({kv} kv), ff {ff}')


def idefics3_connector(quick: bool) -> Pair:
  """Idefics3-8B's connector (HuggingFaceM4/Idefics3-8B-Llama3; transformers' Idefics3Config / processor
  defaults): SigLIP-so400m on 364 px tiles = 26 x 26 x 1152 patches, pixel shuffle x2 -> 169 tokens of 4608
  (the processor's image_seq_len) -> Linear to Llama-3.1-8B's 4096; batch 2 tiles."""
  from transformers import Idefics3Config
  from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector

  from mmproj import convert

  dv, dt, s, side, b, heads = (8, 24, 2, 4, 2, 2) if quick else (1152, 4096, 2, 26, 2, 16)
  cfg = Idefics3Config(vision_config=dict(hidden_size=dv, num_attention_heads=heads), scale_factor=s,
                       text_config=dict(hidden_size=dt, num_attention_heads=heads, num_key_value_heads=heads,
                                        head_dim=dt // heads))
  hf = init_weights_(Idefics3Connector(cfg), 5)
  module, params = convert.from_transformers(hf)
  x = _normal(np.random.default_rng(5), b, side * side, dv)
  m = (side // s) ** 2
  return Pair(hf, lambda t: hf(t['x']), _apply(module, (side, side)), params, {'x': x},
              f'x [{b}, {side * side}, {dv}] -> [{b}, {m}, {dt}] (shuffle x{s})')


def qwen2_vl_merger(quick: bool) -> Pair:
  """Qwen2-VL-7B's patch merger (PatchMerger): 32 x 32 patches of 1280 (a 448 px image), 2 x 2 merge -> 256
  tokens, LayerNorm + MLP 5120 -> 5120 -> 3584; batch 2 images (the reference takes them concatenated)."""
  from transformers.models.qwen2_vl.modeling_qwen2_vl import PatchMerger

  from mmproj import convert

  dv, dt, side, b = (8, 24, 4, 2) if quick else (1280, 3584, 32, 2)
  hf = init_weights_(PatchMerger(dim=dt, context_dim=dv, spatial_merge_size=2), 6)
  module, params = convert.from_transformers(hf)
  n, m = side * side, side * side // 4
  x = _normal(np.random.default_rng(6), b, n, dv)            # already in Qwen2-VL's window order, as both expect
  return Pair(hf, lambda t: hf(t['x'].reshape(b * n, dv)).reshape(b, m, dt), _apply(module, (side, side)),
              params, {'x': x}, f'x [{b}, {n}, {dv}] -> [{b}, {m}, {dt}] (2x2 merge)')


def gemma3_projector(quick: bool) -> Pair:
  """Gemma 3-4B's projector (Gemma3MultiModalProjector): SigLIP 64 x 64 x 1152 patches (896 px), 4 x 4 average
  pool -> 256 tokens, RMSNorm, projection to 2560; batch 2."""
  from transformers import Gemma3Config
  from transformers.models.gemma3.modeling_gemma3 import Gemma3MultiModalProjector

  from mmproj import convert

  dv, dt, side, per_side, patch, b, heads = (8, 16, 8, 2, 2, 2, 2) if quick else (1152, 2560, 64, 16, 14, 2, 16)
  cfg = Gemma3Config(
      vision_config=dict(model_type='siglip_vision_model', hidden_size=dv, num_attention_heads=heads,
                         image_size=side * patch, patch_size=patch, layer_norm_eps=1e-6),
      text_config=dict(hidden_size=dt, num_attention_heads=heads, num_key_value_heads=heads, head_dim=dt // heads),
      mm_tokens_per_image=per_side ** 2)
  hf = init_weights_(Gemma3MultiModalProjector(cfg), 7)
  module, params = convert.from_transformers(hf)
  x = _normal(np.random.default_rng(7), b, side * side, dv)
  return Pair(hf, lambda t: hf(t['x']), _apply(module, (side, side)), params, {'x': x},
              f'x [{b}, {side * side}, {dv}] -> [{b}, {per_side ** 2}, {dt}] (avg pool {side // per_side}x)')


def internvl_projector(quick: bool) -> Pair:
  """InternVL (2.5/3-8B): InternViT-300M 32 x 32 x 1024 patches, pixel shuffle 0.5 -> 256 tokens of 4096,
  LayerNorm + MLP 4096 -> 3584 -> 3584; the reference is InternVLModel's pixel_shuffle + the projector; batch 2."""
  from transformers import InternVLConfig
  from transformers.models.internvl.modeling_internvl import InternVLModel, InternVLMultiModalProjector

  from mmproj import convert

  dv, dt, side, b, heads = (8, 24, 4, 2, 2) if quick else (1024, 3584, 32, 2, 16)
  cfg = InternVLConfig(vision_config=dict(hidden_size=dv, num_attention_heads=heads), downsample_ratio=0.5,
                       text_config=dict(model_type='qwen2', hidden_size=dt, num_attention_heads=heads,
                                        num_key_value_heads=heads), projector_hidden_act='gelu')
  hf = init_weights_(InternVLMultiModalProjector(cfg), 8)
  module, params = convert.from_transformers(hf)
  x = _normal(np.random.default_rng(8), b, side * side, dv)

  def torch_call(t):
    feats = t['x'].reshape(b, side, side, dv)
    feats = InternVLModel.pixel_shuffle(None, feats, scale_factor=0.5)
    return hf(feats.reshape(b, -1, feats.shape[-1]))

  return Pair(hf, torch_call, _apply(module, (side, side)), params, {'x': x},
              f'x [{b}, {side * side}, {dv}] -> [{b}, {side * side // 4}, {dt}] (shuffle x2)')


CASES = (
    Case('llava_mlp', 'LlavaMultiModalProjector', 'matmul', llava_mlp),
    Case('qformer', 'Blip2QFormerModel', 'attention', qformer),
    Case('idefics2_perceiver', 'Idefics2PerceiverResampler', 'attention', idefics2_perceiver,
         'full Idefics2-8B sizes (660M params); batch 1 to bound time and memory on a 2-core CPU'),
    Case('mllama_xattn', 'MllamaCrossAttentionDecoderLayer', 'attention', mllama_cross_attention,
         'one layer at Llama-3.2-11B sizes; 1 tile of 1601 media tokens (not 4) and 128 text tokens, for time'),
    Case('idefics3_connector', 'Idefics3Connector', 'matmul', idefics3_connector),
    Case('qwen2_vl_merger', 'PatchMerger (Qwen2-VL)', 'matmul', qwen2_vl_merger),
    Case('gemma3_projector', 'Gemma3MultiModalProjector', 'memory', gemma3_projector),
    Case('internvl_projector', 'InternVLMultiModalProjector', 'matmul', internvl_projector),
)


# ------------------------------------------------------------------------------------------------ running


def _rel_err(ours: Any, theirs: Any) -> float:
  ours = np.asarray(ours, np.float32)
  theirs = np.asarray(theirs, np.float32)
  if ours.shape != theirs.shape:
    raise ValueError(f'shape {ours.shape} vs reference {theirs.shape}')
  scale = float(np.max(np.abs(theirs))) or 1.0
  return float(np.max(np.abs(ours - theirs))) / scale


def run_case(case: Case, opts: Options, peaks: dict[str, float], probe: PeakProbe | None = None) -> Row:
  """Builds, checks parity, times and (for a missed goal, with opts.profile) profiles one case, ours under each
  kernel setting of opts.settings. With a `probe`, the matmul peak is sampled in every timed round (see
  PeakProbe) and the roofline reads against it; otherwise against peaks['xla_f32']."""
  import jax
  import jax.numpy as jnp
  import torch

  from mmproj.layers import kernels
  from mmproj.train.flops import jaxpr_matmul_flops

  t0 = time.perf_counter()
  pair = case.build(opts.quick)
  params = jax.tree.map(lambda a: jnp.array(np.array(a, np.float32, copy=True)), pair.params)
  arrays = {k: jnp.asarray(v) for k, v in pair.inputs.items()}
  tensors = {k: torch.from_numpy(v.copy()).requires_grad_(True) for k, v in pair.inputs.items()}
  module = pair.torch_module
  torch_params = [p for p in module.parameters() if p.requires_grad]

  def loss(p, a):
    y = pair.flax_call(p, a)
    return jnp.mean(jnp.square(y.astype(jnp.float32))), y

  # y rides along as aux (it is computed anyway) so that parity needs no second compile.
  fwd_bwd = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
  ours_fns = {}
  for setting in opts.settings:     # traced and compiled under the setting's kernels, then called as executables
    with kernels.use(kernels_of(setting)):
      ours_fns[setting] = jax.jit(fwd_bwd).lower(params, arrays).compile()

  def release_torch_grads():
    for p in torch_params:
      p.grad = None
    for t in tensors.values():
      t.grad = None

  def torch_step(keep_grads: bool = False):
    release_torch_grads()
    value = pair.torch_call(tensors).float().square().mean()
    value.backward()
    if not keep_grads:
      # Like ours, whose gradient arrays are dropped as its call returns: gradients left alive between calls (as
      # big as the params, 2.7 GB for the perceiver) slowed the other side's next call by up to 2x here.
      release_torch_grads()
    return value.detach()

  def ours_step(setting):
    return lambda: jax.block_until_ready(ours_fns[setting](params, arrays))

  # Parity of each setting: outputs, the loss and the gradient of every input, before anything is timed.
  with torch.no_grad():
    y_ref = pair.torch_call(tensors)
  l_ref = torch_step(keep_grads=True)
  errors = {}
  for setting in opts.settings:
    (l_ours, y_ours), (_, g_ours) = ours_step(setting)()
    errors[setting] = (_rel_err(y_ours, y_ref.numpy()), max(_rel_err(g_ours[k], tensors[k].grad.numpy())
                                                            for k in tensors),
                       abs(float(l_ours) - float(l_ref)) / max(abs(float(l_ref)), 1e-30))
  flops = float(jaxpr_matmul_flops(fwd_bwd, params, arrays))
  n_params = sum(int(np.size(a)) for a in jax.tree.leaves(params))
  setup_s = time.perf_counter() - t0

  row = Row(f'projectors/{case.name}', {'projector': case.name, 'reference': case.reference, 'kind': case.kind,
                                        'shapes': pair.shapes, 'params (M)': n_params / 1e6})
  row.values['parity (fwd / grad)'] = ', '.join(f'{e[0]:.1e} / {e[1]:.1e}' for e in errors.values())
  bad = {k: e for k, e in errors.items() if not all(x <= PARITY_RTOL for x in e)}
  if bad:
    row.notes.append('PARITY FAILED (output, input grads, loss): ' + '; '.join(
        f'{k} {e[0]:.2e}, {e[1]:.2e}, {e[2]:.2e}' for k, e in bad.items()) + f' > {PARITY_RTOL}: not timed')
    row.values.update({f'{k} (ms)': math.nan for k in opts.settings})
    row.goal('>= 1.0x reference', math.nan, GOAL_SPEEDUP)
    return row

  worst = max(max(e[:2]) for e in errors.values())
  opts.log(f'  {case.name}: {pair.shapes}; {flops / 1e9:.1f} GFLOP fwd+bwd; parity ok ({worst:.1e}); '
           f'setup {setup_s:.1f} s')
  fns = [(f'ours {k}', ours_step(k)) for k in opts.settings] + [('torch', torch_step)]
  if probe is not None:
    probe.reset()
    fns.append(('peak probe', probe))
  times = interleaved(fns, iters=opts.iters, warmup=opts.warmup, log=opts.log)
  t_ours = {k: median(times[f'ours {k}']) for k in opts.settings}
  t_ref = median(times['torch'])
  here = dict(peaks)
  if probe is not None:
    here.update(xla_f32=probe.xla(peaks['xla_f32']), torch_f32=probe.torch(peaks['torch_f32']))
  row.values['GFLOP'] = flops / 1e9
  for k in opts.settings:
    row.values.update({f'{k} (ms)': t_ours[k] * 1e3, f'ratio {k}': ratio(t_ref, t_ours[k]),
                       f'roofline {k}': flops / t_ours[k] / here['xla_f32']})
  row.values.update({'torch (ms)': t_ref * 1e3, 'torch GFLOP/s': flops / t_ref / 1e9,
                     'XLA peak GFLOP/s': here['xla_f32'] / 1e9,
                     'spread (ours / torch)': ' / '.join(f'{spread(times[f"ours {k}"]):.0%}' for k in opts.settings)
                                              + f' / {spread(times["torch"]):.0%}'})
  if case.note:
    row.notes.append(case.note)
  goal = GOAL_SETTING
  if goal not in opts.settings:       # a process measuring the other setting only: no goals here
    return row
  row.goal(f'>= 1.0x reference (f32, {goal})', row.values[f'ratio {goal}'], GOAL_SPEEDUP)
  if case.kind == 'matmul':
    row.goal(f'>= 0.85 of the f32 matmul roofline ({goal})', row.values[f'roofline {goal}'], GOAL_ROOFLINE)
  if case.kind == 'attention':
    row.goal(f'>= 1.3x reference (attention-heavy, {goal})', row.values[f'ratio {goal}'], GOAL_ATTENTION)

  if opts.profile and not all(g[3] for g in row.goals):
    row.notes.extend(explain(ours_fns[goal], (params, arrays), torch_step, flops, t_ours[goal], t_ref, here))
  return row


def explain(compiled, args, torch_step, flops: float, t_ours: float, t_ref: float,
            peaks: dict[str, float]) -> list[str]:
  """Profile-based notes for a missed goal (ours: the compiled executable of the goal setting): the time the same
  FLOPs take at the measured matmul peaks (XLA and torch), XLA's bytes accessed at the measured bandwidth, and
  where each side's time goes by op class."""
  import jax

  notes = []
  t_mm = flops / peaks['xla_f32']
  t_mm_torch = flops / peaks['torch_f32']
  nbytes = xla_cost(compiled, 'bytes accessed')
  t_mem = nbytes / peaks['xla_bandwidth']
  notes.append(f'bounds: the same matmul FLOPs at the XLA peak take {t_mm * 1e3:.1f} ms ({t_mm / t_ours:.0%} of '
               f'ours), at the torch GEMM peak {t_mm_torch * 1e3:.1f} ms ({t_mm_torch / t_ref:.0%} of theirs); XLA '
               f'moves {nbytes / 1e9:.2f} GB = {t_mem * 1e3:.1f} ms at the measured bandwidth')
  try:
    def run():
      return jax.block_until_ready(compiled(*args))

    notes.append(format_profile(profile_jax(run, compiled.as_text(), flops=flops), 'ours'))
  except Exception as e:  # pylint: disable=broad-except
    notes.append(f'ours: profile failed ({type(e).__name__}: {e})')
  try:
    notes.append(format_profile(profile_torch(torch_step), 'torch'))
  except Exception as e:  # pylint: disable=broad-except
    notes.append(f'torch: profile failed ({type(e).__name__}: {e})')
  return notes


COLUMNS = (['projector', 'reference', 'kind', 'shapes', 'params (M)', 'parity (fwd / grad)', 'GFLOP']
           + [f'{k} (ms)' for k in SETTINGS] + ['torch (ms)'] + [f'ratio {k}' for k in SETTINGS]
           + [f'roofline {k}' for k in SETTINGS] + ['torch GFLOP/s', 'XLA peak GFLOP/s', 'spread (ours / torch)'])


def run(opts: Options, peaks: dict[str, float], probe: PeakProbe | None = None,
        run_row: Callable[[str], Row] | None = None) -> Section:
  """Every case --only selects, in CASES order (probe: see run_case). run_row: measures one case by name instead
  of run_case in this process (the bench's per-row child processes)."""
  import gc

  section = Section('projectors', 'Projectors: forward + backward vs the transformers reference (f32)',
                    list(COLUMNS))
  section.intro.append(
      'ours = `jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))` (grads of every param and input) under each '
      'kernel setting (xla: the default, plain XLA; cpu-tuned: model.kernels dense=cpu_transpose_copy, '
      'attention=query_blocks; in the full run each setting in its own process, interleaved with torch calls of '
      'its own: column torch (ms) is the cpu-tuned process\'s), theirs = the transformers module (eval mode, '
      'sdpa attention), same loss '
      '`mean(y**2)` and `.backward()` into every param and input. Weights: random torch init converted with '
      f'`mmproj.convert`; outputs and input grads of both settings agree to {PARITY_RTOL:g} (relative max error, '
      'column parity: xla, cpu-tuned) before timing. ratio = torch / ours (> 1: ours faster); roofline = ours '
      'GFLOP/s / XLA peak GFLOP/s, the best-call rate of a 1024 x 1024 f32 '
      'matmul (benchmarks.measure_matmul_peak\'s best-call rule) sampled in every timed round of the row, '
      'so that it reads against the compute available while the row ran. '
      'kind: matmul = token-wise MLPs (the roofline goal applies), attention = attention-based resamplers and '
      'cross-attention layers (the 1.3x goal applies), memory = pooling-dominated (only the 1.0x goal).')
  for case in CASES:
    if not opts.wants(f'projectors/{case.name}'):
      continue
    start = time.perf_counter()
    try:
      row = run_row(case.name) if run_row else run_case(case, opts, peaks, probe)
    except Exception as e:  # pylint: disable=broad-except
      row = Row(f'projectors/{case.name}', {'projector': case.name, 'reference': case.reference,
                                            'kind': case.kind})
      row.goal('>= 1.0x reference (f32)', math.nan, GOAL_SPEEDUP)
      row.notes.append(f'FAILED: {type(e).__name__}: {e}')
      opts.log(f'  {case.name}: FAILED {type(e).__name__}: {e}')
    section.rows.append(row)
    opts.log(f'  {case.name}: ratio ' + ', '.join(f'{k} {row.values.get(f"ratio {k}", math.nan):.3g}'
                                                  for k in SETTINGS) + f' ({time.perf_counter() - start:.0f} s)')
    gc.collect()
  return section
