"""Matmul FLOPs of one training step, accelerator peaks, and model FLOPs utilisation (MFU).

    f = step_flops(cfg)                     # {'encoder_fwd', ..., 'total', 'tokens', ...} per optimizer step
    peak, source = device_peak_flops(dtype=cfg.model.dtype)
    mfu(f['total'], steps_per_sec, jax.device_count(), peak)

FLOPs are matmul FLOPs, 2 per multiply-add (norms, softmax, activations, RoPE, biases and the optimizer update
are not counted). B = batch size, L = sequence length = num_image_tokens + data.text_len (trainer.sequence_length).

Encoder (ViT), per image; N = (image_size / p)^2 patches, S = N (+1 with cls_token) tokens, D width, F mlp_dim,
only the nb = depth + output_layer + 1 blocks that run (ViT.num_blocks):
    patch embedding   2 * N * (3 p^2) * D
    per block         q, k, v, o  4 * 2 * S * D^2
                      scores q k^T  2 * S^2 * D      weighted sum p v  2 * S^2 * D
                      MLP fc1, fc2  2 * 2 * S * D * F
Projector, per image: read off the projector's own traced program (`jaxpr_matmul_flops`: the dot and conv
    equations of its jaxpr, forward and vector-Jacobian product), so token-wise MLPs, convolutions and
    attention-based resamplers are all exact without a formula per family, in the same units as the formulas
    here (XLA's cost_analysis would count the same dots but adds elementwise work and needs a compile).
    An injecting projector (gated_xattn) also owns the gated cross-attention blocks it adds to the LM (params
    under lm/xattn_layers_*, as model.projector_param_count counts them), per row, before LM block i;
    S_m = T_img * M media tokens, H heads, K kv heads, d head_dim, F FFW width:
                      q  2 * L * D * H * d          k, v  2 * 2 * S_m * D * K * d      o  2 * L * H * d * D
                      scores + weighted sum  2 * 2 * L * S_m * H * d
                      FFW  2 * 2 * L * D * F (flamingo)  or  3 * 2 * L * D * F (mllama, SwiGLU)
LM (Llama), per row; D width, H heads, K kv heads (GQA), dh head_dim, F mlp_dim, V vocab_size:
    embedding         0 (a gather)
    per block         q  2 * L * D * H * dh        k, v  2 * 2 * L * D * K * dh       o  2 * L * H * dh * D
                      scores  2 * P * H * dh       weighted sum  2 * P * H * dh   (P pairs: L^2, block-causal below)
                      SwiGLU gate, up, down  3 * 2 * L * D * F
    lm_head           2 * N * D * V  (tied or not: x @ E^T costs the same); N = trainer.loss_positions: the
                      text positions L - M when visual tokens are merged into the sequence (the train loss
                      projects only the loss positions to the vocabulary), L otherwise. A batch with a row of more
                      than N loss positions runs the L-position path instead; not counted.
  LM attention counts the score blocks it computes: mmproj.layers.causal_query_blocks splits the queries of a
  causal pass (L >= 256) into n blocks, block [a, b) scoring keys [0, b) only, i.e. sum (b - a) * b pairs instead
  of L^2 ((n + 1) / 2n of it); the blocks are dense and masked inside (padding, sliding window, segments), so that
  is what runs. Encoder and cross-attention count the full T x S matrix.

Backward. For every matmul Y = X W (or the activation-activation products of attention) the backward pass
computes, each at the cost of the forward product:
    dX = dY W^T   iff X depends on a trainable parameter (a gradient must flow through X to reach it),
    dW = X^T dY   iff W trains.
So a part whose params train costs 2x its forward; a part with nothing trainable before it or in it 0x (a frozen
encoder, which the model stop_gradients); and a frozen part between the loss and a trainable part 1x (input grads
only), except for attention's two activation-activation products (scores, weighted sum), whose operands both need
their gradient: 2x there, so a frozen transformer's backward is 1x its weight matmuls + 2x its attention products.
Data flows encoder -> projector -> lm; trainability is per parameter (mmproj.train.optimizer.trainable_labels on
cfg.train.trainable / cfg.train.frozen), applied matmul by matmul, so freezing some blocks of a part is exact too.
E.g. LLaVA stage 1 (only the projector trains): encoder forward + LM forward + LM input grads (1x, attention 2x) +
projector forward + its weight grads + the input grads of all but its first layer (its input, the frozen encoder's
output, needs none): the projector costs 3x its forward minus one forward of its first layer.
This is what a step that differentiates the trainable params only runs; `all_param_grads=True` counts a step that
differentiates every param and drops the frozen ones' updates later (their weight grads then run too, unless XLA
can drop them as unused).

Remat (cfg.model.remat, or model.lm.remat / model.encoder.remat where set; mmproj/layers/scan.py wraps every ViT
and LM block in nn.remat): a block that runs a backward pass recomputes, before it, the forward matmuls whose
outputs its backward needs and the policy did not keep:
    'none', 'dots'  nothing (every matmul output is kept)
    'minimal'       the attention products: scores iff any of q, k, v needs a gradient (softmax's backward and dV
                    read the probabilities), the weighted sum iff o_proj's kernel trains (dW_o reads it)
    'full'          the block's forward up to its last MLP matmul (fc2 / down_proj), whose output only the residual
                    add reads: everything else feeds a norm or product whose backward needs it
  Counted from the program JAX traces; XLA may still merge a few recomputed products with the forward (seen: the
  first block, whose input is a non-differentiated argument). Gated cross-attention blocks are not rematerialised.
Scanned stacks (model.lm.scan_layers / model.encoder.scan_layers: params under layers/ with a leading layer axis)
  train or freeze as one, and the scan's transpose computes the carry's gradient in every iteration once any does,
  so with a trainable stack even the first block's input gradients run.

Several images per row (gated_xattn, batch['image'] [B, T_img, H, W, 3]): pass images_per_row=T_img; the encoder
and projector run once per image (B * T_img images), the gated blocks see S_m = T_img * M media tokens per row.
"""
from __future__ import annotations

import functools
import math
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jax_core

PARTS = ('encoder', 'projector', 'lm')

# Dense (no sparsity) bf16 peaks per device, FLOP/s, keyed by jax's `device.device_kind`.
PEAK_FLOPS = {
    'NVIDIA H100 80GB HBM3': 989e12,     # H100 SXM5
    'NVIDIA H100 PCIe': 756e12,
    'NVIDIA H200': 989e12,
    'NVIDIA A100-SXM4-80GB': 312e12,
    'NVIDIA A100-SXM4-40GB': 312e12,
    'NVIDIA A100-PCIE-40GB': 312e12,
    'NVIDIA A100 80GB PCIe': 312e12,
    'TPU v4': 275e12,
    'TPU v5 lite': 197e12,               # v5e
    'TPU v5e': 197e12,
    'TPU v5': 459e12,                    # v5p reports 'TPU v5'
    'TPU v5p': 459e12,
    'TPU v6 lite': 918e12,               # v6e (Trillium)
    'TPU v6e': 918e12,
}
# Kinds not spelled exactly as above (other memory sizes, GH200, ...): the first substring that matches.
_PEAK_BY_SUBSTRING = (('H100 PCIe', 756e12), ('H200', 989e12), ('H100', 989e12), ('A100', 312e12))

# float32 matmuls. NVIDIA Ampere and later run DEFAULT-precision f32 dots on the tensor cores in TF32
# (jax-ml/jax#18934; precision 'highest' would need the far lower plain-FP32 peak): dense TF32 peaks. TPUs run
# DEFAULT-precision f32 dots as one bf16 pass, so the bf16 peak applies there (the lookup falls back to it).
PEAK_FLOPS_F32 = {
    'NVIDIA H100 80GB HBM3': 494.7e12,
    'NVIDIA H100 PCIe': 378e12,
    'NVIDIA H200': 494.7e12,
    'NVIDIA A100-SXM4-80GB': 156e12,
    'NVIDIA A100-SXM4-40GB': 156e12,
    'NVIDIA A100-PCIE-40GB': 156e12,
    'NVIDIA A100 80GB PCIe': 156e12,
}
_PEAK_F32_BY_SUBSTRING = (('H100 PCIe', 378e12), ('H200', 494.7e12), ('H100', 494.7e12), ('A100', 156e12))

DTYPES = ('float32', 'bfloat16')


# ------------------------------------------------------------------------------------- counting traced programs


def _sub_jaxprs(value: Any):
  """The jaxprs held by one equation parameter (a jaxpr, a closed jaxpr, or a tuple of them)."""
  if isinstance(value, jax_core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, jax_core.Jaxpr):
    yield value
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from _sub_jaxprs(v)


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
  """2 * output batch * output features * input features per group * the taps that read real input (padding
  taps are not counted, as XLA's cost analysis does not count them)."""
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
      total += repeat * sum(_jaxpr_flops(sub) for v in eqn.params.values() for sub in _sub_jaxprs(v))
  return total


def jaxpr_matmul_flops(fn: Callable, *args) -> int:
  """Matmul FLOPs of fn(*args) read off its jaxpr: every dot_general (2 * M * N * K) and convolution (2 * output
  positions * output features * input features per group * kernel taps that read real input, not padding: XLA's
  cost-analysis convention), inside jit / scan / cond / remat / custom-gradient calls too (a while loop's body
  once). args may be jax.ShapeDtypeStructs: nothing is compiled or run. Counts the program JAX hands to XLA,
  before XLA's dead-code elimination (e.g. a forward whose output only a discarded value uses)."""
  return _jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)


# ------------------------------------------------------------------------------------- trainability


REMAT_POLICIES = ('none', 'dots', 'minimal', 'full')


def _remat_policy(cfg_model: Any, tower: str) -> str:
  """The remat policy of a tower ('lm' or 'encoder'): cfg.model.<tower>.remat, else cfg.model.remat, else 'none'."""
  value = cfg_model[tower].get('remat', None) if tower in cfg_model else None
  field = f'model.{tower}.remat'
  if value is None:
    value, field = cfg_model.get('remat', 'none'), 'model.remat'
  if value not in REMAT_POLICIES:
    raise ValueError(f'{field}={value!r} is not one of {list(REMAT_POLICIES)}')
  return value


def _abstract_params(cfg) -> Any:
  """The model's parameter tree as ShapeDtypeStructs (nothing allocated)."""
  import flax

  from mmproj import model as model_lib
  model = model_lib.build_model(cfg.model)
  size = int(cfg.model.encoder.image_size) if cfg.model.use_image else int(cfg.data.get('image_size', 1))
  seq = _sequence_length(cfg)
  batch = {'image': jax.ShapeDtypeStruct((1, size, size, 3), jnp.uint8),
           'tokens': jax.ShapeDtypeStruct((1, seq), jnp.int32),
           'positions': jax.ShapeDtypeStruct((1, seq), jnp.int32),
           'input_mask': jax.ShapeDtypeStruct((1, seq), jnp.int32)}
  boxed = jax.eval_shape(lambda b: model.init(jax.random.key(0), b), batch)['params']
  return flax.linen.unbox(boxed)


def _sequence_length(cfg) -> int:
  from mmproj.train import trainer   # imported here: the trainer imports this module
  return int(trainer.sequence_length(cfg))


def _label_map(labels: Any) -> dict[str, str]:
  from mmproj.train.optimizer import path_str
  return {path_str(path): lab for path, lab in jax.tree_util.tree_flatten_with_path(labels)[0]}


class _Trainable:
  """tr(prefix): does any parameter at or under the path `prefix` train?"""

  def __init__(self, label_map: dict[str, str]):
    self._train = [p for p, lab in label_map.items() if lab == 'train']

  def __call__(self, prefix: str) -> bool:
    return any(p == prefix or p.startswith(prefix + '/') for p in self._train)


# ------------------------------------------------------------------------------------- the analytic walk


class _Ledger:
  """Forward / backward / recompute FLOPs per part for one row (LM) or one image (encoder, projector)."""

  def __init__(self, tr: _Trainable):
    self.tr = tr
    self.fwd = dict.fromkeys(PARTS, 0)
    self.bwd = dict.fromkeys(PARTS, 0)
    self.remat = dict.fromkeys(PARTS, 0)

  def matmul(self, part: str, flops: int, x_flows: bool, weight: str) -> bool:
    """Y = X W with W at path `weight` (kernel under it): forward, + dX iff X flows, + dW iff W trains.
    Returns whether Y flows (depends on a trainable parameter)."""
    w_trains = self.tr(weight + '/kernel') or self.tr(weight + '/embedding')
    self.fwd[part] += flops
    self.bwd[part] += flops * (int(x_flows) + int(w_trains))
    return x_flows or self.tr(weight)

  def product(self, part: str, flops: int, a_flows: bool, b_flows: bool) -> bool:
    """An activation-activation product (attention): the gradient of each operand that flows."""
    self.fwd[part] += flops
    self.bwd[part] += flops * (int(a_flows) + int(b_flows))
    return a_flows or b_flows


def _attention(led: _Ledger, part: str, prefix: str, *, q_flows: bool, kv_flows: bool, tq: int, tk: int,
               d_q: int, d_kv: int, heads: int, kv_heads: int, head_dim: int,
               causal: bool = False) -> tuple[bool, int]:
  """q/k/v/o projections + scores + weighted sum; q from a [tq, d_q] stream, k/v from a [tk, d_kv] one; causal:
  the block-causal score blocks of mmproj.layers.causal_query_blocks only. Returns (whether the output [tq, d_q]
  flows, what 'minimal' remat recomputes of it)."""
  from mmproj.layers.attention import causal_query_blocks
  tr = led.tr
  rq = led.matmul(part, 2 * tq * d_q * heads * head_dim, q_flows, f'{prefix}/q_proj') or tr(f'{prefix}/q_norm')
  rk = led.matmul(part, 2 * tk * d_kv * kv_heads * head_dim, kv_flows, f'{prefix}/k_proj') or tr(f'{prefix}/k_norm')
  rv = led.matmul(part, 2 * tk * d_kv * kv_heads * head_dim, kv_flows, f'{prefix}/v_proj')
  pairs = sum((hi - lo) * hi for lo, hi in causal_query_blocks(tq)) if causal else tq * tk
  product = 2 * pairs * heads * head_dim
  rp = led.product(part, product, rq, rk)                               # scores q k^T: [H, tq, tk]
  ro = led.product(part, product, rp, rv)                               # probs @ v:    [tq, H, dh]
  recompute = product * (int(rq or rk or rv) + int(tr(f'{prefix}/o_proj/kernel')))
  return led.matmul(part, 2 * tq * heads * head_dim * d_q, ro, f'{prefix}/o_proj'), recompute


def _mlp(led: _Ledger, part: str, prefix: str, x_flows: bool, tokens: int, width: int, hidden: int,
         first: tuple[str, ...], last: str) -> tuple[bool, int]:
  """fc1 (or gate + up) -> act -> fc2 (or down) on [tokens, width].
  Returns (whether the output flows, the forward FLOPs of the last matmul)."""
  h = False
  for name in first:
    h = led.matmul(part, 2 * tokens * width * hidden, x_flows, f'{prefix}/{name}') or h
  out = 2 * tokens * hidden * width
  return led.matmul(part, out, h, f'{prefix}/{last}'), out


class _Block:
  """Records a transformer block's forward and whether it runs a backward pass, for its remat recompute."""

  def __init__(self, led: _Ledger, part: str, policy: str):
    self.led, self.part, self.policy = led, part, policy
    self.attention_recompute = self.last_matmul = 0

  def __enter__(self):
    self.fwd0, self.bwd0 = self.led.fwd[self.part], self.led.bwd[self.part]
    return self

  def __exit__(self, *exc):
    if exc[0] is not None or self.led.bwd[self.part] == self.bwd0:
      return
    if self.policy == 'full':
      self.led.remat[self.part] += self.led.fwd[self.part] - self.fwd0 - self.last_matmul
    elif self.policy == 'minimal':
      self.led.remat[self.part] += self.attention_recompute


def _stack(led: _Ledger, prefix: str, depth: int, scanned: bool, x: bool) -> tuple[list[str], bool]:
  """Param prefixes of the `depth` blocks under `prefix` (layers_{i}, or one stacked layers/), and the flow into
  the first block (a trainable scanned stack differentiates its carry in every iteration, the first one too)."""
  if scanned:
    return [f'{prefix}/layers'] * depth, x or led.tr(f'{prefix}/layers')
  return [f'{prefix}/layers_{i}' for i in range(depth)], x


def _encoder(led: _Ledger, enc: Any, policy: str) -> bool:
  """One image through the ViT; returns whether its output tokens flow."""
  from mmproj.encoders.vit import ViT
  p, d, heads = int(enc.patch_size), int(enc.width), int(enc.num_heads)
  n = (int(enc.image_size) // p) ** 2
  s = n + int(bool(enc.get('cls_token', False)))
  nb = ViT(image_size=int(enc.image_size), patch_size=p, width=d, depth=int(enc.depth), num_heads=heads,
           mlp_dim=int(enc.mlp_dim), output_layer=int(enc.get('output_layer', -1))).num_blocks
  tr = led.tr
  x = led.matmul('encoder', 2 * n * (3 * p * p) * d, False, 'encoder/patch_embedding')
  x = x or tr('encoder/class_embedding') or tr('encoder/position_embedding') or tr('encoder/pre_layernorm')
  blocks, x = _stack(led, 'encoder', nb, bool(enc.get('scan_layers', False)), x)
  for pre in blocks:
    with _Block(led, 'encoder', policy) as block:
      a = x or tr(f'{pre}/layer_norm1')
      h, block.attention_recompute = _attention(
          led, 'encoder', f'{pre}/self_attn', q_flows=a, kv_flows=a, tq=s, tk=s, d_q=d, d_kv=d, heads=heads,
          kv_heads=heads, head_dim=d // heads)
      x = x or h
      b = x or tr(f'{pre}/layer_norm2')
      h, block.last_matmul = _mlp(led, 'encoder', f'{pre}/mlp', b, s, d, int(enc.mlp_dim), ('fc1',), 'fc2')
      x = x or h
  return x or tr('encoder/post_layernorm')


def _gated_block(led: _Ledger, pre: str, fields: dict, x: bool, media: bool, length: int, media_len: int) -> bool:
  """One gated cross-attention block (gated_xattn) on a row; FLOPs go to the projector part (no remat)."""
  tr, d = led.tr, int(fields['width'])
  a = x or tr(f'{pre}/input_layernorm')
  h, _ = _attention(led, 'projector', f'{pre}/cross_attn', q_flows=a, kv_flows=media, tq=length, tk=media_len,
                    d_q=d, d_kv=d, heads=int(fields['num_heads']), kv_heads=int(fields['num_kv_heads']),
                    head_dim=int(fields['head_dim']))
  x = x or h or tr(f'{pre}/attn_gate')
  b = x or tr(f'{pre}/post_attention_layernorm')
  if fields['variant'] == 'mllama':
    h, _ = _mlp(led, 'projector', f'{pre}/mlp', b, length, d, int(fields['mlp_dim']), ('gate_proj', 'up_proj'),
                'down_proj')
  else:
    h, _ = _mlp(led, 'projector', f'{pre}/mlp', b, length, d, int(fields['mlp_dim']), ('fc1',), 'fc2')
  return x or h or tr(f'{pre}/mlp_gate')


def _lm(led: _Ledger, cfg_model: Any, length: int, x: bool, media: bool, media_len: int, policy: str,
        head_positions: int) -> None:
  """One row of `length` tokens through the LM (and the gated blocks of an injecting projector); the vocabulary
  projection at `head_positions` of them."""
  from mmproj import projectors
  from mmproj.model import injects_into_lm
  from mmproj.projectors.gated_xattn import xattn_layer_ids
  lm, tr = cfg_model.lm, led.tr
  d, heads, kv_heads = int(lm.width), int(lm.num_heads), int(lm.num_kv_heads)
  head_dim = int(lm.get('head_dim', None) or d // heads)
  gated, fields = set(), {}
  if injects_into_lm(cfg_model):
    cls = projectors.get(cfg_model.projector.name)
    fields = cls.block_fields(cfg_model.projector, d)
    gated = set(xattn_layer_ids(int(lm.depth), int(cls.lm_injection(cfg_model.projector, d)['every'])))
  blocks, x = _stack(led, 'lm', int(lm.depth), bool(lm.get('scan_layers', False)), x)
  for i, pre in enumerate(blocks):
    if i in gated:
      x = _gated_block(led, f'lm/xattn_layers_{i}', fields, x, media, length, media_len)
    with _Block(led, 'lm', policy) as block:
      a = x or tr(f'{pre}/input_layernorm')
      h, block.attention_recompute = _attention(
          led, 'lm', f'{pre}/self_attn', q_flows=a, kv_flows=a, tq=length, tk=length, d_q=d, d_kv=d, heads=heads,
          kv_heads=kv_heads, head_dim=head_dim, causal=True)
      x = x or h
      b = x or tr(f'{pre}/post_attention_layernorm')
      h, block.last_matmul = _mlp(led, 'lm', f'{pre}/mlp', b, length, d, int(lm.mlp_dim), ('gate_proj', 'up_proj'),
                                  'down_proj')
      x = x or h
  x = x or tr('lm/norm')
  head = 'lm/embed_tokens' if lm.get('tie_embeddings', False) else 'lm/lm_head'
  led.matmul('lm', 2 * head_positions * d * int(lm.vocab_size), x, head)


# ------------------------------------------------------------------------------------- the projector, traced


@functools.lru_cache(maxsize=64)
def _projector_flops_cached(cfg_model_json: str, in_flows: bool, train_paths: tuple[str, ...]) -> tuple[int, int]:
  import json

  import flax
  import ml_collections

  from mmproj import projectors
  from mmproj.model import DTYPES as MODEL_DTYPES
  from mmproj.model import encoder_grid
  from mmproj.train.optimizer import path_str

  c = ml_collections.ConfigDict(json.loads(cfg_model_json))
  dtype = MODEL_DTYPES[c.dtype]
  proj = projectors.build(c.projector, in_dim=int(c.encoder.width), out_dim=int(c.lm.width), dtype=dtype)
  grid = encoder_grid(c)
  x = jax.ShapeDtypeStruct((1, grid[0] * grid[1], int(c.encoder.width)), dtype)   # one image's patch tokens
  key = jax.random.key(0)
  params = jax.eval_shape(lambda x: flax.linen.unbox(proj.init(key, x, grid=grid)['params']), x)
  paths, treedef = jax.tree_util.tree_flatten_with_path(params)
  train_idx = [i for i, (path, _) in enumerate(paths) if f'projector/{path_str(path)}' in train_paths]

  def forward(params, x):
    return proj.apply({'params': params}, x, grid=grid, deterministic=False, rngs={'dropout': key})

  fwd = jaxpr_matmul_flops(forward, params, x)
  if not train_idx and not in_flows:
    return fwd, 0

  def forward_and_grads(params, x, ct):
    """The forward and its vector-Jacobian product w.r.t. the trainable leaves (and x iff it flows)."""
    leaves = jax.tree.leaves(params)

    def run(trained, x):
      merged = list(leaves)
      for i, leaf in zip(train_idx, trained):
        merged[i] = leaf
      return forward(jax.tree_util.tree_unflatten(treedef, merged), x)

    trained = [leaves[i] for i in train_idx]
    if in_flows:
      out, pull = jax.vjp(run, trained, x)
    else:
      out, pull = jax.vjp(lambda t: run(t, x), trained)
    return out, pull(ct)

  ct = jax.eval_shape(forward, params, x)
  return fwd, jaxpr_matmul_flops(forward_and_grads, params, x, ct) - fwd


def _projector(cfg_model: Any, label_map: dict[str, str], in_flows: bool) -> tuple[int, int]:
  """(forward, backward) matmul FLOPs of the projector on one image, from its traced program: the forward, and
  the vector-Jacobian product w.r.t. its trainable params (and its input iff `in_flows`)."""
  train = tuple(sorted(p for p, lab in label_map.items() if lab == 'train' and p.startswith('projector/')))
  return _projector_flops_cached(cfg_model.to_json_best_effort(sort_keys=True), bool(in_flows), train)


# ------------------------------------------------------------------------------------- public API


def _labels_for(cfg, labels: Any, all_param_grads: bool) -> dict[str, str]:
  from mmproj.train import optimizer as opt_lib
  if labels is None:
    labels = opt_lib.trainable_labels(_cached_abstract_params(cfg), cfg.train)
  label_map = _label_map(labels)
  if all_param_grads:
    stopped = opt_lib.is_frozen(labels, 'encoder')
    label_map = {p: 'freeze' if stopped and p.startswith('encoder/') else 'train' for p in label_map}
  return label_map


def _cached_abstract_params(cfg) -> Any:
  return _abstract_params_by_json(cfg.to_json_best_effort(sort_keys=True))


@functools.lru_cache(maxsize=16)
def _abstract_params_by_json(cfg_json: str) -> Any:
  import json

  import ml_collections
  return _abstract_params(ml_collections.ConfigDict(json.loads(cfg_json)))


def step_flops(cfg, *, batch_size: int | None = None, labels: Any = None, images_per_row: int = 1,
               all_param_grads: bool = False) -> dict[str, Any]:
  """Matmul FLOPs of one training step of the experiment config `cfg` (see the module docstring).

  batch_size: rows per step (default cfg.train.batch_size), all devices together.
  labels: 'train' / 'freeze' per parameter (trainer.Setup.labels); None derives them from cfg.train.trainable /
    cfg.train.frozen on the model's abstract params.
  images_per_row: T_img images per row (injecting projectors only).
  all_param_grads: True counts what a step that differentiates *every* parameter runs (frozen ones' updates being
    dropped only afterwards, by the optimizer): weight grads of frozen params too, except those of a wholly frozen
    encoder, which the model stop_gradients. False (default) counts a step that differentiates the trainable
    params only.

  Returns ints: {part}_fwd, {part}_bwd, {part}_remat for part in encoder / projector / lm, and fwd, bwd, remat,
  total (their sums), tokens (B * L), images (B * images_per_row), batch_size, seq_len; and flops_per_token
  (total / tokens, a float).
  """
  from mmproj.model import injects_into_lm
  batch = int(cfg.train.batch_size if batch_size is None else batch_size)
  if batch <= 0:
    raise ValueError(f'batch_size={batch} (train.batch_size) must be positive')
  use_image = bool(cfg.model.use_image)
  images_per_row = int(images_per_row)
  if images_per_row < 1:
    raise ValueError(f'images_per_row={images_per_row} must be >= 1')
  if images_per_row > 1 and not injects_into_lm(cfg.model):
    raise ValueError(f'images_per_row={images_per_row}: several images per row need an injecting projector, not '
                     f'model.projector.name={cfg.model.projector.name!r} (or model.use_image=False)')
  length = _sequence_length(cfg)
  label_map = _labels_for(cfg, labels, all_param_grads)
  tr = _Trainable(label_map)

  per_image = _Ledger(tr)
  per_row = _Ledger(tr)
  media_flows, media_len = False, 0
  x_flows = tr('lm/embed_tokens')
  if use_image:
    enc_flows = _encoder(per_image, cfg.model.encoder, _remat_policy(cfg.model, 'encoder'))
    fwd, bwd = _projector(cfg.model, label_map, enc_flows)
    per_image.fwd['projector'] += fwd
    per_image.bwd['projector'] += bwd
    media_flows = enc_flows or tr('projector')
    if injects_into_lm(cfg.model):
      from mmproj import projectors
      from mmproj.model import encoder_grid
      media_len = images_per_row * projectors.num_output_tokens(cfg.model.projector, encoder_grid(cfg.model))
    else:
      x_flows = x_flows or media_flows       # visual tokens are written into the LM's input sequence
  from mmproj.train.trainer import loss_positions   # trainer imports this module
  head_positions = loss_positions(cfg) or length
  _lm(per_row, cfg.model, length, x_flows, media_flows, media_len, _remat_policy(cfg.model, 'lm'), head_positions)

  images = batch * images_per_row if use_image else 0
  out: dict[str, Any] = {}
  for part in PARTS:
    for kind in ('fwd', 'bwd', 'remat'):
      out[f'{part}_{kind}'] = (images * getattr(per_image, kind)[part] + batch * getattr(per_row, kind)[part])
  for kind in ('fwd', 'bwd', 'remat'):
    out[kind] = sum(out[f'{part}_{kind}'] for part in PARTS)
  out['total'] = out['fwd'] + out['bwd'] + out['remat']
  out.update(tokens=batch * length, images=images, batch_size=batch, seq_len=length,
             flops_per_token=out['total'] / (batch * length))
  return out


def _unit(value: float) -> tuple[str, float]:
  for name, scale in (('PFLOP', 1e15), ('TFLOP', 1e12), ('GFLOP', 1e9), ('MFLOP', 1e6)):
    if value >= scale:
      return name, scale
  return 'FLOP', 1.0


def format_flops_summary(cfg, counts: dict[str, Any] | None = None, **kwargs) -> str:
  """A few lines for the start-up log: FLOPs per step by part (forward / backward / recompute), tokens per step,
  FLOPs per token. counts: a step_flops result (else step_flops(cfg, **kwargs) is computed)."""
  f = step_flops(cfg, **kwargs) if counts is None else counts
  name, scale = _unit(f['total'])
  lines = [f'Matmul FLOPs per step: {f["total"] / scale:.4g} {name} (batch {f["batch_size"]}, {f["seq_len"]} '
           f'tokens/row, {f["tokens"]:,} tokens, {f["images"]:,} images) = {f["flops_per_token"] / 1e9:.4g} '
           'GFLOP/token']
  lines.append(f'  {"part":<10}{"forward":>12}{"backward":>12}{"recompute":>12}   ({name})')
  for part in PARTS + ('total',):
    keys = ('fwd', 'bwd', 'remat') if part == 'total' else (f'{part}_fwd', f'{part}_bwd', f'{part}_remat')
    lines.append(f'  {part:<10}' + ''.join(f'{f[k] / scale:>12.4g}' for k in keys))
  return '\n'.join(lines)


def measure_matmul_peak(dtype: str = 'float32', size: int = 1024, seconds: float = 0.5,
                        device: Any = None) -> float:
  """FLOP/s of a jitted size x size matmul in `dtype` on `device` (default: the first device): one warm-up call
  (compile), then timed calls until `seconds` have passed (at least 3); the best call counts, 2 * size^3 / time.
  The achievable matmul rate of a host without a published peak (CPU), so MFU there reads against it."""
  if dtype not in DTYPES:
    raise ValueError(f'dtype={dtype!r} (model.dtype) is not one of {DTYPES}')
  device = device or jax.devices()[0]
  a = jax.device_put(jnp.ones((size, size), dtype), device)
  b = jax.device_put(jnp.full((size, size), 0.5, dtype), device)
  matmul = jax.jit(lambda a, b: a @ b)
  jax.block_until_ready(matmul(a, b))
  best, calls, start = math.inf, 0, time.perf_counter()
  while calls < 3 or time.perf_counter() - start < seconds:
    t0 = time.perf_counter()
    jax.block_until_ready(matmul(a, b))
    best = min(best, time.perf_counter() - t0)
    calls += 1
  return 2 * size ** 3 / best


def _lookup(kind: str, table: dict, by_substring: tuple) -> float | None:
  if kind in table:
    return table[kind]
  return next((peak for sub, peak in by_substring if sub in kind), None)


_MEASURED: dict[tuple[str, str, str], float] = {}


def _measured(device: Any, dtype: str) -> float:
  key = (device.platform, device.device_kind, dtype)
  if key not in _MEASURED:
    _MEASURED[key] = measure_matmul_peak(dtype, device=device)
  return _MEASURED[key]


def device_peak_flops(device: Any = None, dtype: str = 'bfloat16') -> tuple[float, str]:
  """(peak FLOP/s of one device, where the number comes from) for matmuls in `dtype` (model.dtype).

  Known accelerators (by `device.device_kind`): the dense bf16 peak of PEAK_FLOPS; for dtype 'float32' the dense
  TF32 peak of PEAK_FLOPS_F32 on NVIDIA GPUs (XLA's default f32 dot precision), else the bf16 peak (TPUs run f32
  dots as bf16 passes; an f32 MFU on an unlisted kind reads against the bf16 peak, and says so). CPU and unknown
  kinds: measure_matmul_peak(dtype) on that device, measured once per process.
  """
  if dtype not in DTYPES:
    raise ValueError(f'dtype={dtype!r} (model.dtype) is not one of {DTYPES}')
  device = device or jax.devices()[0]
  kind = device.device_kind
  bf16 = _lookup(kind, PEAK_FLOPS, _PEAK_BY_SUBSTRING) if device.platform != 'cpu' else None
  if bf16 is None:
    peak = _measured(device, dtype)
    return peak, f'measured {dtype} matmul on {kind!r}: {peak / 1e9:.1f} GFLOP/s'
  if dtype == 'float32':
    f32 = _lookup(kind, PEAK_FLOPS_F32, _PEAK_F32_BY_SUBSTRING)
    if f32 is not None:
      return f32, f'{kind}: dense TF32 peak {f32 / 1e12:.0f} TFLOP/s (f32 dots run as TF32)'
    return bf16, f'{kind}: dense bf16 peak {bf16 / 1e12:.0f} TFLOP/s (no f32 peak known; f32 MFU reads against it)'
  return bf16, f'{kind}: dense bf16 peak {bf16 / 1e12:.0f} TFLOP/s'


def mfu(step_flops_total: float, steps_per_sec: float, num_devices: int, peak_per_device: float) -> float:
  """Model FLOPs utilisation: step_flops_total * steps_per_sec / (num_devices * peak_per_device)."""
  if num_devices <= 0 or not peak_per_device > 0:
    raise ValueError(f'mfu needs num_devices > 0 and peak_per_device > 0, got {num_devices}, {peak_per_device}')
  return float(step_flops_total) * float(steps_per_sec) / (num_devices * float(peak_per_device))


__all__ = ['PEAK_FLOPS', 'PEAK_FLOPS_F32', 'PARTS', 'device_peak_flops', 'format_flops_summary',
           'jaxpr_matmul_flops', 'measure_matmul_peak', 'mfu', 'step_flops']
