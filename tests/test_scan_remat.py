"""Memory levers (mmproj/layers/scan.py): scanned layers (model.lm.scan_layers, model.encoder.scan_layers) compute
the same function as unrolled ones, for the full forward, segment packing, sliding windows, RoPE scaling, the KV
cache and generation; remat policies leave loss and gradients unchanged and lower the train step's temp memory;
layer stacking helpers (mmproj.convert) and loading HF weights into a scanned model (tiny configs, CPU, float32)."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import make_tiny_model_cfg

from mmproj import config_lib
from mmproj import model as mm
from mmproj.convert import stack_layers, stack_model_params, unstack_layers, unstack_model_params
from mmproj.encoders import build_encoder
from mmproj.eval.generate import generate_tokens
from mmproj.lm import build_lm

BOS, EOS, IMAGE = 1, 2, 3
LLAMA3 = {'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
          'original_max_position_embeddings': 8}


def lm_cfg(**overrides) -> dict:
  return dict(vocab_size=48, width=32, depth=3, num_heads=4, num_kv_heads=2, head_dim=None, mlp_dim=64,
              rope_theta=10000.0, norm_eps=1e-6, tie_embeddings=False, max_len=64, **overrides)


def vit_cfg(**overrides) -> dict:
  return dict(name='vit', image_size=16, patch_size=4, width=32, depth=4, num_heads=2, mlp_dim=64, output_layer=-2,
              cls_token=True, pre_norm=True, final_norm=True, norm_eps=1e-6, act='gelu', **overrides)


def lm_batch(vocab=48, pads=(0, 3), length=12, seed=0):
  """Left-padded rows: tokens, positions, input_mask [B, T] and two-segment packing ids (0 = shared prefix)."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(4, vocab, (len(pads), length)).astype(np.int32)
  mask = (np.arange(length)[None] >= np.asarray(pads)[:, None]).astype(np.int32)
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
  segments = np.where(np.arange(length)[None] < length // 3, 0, 1 + (np.arange(length)[None] >= 2 * length // 3))
  return jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask), jnp.asarray(segments, jnp.int32)


def lm_forward(lm, params, tokens, positions, mask, segment_ids=None):
  def fwd(m):
    return m(m.embed(tokens), positions, mask, segment_ids=segment_ids)[0]
  return lm.apply({'params': params}, method=fwd)                              # [B, T, V]


def lm_loss(lm, params, tokens, positions, mask, segment_ids=None):
  logits = lm_forward(lm, params, tokens, positions, mask, segment_ids)
  logp = jax.nn.log_softmax(logits[:, :-1])
  nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]      # [B, T-1]
  return jnp.sum(nll * mask[:, 1:]) / jnp.sum(mask[:, 1:])


def init_lm(lm, tokens, positions, mask, seed=0):
  return nn.unbox(lm.init(jax.random.key(seed), method=lambda m: m(m.embed(tokens), positions, mask)[0])['params'])


def vit_loss(vit, params, image):
  tokens, _ = vit.apply({'params': params}, image)                            # [B, N, D]
  return jnp.mean(jnp.sin(tokens) * tokens)


def images(n=2, size=16, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8))


def assert_trees_close(a, b, atol, what):
  ka = jax.tree_util.tree_leaves_with_path(a)
  kb = jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in ka] == [p for p, _ in kb], f'{what}: different trees'
  for (path, x), (_, y) in zip(ka, kb):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0, err_msg=f'{what} {path}')


# ----------------------------------------------------------------------------------------------- scan == unrolled


@pytest.mark.parametrize('overrides,packed', [
    ({}, False),
    (dict(sliding_window=4, rope_scaling=LLAMA3, qkv_bias=True), True),
], ids=['plain', 'window_llama3_qkvbias_segments'])
def test_lm_scan_matches_unrolled(overrides, packed):
  tokens, positions, mask, segments = lm_batch()
  segment_ids = segments if packed else None
  flat = build_lm(lm_cfg(**overrides))
  scanned = build_lm(lm_cfg(scan_layers=True, **overrides))
  params = init_lm(flat, tokens, positions, mask)
  stacked = stack_layers(params, 3)

  own = init_lm(scanned, tokens, positions, mask)                               # the scanned model's own layout
  assert jax.tree.structure(own) == jax.tree.structure(stacked)
  assert own['layers']['self_attn']['q_proj']['kernel'].shape == (3, 32, 4, 8)
  assert 'layers_0' not in own

  want = lm_forward(flat, params, tokens, positions, mask, segment_ids)
  got = lm_forward(scanned, stacked, tokens, positions, mask, segment_ids)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)

  g_flat = jax.grad(lambda p: lm_loss(flat, p, tokens, positions, mask, segment_ids))(params)
  g_scan = jax.grad(lambda p: lm_loss(scanned, p, tokens, positions, mask, segment_ids))(stacked)
  assert_trees_close(g_scan, stack_layers(g_flat, 3), 1e-5, 'gradient')


def test_sown_intermediates_are_stacked_per_layer():
  """apply(..., mutable=['intermediates']) under scan (and remat): each sown value gets the leading layer axis;
  unstacked, they equal the unrolled model's."""
  tokens, positions, mask, _ = lm_batch()
  flat, scanned = build_lm(lm_cfg()), build_lm(lm_cfg(scan_layers=True, remat='full'))
  params = init_lm(flat, tokens, positions, mask)

  def sown(lm, p):
    _, state = lm.apply({'params': p}, method=lambda m: m(m.embed(tokens), positions, mask)[0],
                        mutable=['intermediates'])
    return state['intermediates']

  want, got = sown(flat, params), sown(scanned, stack_layers(params, 3))
  assert sorted(want) == ['layers_0', 'layers_1', 'layers_2'] and sorted(got) == ['layers']
  assert_trees_close(unstack_layers(got), want, 1e-6, 'sown intermediates')


def test_scanned_params_carry_the_layers_axis():
  """Logical names of scanned params start with 'layers' (sharding rule 'layers' -> None)."""
  tokens, positions, mask, _ = lm_batch()
  lm = build_lm(lm_cfg(scan_layers=True))
  boxed = lm.init(jax.random.key(0), method=lambda m: m(m.embed(tokens), positions, mask)[0])['params']
  specs = nn.get_partition_spec(boxed)
  assert tuple(specs['layers']['self_attn']['q_proj']['kernel']) == ('layers', 'embed', 'heads', 'head_dim')
  assert tuple(specs['layers']['input_layernorm']['scale'])[0] == 'layers'
  assert tuple(specs['embed_tokens']['embedding']) == ('vocab', 'embed')
  vit = build_encoder(vit_cfg(scan_layers=True))
  specs = nn.get_partition_spec(vit.init(jax.random.key(0), images())['params'])
  assert tuple(specs['layers']['mlp']['fc1']['kernel'])[0] == 'layers'


def test_vit_scan_matches_unrolled():
  """output_layer=-2 of depth 4: three blocks built, scanned as layers [3, ...] (CLIP-shaped: CLS + pre-norm)."""
  image = images()
  flat = build_encoder(vit_cfg())
  scanned = build_encoder(vit_cfg(scan_layers=True))
  params = nn.unbox(flat.init(jax.random.key(0), image)['params'])
  assert sorted(k for k in params if k.startswith('layers')) == ['layers_0', 'layers_1', 'layers_2']
  stacked = stack_layers(params, 3)
  own = nn.unbox(scanned.init(jax.random.key(0), image)['params'])
  assert jax.tree.structure(own) == jax.tree.structure(stacked)
  assert own['layers']['self_attn']['q_proj']['kernel'].shape[0] == 3

  want, grid = flat.apply({'params': params}, image)
  got, grid_scan = scanned.apply({'params': stacked}, image)
  assert grid == grid_scan
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)
  g_flat = jax.grad(lambda p: vit_loss(flat, p, image))(params)
  g_scan = jax.grad(lambda p: vit_loss(scanned, p, image))(stacked)
  assert_trees_close(g_scan, stack_layers(g_flat, 3), 1e-5, 'gradient')


def test_lm_scan_kv_cache_matches_full_pass():
  """Prefill + one-token decode steps of a scanned LM (sliding window, llama3 RoPE) == the unrolled LM's cached
  pass == the full pass."""
  tokens, positions, mask, _ = lm_batch(pads=(0, 2), length=10)
  overrides = dict(sliding_window=3, rope_scaling=LLAMA3)
  flat, scanned = build_lm(lm_cfg(**overrides)), build_lm(lm_cfg(scan_layers=True, **overrides))
  params = init_lm(flat, tokens, positions, mask)
  stacked = stack_layers(params, 3)
  full = lm_forward(flat, params, tokens, positions, mask)

  def step(m, cache, lo, hi):
    return m(m.embed(tokens[:, lo:hi]), positions[:, lo:hi], mask[:, lo:hi], cache=cache)

  outs = {}
  for name, lm, p in (('flat', flat, params), ('scan', scanned, stacked)):
    cache = lm.init_cache(2, 10)
    logits, cache = lm.apply({'params': p}, cache, 0, 6, method=step)
    chunks = [logits]
    for i in range(6, 10):
      logits, cache = lm.apply({'params': p}, cache, i, i + 1, method=step)
      chunks.append(logits)
    assert cache['k'].shape == (3, 2, 10, 2, 8) and int(cache['index']) == 10
    outs[name] = (np.concatenate(chunks, axis=1), cache)
  valid = np.asarray(mask).astype(bool)
  np.testing.assert_allclose(outs['scan'][0][valid], outs['flat'][0][valid], atol=1e-5, rtol=0)
  np.testing.assert_allclose(outs['scan'][0][valid], np.asarray(full)[valid], atol=1e-4, rtol=0)
  np.testing.assert_allclose(outs['scan'][1]['k'], outs['flat'][1]['k'], atol=1e-5, rtol=0)
  np.testing.assert_allclose(outs['scan'][1]['v'], outs['flat'][1]['v'], atol=1e-5, rtol=0)


def mm_batch(cfg, pads=(0, 2, 4), text_len=5, seed=0):
  """Left-padded MultimodalLM batch: <pad>*p <bos> <image>*M words."""
  rng = np.random.default_rng(seed)
  m = mm.num_image_tokens(cfg)
  length = max(pads) + 1 + m + text_len
  tokens = np.zeros((len(pads), length), np.int32)
  mask = np.zeros((len(pads), length), np.int32)
  for r, p in enumerate(pads):
    tokens[r, p:] = [BOS] + [IMAGE] * m + list(rng.integers(6, cfg.lm.vocab_size, length - p - 1 - m))
    mask[r, p:] = 1
  size = cfg.encoder.image_size
  return {'image': rng.integers(0, 256, (len(pads), size, size, 3), dtype=np.uint8), 'tokens': tokens,
          'positions': np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32), 'input_mask': mask}


def test_multimodal_scan_generation_matches_unrolled():
  """Encoder and LM both scanned: same logits, same prefill/decode logits and same greedy tokens
  (mmproj.eval.generate.generate_tokens) from the stacked copy of the unrolled model's params."""
  cfg = make_tiny_model_cfg()
  cfg.lm.depth = 3
  flat = mm.build_model(cfg)
  scan_cfg = make_tiny_model_cfg()
  scan_cfg.lm.depth = 3
  scan_cfg.lm.scan_layers = True
  scan_cfg.encoder.scan_layers = True
  scanned = mm.build_model(scan_cfg)
  batch = mm_batch(cfg)
  params = nn.unbox(jax.jit(flat.init)(jax.random.key(0), batch)['params'])
  stacked = stack_model_params(params, scan_cfg)
  assert stacked['lm']['layers']['mlp']['up_proj']['kernel'].shape == (3, 32, 64)
  assert stacked['encoder']['layers']['mlp']['fc1']['kernel'].shape == (2, 32, 64)
  own = nn.unbox(jax.jit(scanned.init)(jax.random.key(0), batch)['params'])
  assert jax.tree.structure(own) == jax.tree.structure(stacked)
  assert_trees_close(unstack_model_params(stacked, scan_cfg), params, 0, 'round trip')

  np.testing.assert_allclose(scanned.apply({'params': stacked}, batch), flat.apply({'params': params}, batch),
                             atol=1e-5, rtol=0)
  cache_len = batch['tokens'].shape[1] + 3
  (l0, c0), (l1, c1) = (m.apply({'params': p}, batch, cache_len, method='prefill')
                        for m, p in ((flat, params), (scanned, stacked)))
  np.testing.assert_allclose(l1, l0, atol=1e-5, rtol=0)
  token = jnp.argmax(l0, -1).astype(jnp.int32)
  (d0, _), (d1, _) = (m.apply({'params': p}, token, c, method='decode_step')
                      for m, p, c in ((flat, params, c0), (scanned, stacked, c1)))
  np.testing.assert_allclose(d1, d0, atol=1e-5, rtol=0)

  want = generate_tokens(flat, params, batch, max_new_tokens=6, eos_id=EOS)
  got = generate_tokens(scanned, stacked, batch, max_new_tokens=6, eos_id=EOS)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


# ----------------------------------------------------------------------------------------------- remat


@pytest.mark.parametrize('scan', [False, True], ids=['unrolled', 'scanned'])
@pytest.mark.parametrize('remat', ['full', 'dots', 'minimal'])
def test_lm_remat_same_loss_and_grads(remat, scan):
  tokens, positions, mask, segments = lm_batch()
  base = build_lm(lm_cfg(scan_layers=scan, sliding_window=5))
  lm = build_lm(lm_cfg(scan_layers=scan, sliding_window=5, remat=remat))
  params = init_lm(base, tokens, positions, mask)
  assert jax.tree.structure(init_lm(lm, tokens, positions, mask)) == jax.tree.structure(params)

  def value_and_grad(m):
    return jax.jit(jax.value_and_grad(lambda p: lm_loss(m, p, tokens, positions, mask, segments)))(params)

  loss0, g0 = value_and_grad(base)
  loss1, g1 = value_and_grad(lm)
  np.testing.assert_allclose(float(loss1), float(loss0), atol=1e-6, rtol=0)
  assert_trees_close(g1, g0, 1e-5, f'remat={remat} gradient')   # same ops, other fusions


@pytest.mark.parametrize('scan', [False, True], ids=['unrolled', 'scanned'])
def test_vit_remat_same_loss_and_grads(scan):
  image = images()
  base = build_encoder(vit_cfg(scan_layers=scan))
  vit = build_encoder(vit_cfg(scan_layers=scan, remat='full'))
  params = nn.unbox(base.init(jax.random.key(0), image)['params'])
  loss0, g0 = jax.jit(jax.value_and_grad(lambda p: vit_loss(base, p, image)))(params)
  loss1, g1 = jax.jit(jax.value_and_grad(lambda p: vit_loss(vit, p, image)))(params)
  np.testing.assert_allclose(float(loss1), float(loss0), atol=1e-6, rtol=0)
  assert_trees_close(g1, g0, 1e-5, 'ViT remat gradient')


def _train_step_temp_bytes(remat: str, scan: bool) -> int:
  """Temp memory of the compiled value_and_grad of a 4-layer, width-128 LM at B=4, T=256 (abstract params)."""
  cfg = lm_cfg(scan_layers=scan, remat=remat)
  cfg.update(depth=4, width=128, mlp_dim=512, vocab_size=64, max_len=256)
  lm = build_lm(cfg)
  tokens = jnp.zeros((4, 256), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(256, dtype=jnp.int32), (4, 256))
  mask = jnp.ones((4, 256), jnp.int32)
  params = jax.eval_shape(lambda: init_lm(lm, tokens, positions, mask))
  step = jax.jit(jax.value_and_grad(lambda p: lm_loss(lm, p, tokens, positions, mask)))
  return step.lower(params).compile().memory_analysis().temp_size_in_bytes


def test_remat_reduces_train_step_temp_memory():
  """Measured on the scanned LM: there the policies give a clean ladder none > dots > minimal > full. (Unrolled,
  XLA:CPU schedules the recomputation early and the saving mostly vanishes on this backend; see the report.)"""
  temp = {remat: _train_step_temp_bytes(remat, scan=True) for remat in ('none', 'dots', 'minimal', 'full')}
  print({k: f'{v / 2**20:.1f} MiB' for k, v in temp.items()}, f"full/none = {temp['full'] / temp['none']:.2f}")
  assert temp['full'] < 0.5 * temp['none']
  assert temp['none'] > temp['dots'] > temp['minimal'] > temp['full']


def test_scan_keeps_one_block_body_in_the_program():
  """The compiled train step of a scanned LM does not grow with depth; the unrolled one does (8 vs 16 layers)."""
  tokens, positions, mask, _ = lm_batch()

  def hlo_size(depth, scan):
    lm = build_lm(dict(lm_cfg(scan_layers=scan), depth=depth))
    params = jax.eval_shape(lambda: init_lm(lm, tokens, positions, mask))
    step = jax.jit(jax.value_and_grad(lambda p: lm_loss(lm, p, tokens, positions, mask)))
    return len(step.lower(params).compile().as_text())

  sizes = {(d, s): hlo_size(d, s) for d in (8, 16) for s in (False, True)}
  print({f'depth={d} scan={s}': n for (d, s), n in sizes.items()},
        f'scan/unrolled at 8 layers = {sizes[8, True] / sizes[8, False]:.2f}')
  assert sizes[8, True] < 0.5 * sizes[8, False]
  assert sizes[16, True] < 1.1 * sizes[8, True]          # one block body, whatever the depth
  assert sizes[16, False] > 1.6 * sizes[8, False]        # one body per layer


# ----------------------------------------------------------------------------------------------- stacking helpers


def test_stack_unstack_round_trip_and_errors():
  rng = np.random.default_rng(0)
  tree = {f'layers_{i}': {'attn': {'kernel': rng.normal(size=(3, 2)).astype(np.float32)},
                         'norm': {'scale': rng.normal(size=(2,)).astype(np.float32)}}
          for i in range(3)}
  tree['norm'] = {'scale': np.ones(2)}
  stacked = stack_layers(tree, 3)
  assert sorted(stacked) == ['layers', 'norm']
  assert stacked['layers']['attn']['kernel'].shape == (3, 3, 2)
  np.testing.assert_array_equal(stacked['layers']['attn']['kernel'][1], tree['layers_1']['attn']['kernel'])
  back = unstack_layers(stacked)
  assert_trees_close(back, tree, 0, 'round trip')
  assert_trees_close(unstack_layers(jax.tree.map(jnp.asarray, stacked)), tree, 0, 'round trip (jax arrays)')
  custom = stack_layers({'block0': {'w': np.ones(2)}, 'block1': {'w': np.zeros(2)}}, 2, prefix='block',
                        stacked_name='blocks')
  assert custom['blocks']['w'].shape == (2, 2)
  assert sorted(unstack_layers(custom, prefix='block', stacked_name='blocks')) == ['block0', 'block1']

  with pytest.raises(ValueError, match="'layers_3' missing"):
    stack_layers(tree, 4)
  with pytest.raises(ValueError, match="'layers_2' is beyond depth=2"):
    stack_layers(tree, 2)
  bad = dict(tree, layers_1={'attn': {'kernel': np.ones((3, 3))}, 'norm': {'scale': np.ones(2)}})
  with pytest.raises(ValueError, match="'layers_1' differs"):
    stack_layers(bad, 3)
  with pytest.raises(ValueError, match="no 'layers'"):
    unstack_layers(tree)


# ----------------------------------------------------------------------------------------------- config errors


@pytest.mark.parametrize('field,value', [
    ('remat', 'sometimes'),
    ('remat', True),
    ('lm.scan_layers', 'yes'),
    ('encoder.scan_layers', 1),
    ('lm.remat', 'dot'),
    ('encoder.remat', 'all'),
])
def test_bad_values_name_the_field(field, value):
  """A bad value that reaches the model (e.g. from a JSON config) is a ValueError naming the field; a command-line
  override of the wrong type is refused before that, naming it too."""
  cfg = make_tiny_model_cfg()
  mm.validate(cfg)
  raw = cfg.to_dict()
  section, _, key = field.rpartition('.')
  (raw[section] if section else raw)[key] = value
  with pytest.raises(ValueError, match=re.escape(f'model.{field}=')):
    mm.validate(ml_collections.ConfigDict(raw))
  if not isinstance(value, str):
    with pytest.raises(ValueError, match=re.escape(f'config field {field}')):
      config_lib.set_field(cfg, field, value)


def test_modules_reject_bad_values():
  tokens, positions, mask, _ = lm_batch()
  with pytest.raises(ValueError, match=r'model\.remat'):
    init_lm(build_lm(lm_cfg(remat='all')), tokens, positions, mask)
  with pytest.raises(ValueError, match=r'model\.encoder\.scan_layers'):
    build_encoder(vit_cfg(scan_layers='on')).init(jax.random.key(0), images())
  with pytest.raises(ValueError, match=r'model\.remat'):
    build_encoder(vit_cfg(remat='everything')).init(jax.random.key(0), images())


def test_scan_with_gated_cross_attention_is_refused():
  cfg = make_tiny_model_cfg()
  cfg.projector = dict(name='gated_xattn')
  mm.validate(cfg)
  cfg.lm.scan_layers = True
  with pytest.raises(ValueError, match=r'model\.lm\.scan_layers'):
    mm.validate(cfg)
  model = mm.MultimodalLM(config=ml_collections.FrozenConfigDict(cfg))   # past validate: the LM itself refuses
  with pytest.raises(ValueError, match=r'model\.lm\.scan_layers'):
    model.init(jax.random.key(0), mm_batch(cfg))


# ----------------------------------------------------------------------------------------------- HF weights


def test_hf_llama_dir_loads_into_scanned_model(tmp_path):
  """cfg.init.lm = an HF Llama directory, model.lm.scan_layers=True: pretrained.load stacks the layers, place puts
  them on the model's shardings, and the scanned model's logits equal transformers'."""
  pytest.importorskip('torch')
  pytest.importorskip('transformers')
  import torch
  from test_convert_lm import LLAMA3 as HF_LLAMA3
  from test_convert_lm import batch as hf_batch
  from test_convert_lm import make_hf, saved

  from mmproj.convert.llama import lm_config_from_hf
  from mmproj.train import pretrained

  hf = make_hf('llama', num_hidden_layers=3, rope_parameters=HF_LLAMA3)
  path = saved(hf, tmp_path)
  cfg = ml_collections.ConfigDict()
  cfg.model = make_tiny_model_cfg()
  cfg.model.use_image = False
  cfg.model.lm = dict(lm_config_from_hf(hf.config.to_dict()), scan_layers=True)
  cfg.init = dict(encoder=None, lm=path, projector=None)
  model = mm.build_model(cfg.model)

  loaded = pretrained.load(cfg)
  assert 'layers_0' not in loaded['lm']
  assert loaded['lm']['layers']['self_attn']['q_proj']['kernel'].shape == (3, 40, 4, 10)
  tokens, mask, positions = hf_batch(67, lengths=(9, 6))                        # right-padded (HF positions)
  batch = {'tokens': tokens, 'positions': positions, 'input_mask': mask}
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), batch)['params'])
  shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), params)
  params = pretrained.place(params, loaded, shardings)

  ours = np.asarray(model.apply({'params': params}, batch))
  with torch.no_grad():
    ref = hf(input_ids=torch.from_numpy(tokens).long(), attention_mask=torch.from_numpy(mask).long()).logits.numpy()
  valid = mask.astype(bool)
  np.testing.assert_allclose(ours[valid], ref[valid], atol=1e-4, rtol=0)


def test_block_causal_attention_under_scan_and_remat():
  """model.kernels.attention='query_blocks' at L = 360 >= 352: the LM's causal attention runs in query blocks
  (layers.causal_query_blocks); scanned layers with remat='minimal', a sliding window and packed segments give the
  unrolled, no-remat model's loss and gradients."""
  from mmproj.layers import causal_query_blocks, kernels
  assert len(causal_query_blocks(360)) == 2
  with kernels.use(kernels.Kernels(attention='query_blocks')):
    _block_causal_under_scan_and_remat()


def _block_causal_under_scan_and_remat():
  tokens, positions, mask, segments = lm_batch(length=360, pads=(0, 7))
  flat = build_lm(dict(lm_cfg(sliding_window=300), max_len=512))
  scanned = build_lm(dict(lm_cfg(sliding_window=300, scan_layers=True, remat='minimal'), max_len=512))
  params = init_lm(flat, tokens, positions, mask)
  loss0, g0 = jax.jit(jax.value_and_grad(lambda p: lm_loss(flat, p, tokens, positions, mask, segments)))(params)
  loss1, g1 = jax.jit(jax.value_and_grad(lambda p: lm_loss(scanned, p, tokens, positions, mask, segments)))(
      stack_layers(params, 3))
  np.testing.assert_allclose(float(loss1), float(loss0), atol=1e-6, rtol=0)
  assert_trees_close(g1, stack_layers(g0, 3), 1e-5, 'block-causal scanned + remat gradient')
