"""Matmul FLOPs of one training step, and the accelerator peaks that turn them into MFU.

    f = step_flops(cfg, labels=setup.labels)      # {'encoder_fwd', ..., 'total', 'tokens', ...} per step
    peak, source = device_peak_flops(device, cfg.model.dtype, cfg.train.device_peak_flops)

Matmul FLOPs, 2 per multiply-add (norms, softmax, activations and the optimizer are not counted). The towers own
their forward counts (`ViT.matmul_flops()` per image, `Llama.matmul_flops(L, N)` per row, with any gated
cross-attention blocks it is given); the projector's is read off its traced program (forward and vector-Jacobian
product, `jaxpr_matmul_flops`), so every family is exact without a formula here. Per block of a tower, with W its
weight matmuls and A its attention products:
    forward     W + A
    backward    2W + 2A  when the tower trains (input and weight gradients; both operands of A)
                W + 2A   when it is frozen but a gradient passes through it (a frozen LM above a trained projector)
                0        when nothing before it or in it trains (a frozen encoder: the model stop_gradients it)
    recompute   (model.remat) 'full': the forward but the block's last matmul; 'minimal': the attention scores,
                and the weighted sums when the tower trains (o_proj's weight gradient reads them)
The LM head adds its forward at the loss positions (train.loss_positions) and an input / weight gradient each
where needed; a trained encoder's patch embedding its weight gradient. An output side (model.output with
train.output_loss) adds its signal tokens' head rows like the head, and the output term read off its traced program
like the projector: the output projector on the K signal states, then the align target (the generator's text
encoder, forward only) or the frozen generator's flow-matching loss, whose backward passes through the generator
to the conditioning. A tower counts as trained when any of its
params train; scanned stacks count as unscanned ones. tests/test_flops.py checks the total against the traced
gradient program (exactly) and XLA's cost analysis of the compiled step (within 2%; XLA counts a lax.cond's larger
branch, a while loop's body once and a depthwise convolution's weight gradient as a dense one).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jax_core

PARTS = ('encoder', 'projector', 'lm', 'output')
DTYPES = ('float32', 'bfloat16')

# Dense (no sparsity) peaks per device in FLOP/s by `device.device_kind`: (bf16, f32). NVIDIA Ampere and later run
# DEFAULT-precision f32 dots on the tensor cores in TF32 (jax-ml/jax#18934): the dense TF32 peak; TPUs run them as
# one bf16 pass (None: the bf16 peak). Kinds spelled otherwise (memory sizes, GH200) match by substring, in order.
PEAKS = {
    'NVIDIA H100 PCIe': (756e12, 378e12), 'H200': (989e12, 494.7e12), 'H100': (989e12, 494.7e12),
    'A100': (312e12, 156e12), 'TPU v4': (275e12, None), 'TPU v5 lite': (197e12, None), 'TPU v5e': (197e12, None),
    'TPU v5p': (459e12, None), 'TPU v5': (459e12, None), 'TPU v6 lite': (918e12, None), 'TPU v6e': (918e12, None),
}


# ------------------------------------------------------------------------------------- counting traced programs


def _dot_general_flops(eqn) -> int:
  """2 * prod(lhs shape) * prod(rhs dims that are neither contracted nor batch)."""
  lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
  (_, rhs_contract), (_, rhs_batch) = eqn.params['dimension_numbers']
  free = [n for i, n in enumerate(rhs) if i not in set(rhs_contract) | set(rhs_batch)]
  return 2 * math.prod(lhs) * math.prod(free)


def _taps(out_size: int, kernel: int, in_size: int, stride: int, pad_lo: int, lhs_dil: int, rhs_dil: int) -> int:
  """(output position, kernel tap) pairs of one spatial dimension that read a real input element, not padding
  (nor a hole of lhs dilation)."""
  pos = (np.arange(out_size)[:, None] * stride + np.arange(kernel)[None, :] * rhs_dil - pad_lo)
  return int(np.sum((pos >= 0) & (pos <= (in_size - 1) * lhs_dil) & (pos % lhs_dil == 0)))


def _conv_flops(eqn) -> int:
  """2 * output batch * output features * input features per group * taps reading real input (not padding)."""
  lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
  out = eqn.outvars[0].aval.shape
  p = eqn.params
  lhs_spec, rhs_spec, out_spec = p['dimension_numbers']
  ndim = len(lhs_spec) - 2
  lhs_dil, rhs_dil = p.get('lhs_dilation') or (1,) * ndim, p.get('rhs_dilation') or (1,) * ndim
  taps = math.prod(
      _taps(out[out_spec[2 + d]], rhs[rhs_spec[2 + d]], lhs[lhs_spec[2 + d]], p['window_strides'][d],
            p['padding'][d][0], lhs_dil[d], rhs_dil[d]) for d in range(ndim))
  return 2 * out[out_spec[0]] * out[out_spec[1]] * rhs[rhs_spec[1]] * taps


def _jaxpr_flops(jaxpr) -> int:
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'dot_general':
      total += _dot_general_flops(eqn)
    elif name == 'conv_general_dilated':
      total += _conv_flops(eqn)
    elif name == 'cond':
      total += max(_jaxpr_flops(b.jaxpr) for b in eqn.params['branches'])
    else:
      # scan runs its body `length` times; a while loop's trip count is unknown (counted once).
      repeat = int(eqn.params.get('length', 1)) if name == 'scan' else 1
      total += repeat * sum(_jaxpr_flops(sub) for sub in jax_core.jaxprs_in_params(eqn.params))
  return total


def jaxpr_matmul_flops(fn: Callable, *args) -> int:
  """Matmul FLOPs of fn(*args) read off its jaxpr: every dot_general (2 * M * N * K) and convolution (2 * output
  positions * output features * input features per group * kernel taps that read real input, not padding: XLA's
  cost-analysis convention), inside jit / scan / cond / remat / custom-gradient calls too (a while loop's body
  once). args may be jax.ShapeDtypeStructs: nothing is compiled or run. Counts the program JAX hands to XLA,
  before XLA's dead-code elimination (e.g. a forward whose output only a discarded value uses)."""
  return _jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def _projector(cfg_model: Any, labels: Any, in_flows: bool) -> tuple[int, int]:
  """(forward, backward) matmul FLOPs of the projector on one image, from its traced program: the forward, and
  the vector-Jacobian product w.r.t. its trainable params (and its input iff `in_flows`)."""
  import flax

  from mmproj import model as model_lib

  _, proj, _ = model_lib.towers(cfg_model)
  grid = model_lib.encoder_grid(cfg_model)
  x = jax.ShapeDtypeStruct((1, model_lib.encoder_tokens(cfg_model), proj.in_dim), proj.dtype)  # one example's
  key = jax.random.key(0)
  params = jax.eval_shape(lambda x: flax.linen.unbox(proj.init(key, x, grid=grid)['params']), x)
  leaves, treedef = jax.tree.flatten(params)
  trained = [i for i, lab in enumerate(jax.tree.leaves(labels['projector'])) if lab == 'train']

  def forward(leaves, x):
    return proj.apply({'params': jax.tree.unflatten(treedef, leaves)}, x, grid=grid, deterministic=False,
                      rngs={'dropout': key})

  def forward_and_grads(leaves, x):
    def run(sub, x):
      return forward([sub[trained.index(i)] if i in trained else leaf for i, leaf in enumerate(leaves)], x)
    out, pull = jax.vjp(run, [leaves[i] for i in trained], x) if in_flows else jax.vjp(
        lambda sub: run(sub, x), [leaves[i] for i in trained])
    return pull(out)

  fwd = jaxpr_matmul_flops(forward, leaves, x)
  if not trained and not in_flows:
    return fwd, 0
  return fwd, jaxpr_matmul_flops(forward_and_grads, leaves, x) - fwd


def _output_term(cfg: Any, labels: Any, states_flow: bool) -> tuple[int, int]:
  """(forward, backward) matmul FLOPs of the output term (mmproj/train/loss.py) on one row, from its traced
  program: the forward, and the vector-Jacobian product w.r.t. the trained output params (and the K signal states
  iff `states_flow`: something at or below the LM's last block trains). The generator stays frozen."""
  import flax

  from mmproj import generators
  from mmproj import model as model_lib
  from mmproj.train import loss as loss_lib

  kind, c = loss_lib.output_loss(cfg)[0], cfg.model
  side, gen = model_lib.output_modules(c, model_lib.DTYPES[c.dtype])
  key = jax.random.key(0)
  states = jax.ShapeDtypeStruct((1, side.num_signal_tokens, side.width), side.dtype)     # [1, K, Dt]
  text = jax.ShapeDtypeStruct((1, gen.text_len), jnp.int32)                              # [1, L]
  image = jax.ShapeDtypeStruct((1, gen.image_size, gen.image_size, 3), jnp.uint8)        # [1, S, S, 3]
  params = jax.eval_shape(lambda s: flax.linen.unbox(side.init(key, s, method='condition')['params']), states)
  gen_params = jax.eval_shape(lambda t, x: flax.linen.unbox(gen.init(key, t, x.astype(jnp.float32), jnp.zeros(1))
                                                            ['params']), text, image)
  leaves, treedef = jax.tree.flatten(params)
  trained = [i for i, lab in enumerate(jax.tree.leaves(labels['output'])) if lab == 'train']

  def term(leaves, gen_params, states, text, image):
    cond = side.apply({'params': jax.tree.unflatten(treedef, leaves)}, states, deterministic=False,
                      method='condition', rngs={'dropout': key})                         # [1, L, Dc]
    if kind == 'align':
      target = jax.lax.stop_gradient(gen.apply({'params': gen_params}, text, method='encode_text'))
      return jnp.mean(jnp.square(cond.astype(jnp.float32) - target.astype(jnp.float32)))
    return generators.flow_matching_losses(gen, gen_params, image, cond, key)[0]

  def term_and_grads(leaves, gen_params, states, text, image):
    def run(sub, states):
      full = [sub[trained.index(i)] if i in trained else leaf for i, leaf in enumerate(leaves)]
      return term(full, gen_params, states, text, image)
    sub = [leaves[i] for i in trained]
    out, pull = jax.vjp(run, sub, states) if states_flow else jax.vjp(lambda sub: run(sub, states), sub)
    return pull(jnp.ones_like(out))

  fwd = jaxpr_matmul_flops(term, leaves, gen_params, states, text, image)
  if not trained and not states_flow:
    return fwd, 0
  return fwd, jaxpr_matmul_flops(term_and_grads, leaves, gen_params, states, text, image) - fwd


# ------------------------------------------------------------------------------------- a step


def _recompute(policy: str, block: dict, trains: bool) -> int:
  if policy == 'full':
    return block['weights'] + block['attention'] - block['last']
  if policy == 'minimal':
    return block['attention'] // 2 * (1 + int(trains))
  return 0


def _trained(labels: Any) -> Callable[[str], bool]:
  """prefix -> does any parameter at or under that path train?"""
  from mmproj.train.optimizer import path_str
  train = [path_str(p) for p, lab in jax.tree_util.tree_flatten_with_path(labels)[0] if lab == 'train']
  return lambda prefix: any(p == prefix or p.startswith(prefix + '/') for p in train)


def step_flops(cfg, *, labels: Any) -> dict[str, Any]:
  """Matmul FLOPs of one training step of the experiment config `cfg` (see the module docstring), rows of one
  image; labels: 'train' / 'freeze' per parameter (Setup.labels). -> ints {part}_{fwd, bwd, remat} for part in
  encoder / projector / lm / output (gated cross-attention blocks count as the projector's; output: the signal
  tokens' head rows and the output term), fwd, bwd, remat, total, tokens
  (B * L), images, batch_size, seq_len, and flops_per_token (a float)."""
  from mmproj import model as model_lib
  from mmproj import projectors
  from mmproj.layers import kernels as kernels_lib
  from mmproj.train import loss as loss_lib
  from mmproj.train import state

  c, tr = cfg.model, _trained(labels)
  batch, length, positions = int(cfg.train.batch_size), state.sequence_length(cfg), state.loss_positions(cfg)
  encoder, _, lm = model_lib.towers(c)
  image = {f'{part}_{kind}': 0 for part in PARTS for kind in ('fwd', 'bwd', 'remat')}   # per image
  row = dict(image)                                                                      # per row
  merged, media_flows, media_len = c.use_image and not model_lib.injects_into_lm(c), False, 0
  if c.use_image:
    e, e_trains = encoder.matmul_flops(), tr('encoder')
    items = model_lib.encoder_passes(c)           # a video's frames (temporal groups) each go through the tower
    image['encoder_fwd'] = items * (e['embed'] + e['blocks'] * (e['weights'] + e['attention']))
    if e_trains:
      image['encoder_bwd'] = items * (e['embed'] + e['blocks'] * 2 * (e['weights'] + e['attention']))
      image['encoder_remat'] = items * e['blocks'] * _recompute(encoder.remat, e, True)
    image['projector_fwd'], image['projector_bwd'] = _projector(c, labels, e_trains)
    media_flows = e_trains or tr('projector')
    if not merged:
      media_len = projectors.num_output_tokens(c.projector, model_lib.encoder_grid(c))

  attention = kernels_lib.resolve(c.kernels, jax.default_backend(), c.dtype).attention
  f = lm.matmul_flops(length, positions or length, attention, media_len)
  # The signal tokens' embedding rows (model.output) enter at the LM's input like its own embedding's.
  flows = bool(tr('lm/embed_tokens') or tr('output/signal_embed') or (merged and media_flows))
  lm_trains = any(tr(f'lm/{name}') for name in ('layers', *(f'layers_{i}' for i in range(lm.depth))))
  for i in range(f['blocks']):
    if i in f['gated']:            # dX of an operand that depends on something trained, dW of a trained weight
      g, g_trains = f['gated'][i], tr(f'lm/xattn_layers_{i}')
      q_flows, kv_flows = flows or g_trains, media_flows or g_trains
      inner = q_flows or kv_flows
      row['projector_fwd'] += g['text'] + g['media'] + g['attention']
      row['projector_bwd'] += (g['text'] * (inner + g_trains) + g['media'] * (media_flows + g_trains)
                               + g['attention'] // 2 * (q_flows + 2 * kv_flows + inner))
      flows = flows or inner
    row['lm_fwd'] += f['weights'] + f['attention']
    if lm_trains or flows:
      row['lm_bwd'] += f['weights'] * (1 + int(lm_trains)) + 2 * f['attention']
      row['lm_remat'] += _recompute(lm.remat, f, lm_trains)
    flows = flows or lm_trains
  row['lm_fwd'] += f['head']
  row['lm_bwd'] += f['head'] * (int(flows) + int(tr('lm/embed_tokens' if lm.tie_embeddings else 'lm/lm_head')))
  if model_lib.has_output(c):              # the K signal tokens' head rows, next to the vocabulary's
    signal_head = f['head'] // lm.vocab_size * int(c.output.num_signal_tokens)
    row['output_fwd'] += signal_head
    row['output_bwd'] += signal_head * (int(flows) + int(tr('output/signal_head')))
    if loss_lib.output_loss(cfg)[0] is not None:
      row['output_fwd'], row['output_bwd'] = (a + b for a, b in zip(
          (row['output_fwd'], row['output_bwd']), _output_term(cfg, labels, flows)))

  images = batch if c.use_image else 0
  out: dict[str, Any] = {k: images * image[k] + batch * row[k] for k in image}
  for kind in ('fwd', 'bwd', 'remat'):
    out[kind] = sum(out[f'{part}_{kind}'] for part in PARTS)
  out.update(total=out['fwd'] + out['bwd'] + out['remat'], tokens=batch * length, images=images, batch_size=batch,
             seq_len=length)
  out['flops_per_token'] = out['total'] / out['tokens']
  return out


def format_flops_summary(f: dict[str, Any]) -> str:
  """A few lines for the start-up log from a step_flops result: FLOPs per step by part (forward / backward /
  recompute), tokens per step, FLOPs per token."""
  name, scale = next((n, x) for n, x in (('PFLOP', 1e15), ('TFLOP', 1e12), ('GFLOP', 1e9), ('MFLOP', 1e6),
                                         ('FLOP', 0)) if f['total'] >= x)
  scale = scale or 1.0
  lines = [f'Matmul FLOPs per step: {f["total"] / scale:.4g} {name} (batch {f["batch_size"]}, {f["seq_len"]} '
           f'tokens/row, {f["tokens"]:,} tokens, {f["images"]:,} images) = {f["flops_per_token"] / 1e9:.4g} '
           'GFLOP/token']
  lines.append(f'  {"part":<10}{"forward":>12}{"backward":>12}{"recompute":>12}   ({name})')
  shown = [p for p in PARTS if p != 'output' or f['output_fwd']]     # the output row only with an output side
  for part in shown + ['total']:
    keys = ('fwd', 'bwd', 'remat') if part == 'total' else (f'{part}_fwd', f'{part}_bwd', f'{part}_remat')
    lines.append(f'  {part:<10}' + ''.join(f'{f[k] / scale:>12.4g}' for k in keys))
  return '\n'.join(lines)


def device_peak_flops(device: Any, dtype: str, configured: float | None = None) -> tuple[float | None, str]:
  """(peak FLOP/s of one device for matmuls in `dtype` (model.dtype), where the number comes from).

  `configured` (train.device_peak_flops) wins; then the PEAKS of known accelerators (an f32 MFU on a TPU reads
  against the bf16 peak). A CPU or an unknown kind: None, so no MFU is reported (the benchmarks measure a CPU's
  matmul rate: `python -m benchmarks`)."""
  if dtype not in DTYPES:
    raise ValueError(f'dtype={dtype!r} (model.dtype) is not one of {DTYPES}')
  if configured:
    return float(configured), f'train.device_peak_flops = {float(configured) / 1e12:.4g} TFLOP/s'
  kind = device.device_kind
  bf16, f32 = next((p for sub, p in PEAKS.items() if sub in kind), (None, None)) if device.platform != 'cpu' else (
      None, None)
  if bf16 is None:
    return None, f'unknown for {kind!r} (set train.device_peak_flops to report MFU)'
  if dtype == 'float32' and f32 is not None:
    return f32, f'{kind}: dense TF32 peak {f32 / 1e12:.0f} TFLOP/s (f32 dots run as TF32)'
  return bf16, f'{kind}: dense bf16 peak {bf16 / 1e12:.0f} TFLOP/s'
