"""Analytic step FLOPs (mmproj/train/flops.py): hand counts on a tiny model, the traced gradient program, XLA's
cost analysis, LLaVA-1.5-7B's FLOP/token, device peaks and MFU."""
from __future__ import annotations

import dataclasses
import math
import time
import types

import jax
import jax.numpy as jnp
import pytest

from conftest import make_tiny_model_cfg
from experiment_utils import load_config
from mmproj import model as model_lib
from mmproj.encoders.vit import ViT
from mmproj.lm import build_lm
from mmproj.lm.llama import Llama
from mmproj.train import flops, trainer
from mmproj.train import optimizer as opt_lib

B = 2          # rows per step
TEXT_LEN = 8   # text tokens per row


def tiny_cfg(trainable=('.*',), frozen=(), use_image=True):
  """The smoke quickstart with conftest's tiny model: 16 px images, 4 px patches -> N = 16 patch tokens (no CLS);
  ViT width 32, 2 blocks, 2 heads, MLP 64; 'mlp' projector, depth 2 (32 -> 32 -> 32); LM width 32, 2 blocks,
  4 heads of 8, 2 kv heads, SwiGLU 64, vocab 32, untied head. L = 16 image tokens + 8 text tokens = 24."""
  cfg = load_config('configs/quickstart.py', 'smoke')
  cfg.model = make_tiny_model_cfg()
  cfg.model.use_image = use_image
  cfg.data.update(image_size=16, text_len=TEXT_LEN)
  cfg.train.update(batch_size=B, trainable=list(trainable), frozen=list(frozen))
  return cfg


# ------------------------------------------------------------------ hand counts (2 FLOPs per multiply-add)
# Encoder, per image: N = 16 patches of 4*4*3 = 48 values, width 32, MLP 64, 2 blocks, no CLS (S = N = 16).
ENC_PATCH = 2 * 16 * 48 * 32                              # patch embedding
ENC_BLOCK_W = 4 * (2 * 16 * 32 * 32) + 2 * (2 * 16 * 32 * 64)   # q, k, v, o + fc1, fc2
ENC_BLOCK_A = 2 * (2 * 16 * 16 * 32)                      # scores q k^T + weighted sum p v (2 heads of 16)
# Projector, per image: two 32 x 32 linears on 16 tokens.
PROJ_LAYER = 2 * 16 * 32 * 32
# LM, per row: L = 24, width 32, q 4 heads x 8, k/v 2 heads x 8, SwiGLU 64, vocab 32, 2 blocks.
LM_BLOCK_W = (2 * 24 * 32 * 32          # q_proj  [32 -> 4 x 8]
              + 2 * (2 * 24 * 32 * 16)  # k_proj, v_proj  [32 -> 2 x 8]
              + 2 * 24 * 32 * 32        # o_proj  [4 x 8 -> 32]
              + 3 * (2 * 24 * 32 * 64))  # gate, up, down
LM_BLOCK_A = 2 * (2 * 24 * 24 * 32)     # scores + weighted sum over the full 24 x 24 matrix, 4 heads of 8
LM_HEAD = 2 * 8 * 32 * 32               # at the K = L - 16 = 8 text positions only (trainer.loss_positions)

ENC_FWD = ENC_PATCH + 2 * (ENC_BLOCK_W + ENC_BLOCK_A)
PROJ_FWD = 2 * PROJ_LAYER
LM_FWD = 2 * (LM_BLOCK_W + LM_BLOCK_A) + LM_HEAD


def test_hand_count_constants():
  # The same numbers written out, so a reader can check the arithmetic above.
  assert (ENC_PATCH, ENC_BLOCK_W, ENC_BLOCK_A) == (49_152, 262_144, 32_768)
  assert (ENC_FWD, PROJ_FWD) == (638_976, 65_536)
  assert (LM_BLOCK_W, LM_BLOCK_A, LM_HEAD, LM_FWD) == (442_368, 73_728, 16_384, 1_048_576)


def _parts(f):
  return {k: f[k] for k in ('encoder_fwd', 'encoder_bwd', 'projector_fwd', 'projector_bwd', 'lm_fwd', 'lm_bwd')}


def test_everything_trains():
  f = flops.step_flops(tiny_cfg())
  assert _parts(f) == {
      'encoder_fwd': B * ENC_FWD,
      # The image needs no gradient: the patch embedding gets dW only; every block dX + dW (2x).
      'encoder_bwd': B * (ENC_PATCH + 2 * 2 * (ENC_BLOCK_W + ENC_BLOCK_A)),
      'projector_fwd': B * PROJ_FWD,
      'projector_bwd': B * 2 * PROJ_FWD,
      'lm_fwd': B * LM_FWD,
      'lm_bwd': B * 2 * LM_FWD,
  }
  assert f['total'] == B * 3 * (ENC_FWD + PROJ_FWD + LM_FWD) - B * ENC_PATCH == 10_420_224
  assert (f['tokens'], f['images'], f['seq_len'], f['remat']) == (B * 24, B, 24, 0)
  assert f['flops_per_token'] == f['total'] / (B * 24)


def test_frozen_encoder():
  f = flops.step_flops(tiny_cfg(frozen=['encoder/.*']))
  assert _parts(f) == {
      'encoder_fwd': B * ENC_FWD,
      'encoder_bwd': 0,                                        # stop_gradient: no backward at all
      'projector_fwd': B * PROJ_FWD,
      'projector_bwd': B * (PROJ_LAYER + 2 * PROJ_LAYER),      # linear_1: dW only (its input needs none); linear_2
      'lm_fwd': B * LM_FWD,
      'lm_bwd': B * 2 * LM_FWD,
  }
  assert f['total'] == 7_897_088


def test_llava_stage1_only_projector_trains():
  f = flops.step_flops(tiny_cfg(trainable=['projector/.*']))
  assert _parts(f) == {
      'encoder_fwd': B * ENC_FWD,
      'encoder_bwd': 0,
      'projector_fwd': B * PROJ_FWD,
      'projector_bwd': B * (PROJ_LAYER + 2 * PROJ_LAYER),
      'lm_fwd': B * LM_FWD,
      # Frozen LM: input grads only (1x) for the weight matmuls, but both operands of the attention products
      # need their gradient (dq and dk, dp and dv): 2x there. The head's dX too (dW: frozen).
      'lm_bwd': B * (2 * (LM_BLOCK_W + 2 * LM_BLOCK_A) + LM_HEAD),
  }
  assert f['total'] == 6_094_848


def test_blind_baseline_is_lm_only():
  f = flops.step_flops(tiny_cfg(use_image=False))
  # L = 8 text tokens: q 2*8*32*32, k/v 2*(2*8*32*16), o 2*8*32*32, SwiGLU 3*(2*8*32*64); attention 2*(2*8*8*32).
  block = 2 * 8 * 32 * 32 + 2 * (2 * 8 * 32 * 16) + 2 * 8 * 32 * 32 + 3 * (2 * 8 * 32 * 64) + 2 * (2 * 8 * 8 * 32)
  lm_fwd = 2 * block + 2 * 8 * 32 * 32
  assert lm_fwd == 327_680
  assert _parts(f) == {'encoder_fwd': 0, 'encoder_bwd': 0, 'projector_fwd': 0, 'projector_bwd': 0,
                       'lm_fwd': B * lm_fwd, 'lm_bwd': B * 2 * lm_fwd}     # trainable embeddings: dX everywhere
  assert (f['tokens'], f['images'], f['seq_len']) == (B * 8, 0, 8)


LM_DOWN = 2 * 24 * 64 * 32     # down_proj, the last matmul of an LM block
ENC_FC2 = 2 * 16 * 64 * 32     # fc2, the last matmul of a ViT block


def test_remat_recomputes_what_the_backward_needs():
  cfg = tiny_cfg(frozen=['encoder/.*'])
  expected = {
      'none': 0,
      'dots': 0,                                               # every matmul output is kept
      'minimal': B * 2 * LM_BLOCK_A,                           # scores (q, k, v need grads) + weighted sum (o trains)
      'full': B * 2 * (LM_BLOCK_W + LM_BLOCK_A - LM_DOWN),     # all but down_proj, read only by the residual add
  }
  for policy, lm_remat in expected.items():
    cfg.model.remat = policy
    f = flops.step_flops(cfg)
    # The frozen encoder runs no backward, so nothing of it is recomputed; nor is the LM head (not in a block).
    assert (f['encoder_remat'], f['projector_remat'], f['lm_remat']) == (0, 0, lm_remat), policy
    assert f['total'] == 7_897_088 + lm_remat
  cfg = tiny_cfg(trainable=['projector/.*'])
  cfg.model.remat = 'minimal'
  assert flops.step_flops(cfg)['lm_remat'] == B * 2 * LM_BLOCK_A // 2   # frozen o_proj: no dW_o, scores only
  cfg = tiny_cfg()
  cfg.model.remat = 'full'
  assert flops.step_flops(cfg)['encoder_remat'] == B * 2 * (ENC_BLOCK_W + ENC_BLOCK_A - ENC_FC2)
  cfg.model.remat = 'some'
  with pytest.raises(ValueError, match='model.remat'):
    flops.step_flops(cfg)


def test_batch_size_override_and_errors():
  cfg = tiny_cfg()
  assert flops.step_flops(cfg, batch_size=6)['total'] == 3 * flops.step_flops(cfg)['total']
  with pytest.raises(ValueError, match='train.batch_size'):
    flops.step_flops(cfg, batch_size=0)
  with pytest.raises(ValueError, match='model.projector.name'):
    flops.step_flops(cfg, images_per_row=2)


# ------------------------------------------------------------------ against the traced gradient program


def _traced_step_flops(cfg, images_per_row=1, all_param_grads=False):
  """Matmul FLOPs in the jaxpr of the loss and its gradient w.r.t. the trainable params (or all of them), with
  the model wired as the trainer wires it (stop_gradient after a wholly frozen encoder)."""
  params = flops._abstract_params(cfg)
  labels = opt_lib.trainable_labels(params, cfg.train)
  model = model_lib.build_model(cfg.model, encoder_trainable=not opt_lib.is_frozen(labels, 'encoder'))
  batch = trainer.dummy_batch(cfg, B)
  if images_per_row > 1:
    batch['image'] = jax.ShapeDtypeStruct((B, images_per_row) + batch['image'].shape[1:], jnp.uint8)
  batch['loss_mask'] = jax.ShapeDtypeStruct(batch['tokens'].shape, jnp.float32)
  leaves, treedef = jax.tree_util.tree_flatten(params)
  diff = [i for i, lab in enumerate(jax.tree.leaves(labels)) if lab == 'train' or all_param_grads]

  def loss_and_grads(leaves, batch):
    def loss(trained):
      merged = list(leaves)
      for i, leaf in zip(diff, trained):
        merged[i] = leaf
      inputs = {k: batch[k] for k in ('image', 'tokens', 'positions', 'input_mask')}
      variables = {'params': jax.tree_util.tree_unflatten(treedef, merged)}
      hidden = model.apply(variables, inputs, deterministic=False, return_hidden=True,
                           rngs={'dropout': jax.random.key(0)})
      # The trainer projects the first K = trainer.loss_positions gathered loss positions (a gather: no matmul).
      k = trainer.loss_positions(cfg) or hidden.shape[1]
      nll, _, count = trainer.token_loss_sums(lambda h: model.apply(variables, h, method='head'), hidden[:, :k],
                                              batch['tokens'][:, :k], batch['loss_mask'][:, :k], None)
      return nll / count
    return jax.value_and_grad(loss)([leaves[i] for i in diff])

  return flops.jaxpr_matmul_flops(loss_and_grads, leaves, batch)


# Blind LM whose block 0 has nothing trainable before its q/k/v (embeddings and input norms frozen).
FROZEN_INPUT = ['lm/embed_tokens/.*', r'lm/layers(_\d+)?/input_layernorm/.*']
TRACED_CASES = {
    'all': (['.*'], []),
    'frozen_encoder': (['.*'], ['encoder/.*']),
    'stage1': (['projector/.*'], []),
    'top_encoder_block_only': (['encoder/layers_1/.*'], []),
    'top_lm_block_only': (['lm/layers_1/.*'], []),
    'frozen_embeddings': (['.*'], ['lm/embed_tokens/.*']),
}


@pytest.mark.parametrize('case', sorted(TRACED_CASES))
def test_analytic_count_equals_the_traced_gradient_program(case):
  cfg = tiny_cfg(*TRACED_CASES[case])
  assert flops.step_flops(cfg)['total'] == _traced_step_flops(cfg)
  assert flops.step_flops(cfg, all_param_grads=True)['total'] == _traced_step_flops(cfg, all_param_grads=True)


def test_traced_check_block_causal_lm_attention():
  """L = 16 + 340 = 356 >= 352: the LM's causal attention runs in 2 query blocks (causal_query_blocks); the
  analytic count of those blocks equals the traced program's and a count by hand."""
  from mmproj.layers import causal_query_blocks
  cfg = tiny_cfg()
  cfg.data.text_len = 340
  cfg.model.lm.max_len = 512
  assert causal_query_blocks(356) == [(0, 178), (178, 356)]
  counted = flops.step_flops(cfg)
  assert counted['total'] == _traced_step_flops(cfg)
  # LM forward per row by hand: the blocks score 178 * 178 + 178 * 356 = 95_052 pairs (3/4 of 356^2) per head.
  weights = 2 * 356 * 32 * 32 + 2 * (2 * 356 * 32 * 16) + 2 * 356 * 32 * 32 + 3 * (2 * 356 * 32 * 64)
  attention = 2 * (2 * 95_052 * 4 * 8)                       # scores + weighted sum, 4 heads of 8
  head = 2 * 340 * 32 * 32                                   # the 340 text positions
  assert counted['lm_fwd'] == B * (2 * (weights + attention) + head)


def test_traced_check_blind_cls_tied_and_truncated_tower():
  cfg = tiny_cfg(use_image=False, frozen=FROZEN_INPUT)   # block 0's q/k/v need no input grads
  assert flops.step_flops(cfg)['total'] == _traced_step_flops(cfg) == 1_900_544
  cfg = tiny_cfg()
  cfg.model.lm.tie_embeddings = True
  cfg.model.encoder.update(depth=3, output_layer=-2, cls_token=True, pre_norm=True)
  assert flops.step_flops(cfg)['total'] == _traced_step_flops(cfg)


def _has_field(module_cls, name):
  return name in {f.name for f in dataclasses.fields(module_cls)}


@pytest.mark.parametrize('policy', ['full', 'minimal', 'dots'])
@pytest.mark.parametrize('case', ['all', 'stage1', 'top_lm_block_only'])
def test_traced_check_remat(policy, case):
  if not (_has_field(Llama, 'remat') and _has_field(ViT, 'remat')):
    pytest.skip('the ViT / Llama in this tree have no remat field')
  cfg = tiny_cfg(*TRACED_CASES[case])
  cfg.model.lm.remat = policy            # the module fields themselves, so the traced model rematerialises
  cfg.model.encoder.remat = policy
  assert flops.step_flops(cfg)['remat'] > 0 or policy == 'dots'
  assert flops.step_flops(cfg)['total'] == _traced_step_flops(cfg)


@pytest.mark.parametrize('case', ['all', 'stage1', 'blind_frozen_input'])
def test_traced_check_scanned_layers(case):
  if not (_has_field(Llama, 'scan_layers') and _has_field(ViT, 'scan_layers')):
    pytest.skip('the ViT / Llama in this tree have no scan_layers field')
  if case == 'blind_frozen_input':
    cfg = tiny_cfg(use_image=False, frozen=FROZEN_INPUT)
  else:
    cfg = tiny_cfg(*TRACED_CASES[case])
  cfg.model.lm.scan_layers = True
  cfg.model.encoder.scan_layers = True
  cfg.model.lm.remat = 'minimal'
  assert flops.step_flops(cfg)['total'] == _traced_step_flops(cfg)
  if case == 'blind_frozen_input':   # the scan's transpose computes block 0's input grads as well: 2 * q, k, v
    cfg.model.lm.remat = 'none'
    assert flops.step_flops(cfg)['total'] == 1_900_544 + B * (2 * 8 * 32 * 32 + 2 * (2 * 8 * 32 * 16))


@pytest.mark.parametrize('frozen', [[], ['encoder/.*', 'lm/(?!xattn_layers_).*']])
def test_traced_check_gated_xattn_several_images(frozen):
  cfg = load_config('configs/proj_gated_xattn.py', 'smoke')
  cfg.data.text_len = TEXT_LEN
  cfg.model.lm.depth = 4
  cfg.model.projector.update(every=2, kv_heads=2)
  cfg.train.update(batch_size=B, frozen=frozen)
  for images in (1, 2):
    assert flops.step_flops(cfg, images_per_row=images)['total'] == _traced_step_flops(cfg, images)


@pytest.mark.parametrize('config', ['proj_ldp', 'proj_qformer', 'proj_c_abstractor'])
def test_traced_check_conv_and_attention_projectors(config):
  cfg = load_config(f'configs/{config}.py', 'smoke')
  cfg.data.text_len = TEXT_LEN
  cfg.train.update(batch_size=B, frozen=['encoder/.*'])
  assert flops.step_flops(cfg)['total'] == _traced_step_flops(cfg)


# ------------------------------------------------------------------ against XLA


def test_lm_forward_against_xla_cost_analysis():
  """XLA's CPU cost analysis counts dots as 2 * M * N * K, plus the elementwise work (norms, softmax, RoPE,
  SiLU, masking) that the analytic count leaves out: here (width 128, SwiGLU 512, vocab 512, L = 32) that adds
  about 1%, so XLA must lie in [analytic, 1.02 * analytic]."""
  cfg = tiny_cfg(use_image=False)
  cfg.data.text_len = 32
  cfg.model.lm.update(width=128, mlp_dim=512, vocab_size=512)
  lm = build_lm(cfg.model.lm)
  x = jax.ShapeDtypeStruct((B, 32, 128), jnp.float32)
  pos = jax.ShapeDtypeStruct((B, 32), jnp.int32)
  params = jax.eval_shape(lambda x, p: lm.init(jax.random.key(0), x, p, p), x, pos)['params']

  def forward(params, x, pos):
    return lm.apply({'params': params}, x, pos, jnp.ones_like(pos))[0]

  analytic = flops.step_flops(cfg)['lm_fwd']
  assert flops.jaxpr_matmul_flops(forward, params, x, pos) == analytic
  cost = jax.jit(forward).lower(params, x, pos).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  assert analytic <= cost['flops'] <= 1.02 * analytic


def test_jaxpr_counter_matches_xla_on_dots_and_convolutions():
  def conv(x, w, stride, padding, groups):
    return jax.lax.conv_general_dilated(x, w, stride, padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                        feature_group_count=groups)

  x = jax.ShapeDtypeStruct((2, 6, 6, 8), jnp.float32)
  for stride, padding, groups, w_shape in (((1, 1), 'SAME', 1, (3, 3, 8, 16)), ((2, 2), 'SAME', 8, (3, 3, 1, 8)),
                                           ((2, 2), 'VALID', 2, (2, 2, 4, 6))):
    w = jax.ShapeDtypeStruct(w_shape, jnp.float32)
    fn = lambda x, w: conv(x, w, stride, padding, groups)  # noqa: E731
    assert flops.jaxpr_matmul_flops(fn, x, w) == jax.jit(fn).lower(x, w).compile().cost_analysis()['flops']
  # 3x3 SAME on 6x6: per spatial dimension 6 * 3 - 2 = 16 (output, tap) pairs read real input (not padding).
  w = jax.ShapeDtypeStruct((3, 3, 8, 16), jnp.float32)
  assert flops.jaxpr_matmul_flops(lambda x, w: conv(x, w, (1, 1), 'SAME', 1), x, w) == 2 * 2 * 16 * 8 * 16 * 16
  # GQA scores einsum: 2 * B * T * S * Hkv * G * Dh; a scan body counts `length` times.
  q, k = jax.ShapeDtypeStruct((2, 5, 2, 3, 4), jnp.float32), jax.ShapeDtypeStruct((2, 7, 2, 4), jnp.float32)
  assert flops.jaxpr_matmul_flops(lambda q, k: jnp.einsum('btkgd,bskd->bkgts', q, k), q, k) == 2 * 2 * 5 * 7 * 2 * 3 * 4
  h, m = jax.ShapeDtypeStruct((4, 8), jnp.float32), jax.ShapeDtypeStruct((8, 8), jnp.float32)
  scan = lambda h, m: jax.lax.scan(lambda c, _: (c @ m, None), h, None, length=5)[0]  # noqa: E731
  assert flops.jaxpr_matmul_flops(scan, h, m) == 5 * 2 * 4 * 8 * 8


# ------------------------------------------------------------------ LLaVA-1.5-7B


def test_llava15_7b_stage1_flops_per_token():
  """configs/llava15_stage1.py with no HF directories: CLIP ViT-L/14-336 (penultimate layer) + 2-layer MLP +
  Vicuna-7B (vocab 32064), L = 576 + 1472 = 2048, batch 256; only the projector trains.

  LM per token, forward: 2 * 32 * (4 * 4096^2 + 3 * 4096 * 11008) (= 2 * 6.476e9 block matmul params)
  + the vocabulary projection 2 * 4096 * 32064 at the 1472 text positions only (trainer.loss_positions), i.e.
  * 1472 / 2048 per token + attention 32 * 2 * (2 * 2048 * 4096) * 36 / 64 (scores + weighted sum; block-causal:
  8 query blocks of 256, block i scoring 256 * i keys, 36 / 64 of the 2048^2 pairs) = 13.74e9.
  Backward of the frozen LM: input grads, 1x the weight matmuls (head included) + 2x attention.
  CLIP forward per image: S = 577 tokens (CLS), 23 blocks: 2 * 576 * 588 * 1024 + 23 * (8 * 577 * 1024^2 +
  4 * 577^2 * 1024 + 4 * 577 * 1024 * 4096) = 366.0e9, i.e. 0.179e9 per token (one image per 2048 tokens).
  Projector per image: forward 2 * 576 * (1024 * 4096 + 4096^2) = 24.2e9, backward dW of both layers + dX of
  the second = 43.5e9; 0.033e9 per token. Total: 28.31e9 FLOP/token, close to the rule of thumb
  2 * 6.74e9 LM params * (1 forward + 1 input-grad backward) = 27.0e9 plus attention and CLIP.
  """
  from mmproj.layers import causal_query_blocks
  assert causal_query_blocks(2048) == [(256 * i, 256 * (i + 1)) for i in range(8)]
  cfg = load_config('configs/llava15_stage1.py', 'vision=/nonexistent,lm=/nonexistent,tokenizer=/nonexistent')
  f = flops.step_flops(cfg)
  blocks = 32 * (4 * 4096 ** 2 + 3 * 4096 * 11008)
  head = 4096 * 32064 * 1472 / 2048
  attention = 32 * 2 * (2 * 2048 * 4096) * 36 / 64
  lm = 2 * (blocks + head) + attention + 2 * (blocks + head) + 2 * attention
  clip = 2 * 576 * 588 * 1024 + 23 * (8 * 577 * 1024 ** 2 + 4 * 577 ** 2 * 1024 + 4 * 577 * 1024 * 4096)
  projector = 2 * 576 * (1024 * 4096 + 4096 ** 2) + (2 * 576 * 1024 * 4096 + 2 * 2 * 576 * 4096 ** 2)
  expected = lm + (clip + projector) / 2048
  assert f['seq_len'] == 2048 and f['tokens'] == 256 * 2048
  assert f['flops_per_token'] == pytest.approx(expected, rel=1e-12)
  assert 28.3e9 < f['flops_per_token'] < 28.4e9
  assert f['lm_fwd'] / f['tokens'] == pytest.approx(13.74e9, rel=1e-3)
  assert f['encoder_bwd'] == 0
  text = flops.format_flops_summary(cfg, f)
  assert '28.31 GFLOP/token' in text and '14.84 PFLOP' in text
  for part in ('encoder', 'projector', 'lm', 'total'):
    assert f'\n  {part} ' in text


# ------------------------------------------------------------------ peaks and MFU


@pytest.mark.parametrize('kind,dtype,peak', [
    ('NVIDIA H100 80GB HBM3', 'bfloat16', 989e12),
    ('NVIDIA H100 PCIe', 'bfloat16', 756e12),
    ('NVIDIA H200', 'bfloat16', 989e12),
    ('NVIDIA A100-SXM4-40GB', 'bfloat16', 312e12),
    ('NVIDIA A100-SXM4-80GB', 'bfloat16', 312e12),
    ('TPU v4', 'bfloat16', 275e12),
    ('TPU v5 lite', 'bfloat16', 197e12),
    ('TPU v5', 'bfloat16', 459e12),
    ('TPU v5p', 'bfloat16', 459e12),
    ('TPU v6 lite', 'bfloat16', 918e12),
    ('NVIDIA H100 80GB HBM3', 'float32', 494.7e12),   # TF32 dense
    ('TPU v4', 'float32', 275e12),                    # f32 dots run as bf16 passes
])
def test_device_peak_table(kind, dtype, peak):
  device = types.SimpleNamespace(device_kind=kind, platform='tpu' if kind.startswith('TPU') else 'gpu')
  value, source = flops.device_peak_flops(device, dtype)
  assert value == peak
  assert kind in source


def test_unknown_kind_and_cpu_are_measured():
  value, source = flops.device_peak_flops(jax.devices('cpu')[0], 'float32')
  assert math.isfinite(value) and value > 0 and 'measured' in source
  with pytest.raises(ValueError, match='model.dtype'):
    flops.device_peak_flops(dtype='float16')


def test_measure_matmul_peak_is_quick_and_positive():
  start = time.perf_counter()
  value = flops.measure_matmul_peak('float32', size=256, seconds=0.2)
  assert time.perf_counter() - start < 3
  assert math.isfinite(value) and value > 0


def test_mfu():
  assert flops.mfu(1e12, 2.0, 4, 1e12) == 0.5
  with pytest.raises(ValueError, match='peak_per_device'):
    flops.mfu(1e12, 2.0, 4, 0.0)


def test_summary_names_every_part():
  text = flops.format_flops_summary(tiny_cfg(trainable=['projector/.*']))
  assert text.splitlines()[0].startswith('Matmul FLOPs per step: 6.095 MFLOP (batch 2, 24 tokens/row, 48 tokens')
  assert len(text.splitlines()) == 6
