"""Step FLOPs (mmproj/train/flops.py): equal to the traced gradient program and to XLA's cost analysis of the
compiled step, on configs with frozen towers, remat, scanned layers, compressing projectors and gated
cross-attention; LLaVA-1.5-7B's FLOP/token by hand; device peaks."""
from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import pytest

from experiment_utils import load_config
from mmproj import model as model_lib
from mmproj.train import flops, state as state_lib, trainer
from mmproj.train.loss import make_loss_sums

B = 4


def base_cfg(width: int = 64, **train):
  """The smoke quickstart at `width` (both towers 2 blocks, MLP 4x), 48 px images in 8 px patches (N = 36), 64
  text tokens: L = 100 with a merging projector. The loss projects every position (train.loss_positions='all')
  unless a test says otherwise: see test_loss_positions_count_the_gathered_branch."""
  cfg = load_config('configs/quickstart.py', 'smoke')
  heads = max(2, width // 128)
  cfg.model.encoder.update(width=width, depth=2, num_heads=heads, mlp_dim=4 * width, patch_size=8)
  cfg.model.lm.update(width=width, depth=2, num_heads=heads, num_kv_heads=heads // 2 or 1, mlp_dim=4 * width,
                      vocab_size=512)
  cfg.train.update(batch_size=B, loss_positions='all', **train)
  return cfg


def with_changes(cfg, **changes):
  """cfg with dotted-path fields set, e.g. with_changes(cfg, **{'model.remat': 'full'})."""
  cfg = cfg.copy_and_resolve_references()
  for path, value in changes.items():
    *parents, leaf = path.split('.')
    node = cfg
    for p in parents:
      node = node[p]
    node[leaf] = value
  return cfg


FROZEN_TOWERS = {'train.trainable': ['projector/.*']}                      # LLaVA stage 1
GATED = {'model.projector': dict(name='gated_xattn', every=2, heads=2)}
CASES = {
    'all': {},
    'stage1': FROZEN_TOWERS,
    'stage2': {'train.trainable': ['projector/.*', 'lm/.*']},
    'remat_full': {'model.remat': 'full'},
    'remat_minimal': {'model.remat': 'minimal'},
    'remat_dots': {'model.remat': 'dots'},
    'stage1_remat_full': {**FROZEN_TOWERS, 'model.remat': 'full'},
    'stage1_remat_minimal': {**FROZEN_TOWERS, 'model.remat': 'minimal'},
    'scan': {'model.lm.scan_layers': True, 'model.encoder.scan_layers': True},
    'scan_stage1_remat_full': {**FROZEN_TOWERS, 'model.lm.scan_layers': True, 'model.encoder.scan_layers': True,
                               'model.remat': 'full'},
    'pixel_shuffle': {'model.projector': dict(name='pixel_shuffle', scale_factor=2)},
    'c_abstractor': {'model.projector': dict(name='c_abstractor', num_queries=9, depth=1)},
    'perceiver': {'model.projector': dict(name='perceiver', num_latents=8, depth=1, num_heads=2, head_dim=16)},
    'gated_xattn': GATED,
    'gated_xattn_frozen_lm': {**GATED, 'train.frozen': ['encoder/.*', 'lm/(?!xattn_layers_).*']},
    'blind_query_blocks': {'model.use_image': False, 'data.text_len': 400, 'model.lm.max_len': 400,
                           'model.kernels.attention': 'query_blocks'},
}


def _abstract_batch(s) -> dict:
  b = int(s.cfg.train.batch_size)
  batch = {**state_lib.dummy_batch(s.cfg, b), 'targets': jax.ShapeDtypeStruct((b, s.seq_len), jnp.int32),
           'loss_mask': jax.ShapeDtypeStruct((b, s.seq_len), jnp.float32)}
  if s.cfg.train.get('output_loss'):        # the draw task's rows: the caption for the generator, the picture
    gen = model_lib.output_modules(s.cfg.model)[1]
    batch.update(gen_text=jax.ShapeDtypeStruct((b, gen.text_len), jnp.int32),
                 gen_image=jax.ShapeDtypeStruct((b, gen.image_size, gen.image_size, 3), jnp.uint8))
  return batch


def traced_step_flops(cfg) -> int:
  """Matmul FLOPs in the jaxpr of the trainer's loss and its gradient with respect to the trained params only
  (what a step must run; the trainer differentiates every param and leaves XLA to drop the frozen ones' weight
  gradients)."""
  s = state_lib.setup(cfg, jax.devices()[:1])
  loss_sums = make_loss_sums(s)
  leaves, treedef = jax.tree.flatten(s.abstract_state.params)
  trained = [i for i, label in enumerate(jax.tree.leaves(s.labels)) if label == 'train']
  batch = _abstract_batch(s)

  def loss(trained_leaves, leaves, batch):
    merged = list(leaves)
    for i, leaf in zip(trained, trained_leaves):
      merged[i] = leaf
    sums = loss_sums(jax.tree.unflatten(treedef, merged), batch, jax.random.key(0))
    return sums['nll'] + sums.get('output', 0.0)

  return flops.jaxpr_matmul_flops(jax.value_and_grad(loss), [leaves[i] for i in trained], leaves, batch)


def step_flops(cfg) -> dict:
  return flops.step_flops(cfg, labels=state_lib.setup(cfg, jax.devices()[:1]).labels)


@pytest.mark.parametrize('case', sorted(CASES))
def test_count_equals_the_traced_gradient_program(case):
  cfg = with_changes(base_cfg(), **CASES[case])
  assert step_flops(cfg)['total'] == traced_step_flops(cfg)


@pytest.mark.parametrize('arg', ['mlp,align,smoke', 'transformer,generate,smoke', 'mlp,generate,train_lm,smoke'])
def test_output_side_counts_equal_the_traced_gradient_program(arg):
  """configs/draw.py: the signal tokens' rows and the output term (align: the generator's text encoder forward only;
  generate: through the frozen generator to the output projector, and into the LM when its input rows train)."""
  cfg = load_config('configs/draw.py', arg)
  ours = step_flops(cfg)
  assert ours['total'] == traced_step_flops(cfg)
  assert ours['output_fwd'] > 0 and ours['output_bwd'] > 0
  if 'generate' in arg:                  # the generator's backward to the conditioning outweighs the LM's own
    assert ours['output_bwd'] > ours['lm_bwd']
  assert 'output' in flops.format_flops_summary(ours)
  assert '  output' not in flops.format_flops_summary(step_flops(base_cfg()))


def test_loss_positions_count_the_gathered_branch():
  """train.loss_positions='auto' projects the K = text_len loss positions (the common branch of the loss's
  lax.cond); the traced program's larger branch projects all L: the two differ by the head at L - K positions,
  forward, input and weight gradient (an untied, trained head)."""
  cfg = base_cfg()
  auto = with_changes(cfg, **{'train.loss_positions': 'auto'})
  length, k = state_lib.sequence_length(cfg), state_lib.loss_positions(auto)
  assert k == int(cfg.data.text_len)
  head = 2 * B * cfg.model.lm.width * cfg.model.lm.vocab_size
  assert step_flops(auto)['total'] == step_flops(cfg)['total'] - 3 * head * (length - k)


def test_a_scanned_stack_counts_as_unscanned():
  cfg = base_cfg()
  scan = with_changes(cfg, **CASES['scan'])
  assert step_flops(scan)['total'] == step_flops(cfg)['total']


def xla_step_flops(cfg) -> float:
  """FLOPs of the trainer's compiled step by XLA's cost analysis (on one device)."""
  s = state_lib.setup(cfg, jax.devices()[:1])
  batch = _abstract_batch(s)
  with jax.set_mesh(s.mesh):
    compiled = trainer.make_train_step(s).lower(s.abstract_state, batch, jax.random.key(0)).compile()
  cost = compiled.cost_analysis()
  return (cost[0] if isinstance(cost, (list, tuple)) else cost)['flops']


@pytest.mark.parametrize('case', ['all', 'stage1_remat_minimal', 'remat_full', 'pixel_shuffle',
                                  'gated_xattn_frozen_lm'])
def test_count_is_within_two_percent_of_xla_cost_analysis(case):
  """At width 768 and 16 rows (matmuls dominate, as in real models) XLA's count of the compiled step is the
  matmuls plus about 1% of elementwise work (norms, softmax, activations, the optimizer). Where XLA's own count is wrong, the configs avoid it: it counts a lax.cond's larger branch
  (train.loss_positions='auto' falls back to every position only when a row overflows; these configs use 'all'),
  a while loop's body once (scanned stacks: counted unscanned, test_a_scanned_stack_counts_as_unscanned), and a
  depthwise convolution's weight gradient as a dense one (test_xla_overcounts_depthwise_weight_gradients)."""
  cfg = with_changes(base_cfg(768), **{**CASES[case], 'train.batch_size': 16})
  if 'projector' in CASES[case] and CASES[case]['model.projector']['name'] == 'gated_xattn':
    cfg.model.projector.heads = 6
  ours, xla = step_flops(cfg)['total'], xla_step_flops(cfg)
  assert ours <= xla <= 1.02 * ours, (ours, xla, xla / ours)


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


def test_xla_overcounts_depthwise_weight_gradients():
  """A depthwise 3x3 convolution (c_abstractor's, ldpv2's): forward and input gradient as XLA counts them, but its
  weight gradient, a batch-grouped convolution, XLA counts as if every channel met every other."""
  x = jax.ShapeDtypeStruct((2, 6, 6, 64), jnp.float32)
  w = jax.ShapeDtypeStruct((3, 3, 1, 64), jnp.float32)

  def grads(x, w):
    conv = lambda x, w: jax.lax.conv_general_dilated(  # noqa: E731
        x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=64)
    return jax.grad(lambda x, w: (conv(x, w) ** 2).sum(), argnums=(0, 1))(x, w)

  taps = 16 * 16                                           # real-input (output, tap) pairs of 3x3 SAME on 6x6
  assert flops.jaxpr_matmul_flops(grads, x, w) == 3 * 2 * 2 * taps * 64   # forward, dX, dW
  assert jax.jit(grads).lower(x, w).compile().cost_analysis()['flops'] > 10 * 3 * 2 * 2 * taps * 64


def test_llava15_7b_stage1_flops_per_token():
  """configs/llava15_stage1.py: CLIP ViT-L/14-336 (penultimate layer) + 2-layer MLP + Vicuna-7B (vocab 32064),
  L = 576 + 1472 = 2048, batch 256; only the projector trains; attention by XLA (all L^2 pairs).

  LM per token, forward: 2 * 32 * (4 * 4096^2 + 3 * 4096 * 11008) + the vocabulary projection 2 * 4096 * 32064 at
  the 1472 text positions only (train.loss_positions), i.e. * 1472 / 2048 per token, + attention 32 * 2 * (2 *
  2048 * 4096) (scores + weighted sum). Backward of the frozen LM: input grads, 1x the weight matmuls (head
  included) + 2x attention. CLIP forward per image: S = 577 tokens (CLS), 23 blocks: 2 * 576 * 588 * 1024 + 23 *
  (8 * 577 * 1024^2 + 4 * 577^2 * 1024 + 4 * 577 * 1024 * 4096). Projector per image: forward 2 * 576 * (1024 *
  4096 + 4096^2), backward dW of both layers + dX of the second."""
  cfg = load_config('configs/llava15_stage1.py')
  f = flops.step_flops(cfg, labels=state_lib.setup(cfg, mesh=jax.sharding.AbstractMesh((1, 1, 1), (
      'data', 'fsdp', 'tensor'))).labels)
  blocks = 32 * (4 * 4096 ** 2 + 3 * 4096 * 11008)
  head = 4096 * 32064 * 1472 / 2048
  attention = 32 * 2 * (2 * 2048 * 4096)
  lm = 2 * (blocks + head) + attention + 2 * (blocks + head) + 2 * attention
  clip = 2 * 576 * 588 * 1024 + 23 * (8 * 577 * 1024 ** 2 + 4 * 577 ** 2 * 1024 + 4 * 577 * 1024 * 4096)
  projector = 2 * 576 * (1024 * 4096 + 4096 ** 2) + (2 * 576 * 1024 * 4096 + 2 * 2 * 576 * 4096 ** 2)
  assert f['seq_len'] == 2048 and f['tokens'] == 256 * 2048 and f['encoder_bwd'] == 0
  assert f['flops_per_token'] == pytest.approx(lm + (clip + projector) / 2048, rel=1e-12)
  text = flops.format_flops_summary(f)
  assert f'{f["flops_per_token"] / 1e9:.4g} GFLOP/token' in text
  for part in ('encoder', 'projector', 'lm', 'total'):
    assert f'\n  {part} ' in text


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


def test_a_cpu_has_no_peak_unless_configured():
  cpu = jax.devices('cpu')[0]
  assert flops.device_peak_flops(cpu, 'float32')[0] is None
  assert flops.device_peak_flops(cpu, 'float32', 4e11) == (4e11, 'train.device_peak_flops = 0.4 TFLOP/s')
  with pytest.raises(ValueError, match='model.dtype'):
    flops.device_peak_flops(cpu, 'float16')
