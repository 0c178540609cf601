"""The training loop: config errors before compiling, frozen parts, 8-device sharding (kill-and-resume, damaged
checkpoints and NaN steps: test_faults.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from experiment_utils import REPO, python_env, run_script, tiny_experiment
from mmproj.train import loss as loss_lib
from mmproj.train import state as state_lib
from mmproj.train import trainer


@pytest.fixture(scope='module')
def tiny_cfg(shapes_data_dir):
  return tiny_experiment(shapes_data_dir)


def _compiled_functions(fn):
  """Runs fn and returns the names of the functions XLA compiled meanwhile, plus fn's error (if any)."""
  names = []
  def listener(event, duration, **kwargs):
    if event.endswith('backend_compile_duration'):
      names.append(kwargs.get('fun_name', ''))
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    fn()
    error = None
  except Exception as e:  # noqa: BLE001 - the test inspects it
    error = e
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  return names, error


BAD_CONFIGS = {
    'model.projector.name': lambda c: c.model.projector.update(name='not_a_projector'),
    'model.projector.in_dim': lambda c: c.model.projector.update(in_dim=c.model.encoder.width + 1),
    'model.projector.out_dim': lambda c: c.model.projector.update(out_dim=c.model.lm.width * 2),
    'model.lm.num_kv_heads': lambda c: c.model.lm.update(num_kv_heads=3),
    'model.encoder.patch_size': lambda c: c.model.encoder.update(patch_size=7),
    'data.image_size': lambda c: c.data.update(image_size=32),
    'mesh': lambda c: c.mesh.update(data=3),
    'train.batch_size': lambda c: (c.mesh.update(data=1, fsdp=-1), c.train.update(batch_size=15)),
    'train.loss_positions': lambda c: c.train.update(loss_positions='10000'),
}


@pytest.mark.parametrize('field', sorted(BAD_CONFIGS))
def test_bad_config_fails_naming_the_field_before_compiling(tiny_cfg, tmp_path, field):
  cfg = tiny_cfg.copy_and_resolve_references()
  BAD_CONFIGS[field](cfg)
  if field == 'train.batch_size':  # needs more than one device on the batch axes: 15 rows on 2 (simulated) devices
    code = textwrap.dedent(f'''
        import json, ml_collections, pytest
        from mmproj.train import trainer
        cfg = ml_collections.ConfigDict(json.loads({cfg.to_json()!r}))
        with pytest.raises(ValueError, match='train.batch_size'):
          trainer.setup(cfg)
        print('ok')''')
    assert 'ok' in run_script(code, num_devices=2)
    return
  compiled, error = _compiled_functions(lambda: trainer.train(cfg, str(tmp_path / 'run')))
  assert isinstance(error, ValueError), error
  assert field.split('.')[-1] in str(error) and field.split('.')[0] in str(error), str(error)
  assert not any(name in ('jit(train_step)', 'jit(init)') for name in compiled), compiled
  assert not os.path.exists(tmp_path / 'run' / 'checkpoints')


def test_frozen_parts_get_no_optimizer_state(tiny_cfg):
  cfg = tiny_cfg.copy_and_resolve_references()
  cfg.train.frozen = ['encoder/.*', 'lm/.*']
  s = trainer.setup(cfg)
  n_params = sum(x.size for x in jax.tree.leaves(s.abstract_state.params))
  n_projector = sum(x.size for x in jax.tree.leaves(s.abstract_state.params['projector']))
  n_opt = sum(x.size for x in jax.tree.leaves(s.abstract_state.opt_state) if x.ndim)  # scalars: step counters
  assert n_opt == 2 * n_projector < n_params  # Adam's mu and nu for the projector only
  assert s.model.encoder_trainable is False  # -> stop_gradient at the encoder's output


SHARDED_CHECK = textwrap.dedent('''
    import json, sys
    import jax, numpy as np
    import ml_collections
    from mmproj.data import pipeline, shapes
    from mmproj.train import trainer
    cfg = ml_collections.ConfigDict(json.loads(sys.argv[1]))
    _, tok = shapes.prepare(cfg.data)
    assert jax.device_count() == 8
    results = {}
    for name, mesh, devices in (('1x1x1', dict(data=1, fsdp=1, tensor=1), jax.devices()[:1]),
                                ('2x2x2', dict(data=2, fsdp=2, tensor=2), jax.devices())):
      cfg.mesh = ml_collections.ConfigDict(mesh)
      s = trainer.setup(cfg, devices)
      state = trainer.init_state(s, cfg.seed)
      step = trainer.make_train_step(s)
      batches = iter(pipeline.train_loader(cfg.data, tok, num_image_tokens=s.num_image_tokens,
                                           global_batch_size=cfg.train.batch_size, seed=cfg.seed))
      losses = []
      with jax.set_mesh(s.mesh):
        for _ in range(cfg.train.steps):
          state, metrics = step(state, trainer.global_batch(s, next(batches)), jax.random.key(1))
          losses.append(float(metrics['loss']))
      shards = {len(x.sharding.device_set) for x in jax.tree.leaves(state.params)}
      results[name] = (losses, jax.tree.map(np.asarray, jax.device_get(state.params)), shards)
    (l1, p1, _), (l8, p8, shards8) = results['1x1x1'], results['2x2x2']
    loss_rtol, param_atol = json.loads(sys.argv[2])
    print('losses', l1, l8, 'max relative loss diff', max(abs(a - b) / abs(a) for a, b in zip(l1, l8)))
    np.testing.assert_allclose(l1, l8, rtol=loss_rtol, atol=1e-6)
    diffs = jax.tree_util.tree_leaves_with_path(jax.tree.map(
        lambda a, b: float(np.abs(a.astype(np.float32) - b.astype(np.float32)).max()), p1, p8))
    worst = max(diffs, key=lambda kv: kv[1])
    print('max param diff', worst[1], 'at', jax.tree_util.keystr(worst[0]))
    assert worst[1] < param_atol, worst
    assert l1[-1] < l1[0], l1
    assert shards8 == {8}
    print('ok')
''')


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_train_step_on_8_devices_matches_1_device(tiny_cfg, dtype):
  """data x fsdp x tensor = 2x2x2 vs one device: same losses and params after 4 steps.

  float32: losses within rtol 1e-5, params within 1e-4. The reductions run in a different order on 8 devices, so
  gradients differ in the last float32 bits; Adam divides by sqrt(v), which turns a 1e-7 difference on a
  near-zero gradient into up to a few percent of one step (lr=3e-3 here). 1e-4 is 3% of a step; a real sharding
  bug moves params by whole steps.
  bfloat16 compute, with the frozen encoder stored in bfloat16 (model.param_dtype): every matmul rounds its
  output to 8 mantissa bits, so the two layouts' activations differ by ~2^-8 relative where partial sums are
  added in another order (the printout shows the largest differences; they were ~4e-4 and ~1e-3 here). Losses
  within rtol 2e-3, params within 2e-3 (2/3 of one step): the drift of a wrong sharding still exceeds it.
  """
  cfg = tiny_cfg.copy_and_resolve_references()
  cfg.train.update(steps=4, learning_rate=3e-3)
  tolerances = [1e-5, 1e-4]
  if dtype == 'bfloat16':
    cfg.model.dtype = 'bfloat16'
    cfg.model.param_dtype.encoder = 'bfloat16'
    cfg.train.frozen = ['encoder/.*']
    tolerances = [2e-3, 2e-3]
  out = subprocess.run([sys.executable, '-c', SHARDED_CHECK, cfg.to_json(), json.dumps(tolerances)],
                       env=python_env(8), capture_output=True, text=True, timeout=600, cwd=REPO)
  print(out.stdout)
  assert out.returncode == 0 and 'ok' in out.stdout, out.stdout[-3000:] + out.stderr[-5000:]


def test_load_returns_the_trained_params(tiny_cfg, tmp_path):
  import mmproj
  result = trainer.train(tiny_cfg, str(tmp_path))
  bundle = mmproj.load(str(tmp_path))
  assert bundle.step == tiny_cfg.train.steps
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
               jax.device_get(result.state.params), jax.device_get(bundle.params))
  batch = {k: np.zeros(v.shape, v.dtype) for k, v in trainer.dummy_batch(tiny_cfg, 2).items()}
  logits = bundle.model.apply({'params': bundle.params}, batch)
  assert logits.shape == (2, state_lib.sequence_length(tiny_cfg), tiny_cfg.model.lm.vocab_size)
  with pytest.raises(FileNotFoundError, match='not an mmproj workdir'):
    mmproj.load(str(tmp_path / 'missing'))


def _synthetic_batches(cfg, n, seed=0):
  rng = np.random.default_rng(seed)
  b, length = int(cfg.train.batch_size), state_lib.sequence_length(cfg)
  out = []
  for _ in range(n):
    tokens = rng.integers(6, 58, (b, length)).astype(np.int32)
    mask = (np.arange(length)[None] < rng.integers(length // 2, length + 1, (b, 1))).astype(np.int32)
    out.append(dict(image=rng.integers(0, 256, (b, 48, 48, 3), dtype=np.uint8), tokens=tokens,
                    positions=np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32), input_mask=mask,
                    targets=np.roll(tokens, -1, 1), loss_mask=(mask * rng.integers(0, 2, mask.shape)).astype(np.float32),
                    segment_ids=np.zeros_like(tokens)))
  return out


def _train_on(cfg, batches):
  """Steps of cfg's train step on one device over `batches` -> ([(loss, accuracy)], final params)."""
  s = trainer.setup(cfg, jax.devices()[:1])
  state, step = trainer.init_state(s, 0), trainer.make_train_step(s)
  metrics = []
  with jax.set_mesh(s.mesh):
    for b in batches:
      state, m = step(state, b, jax.random.key(1))
      metrics.append((float(m['loss']), float(m['accuracy'])))
  return metrics, jax.device_get(state.params)


def test_loss_positions_give_the_update_of_every_position(tiny_cfg):
  """train.loss_positions='auto' (the vocabulary projection at the K = text_len gathered loss positions) trains
  exactly as 'all': batches whose loss lies in the text part (the gathered path) and a batch with a row of more
  than K loss positions (the every-position path, lax.cond), in one run."""
  batches = _synthetic_batches(tiny_cfg, 3)
  n_img = state_lib.sequence_length(tiny_cfg) - int(tiny_cfg.data.text_len)
  for b in batches[:2]:
    b['loss_mask'][:, :n_img] = 0.0                                  # fits: every loss position is a text one
  batches[2]['loss_mask'][0] = 1.0                                 # overflows K: loss at all L positions
  results = {}
  for value in ('auto', 'all'):
    cfg = tiny_cfg.copy_and_resolve_references()
    cfg.train.loss_positions = value
    assert state_lib.loss_positions(cfg) == (int(cfg.data.text_len) if value == 'auto' else None)
    results[value] = _train_on(cfg, batches)
  np.testing.assert_allclose(results['auto'][0], results['all'][0], atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), results['auto'][1], results['all'][1])


def test_token_loss_sums_gathers_exactly():
  """token_loss_sums with K gathered positions == the every-position sums, and the same gradients, both when
  every row fits in K and when one does not; rows with no loss at all give zero."""
  rng = np.random.default_rng(0)
  b, length, d, v, k = 3, 12, 4, 7, 5
  hidden = jax.numpy.asarray(rng.normal(size=(b, length, d)), jax.numpy.float32)
  w = jax.numpy.asarray(rng.normal(size=(d, v)), jax.numpy.float32)
  targets = jax.numpy.asarray(rng.integers(0, v, (b, length)), jax.numpy.int32)
  fits = np.zeros((b, length), np.float32)
  fits[0, [1, 4, 5, 11]] = 1.0
  fits[1, 6:11] = 1.0                                              # exactly K
  over = fits.copy()
  over[2, :7] = 1.0                                                # 7 > K loss positions
  for mask in (fits, over):
    def loss(h, w, positions):
      nll, correct, count = loss_lib.token_loss_sums(lambda x: x @ w, h, targets, jax.numpy.asarray(mask), positions)
      return nll, (correct, count)
    (nll_k, aux_k), g_k = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(hidden, w, k)
    (nll_all, aux_all), g_all = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(hidden, w, None)
    np.testing.assert_allclose(nll_k, nll_all, rtol=1e-6)
    np.testing.assert_allclose(aux_k, aux_all)
    for a, c in zip(g_k, g_all):
      np.testing.assert_allclose(a, c, atol=1e-6)
    if mask is fits:
      assert float(jax.numpy.abs(g_k[0][2]).max()) == 0.0                 # row 2 has no loss position


def test_gradient_accumulation_equals_one_pass(tiny_cfg):
  """train.grad_accum_steps=4 (micro-batches of 4 rows, losses normalised over the whole batch's tokens) gives the
  update of one pass over the batch of 16, up to float summation order."""
  batches = _synthetic_batches(tiny_cfg, 3)
  results = {}
  for accum in (1, 4):
    cfg = tiny_cfg.copy_and_resolve_references()
    cfg.train.grad_accum_steps = accum
    results[accum] = _train_on(cfg, batches)
  np.testing.assert_allclose(results[1][0], results[4][0], atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), results[1][1], results[4][1])
  cfg = tiny_cfg.copy_and_resolve_references()
  cfg.train.grad_accum_steps = 3
  with pytest.raises(ValueError, match='train.grad_accum_steps=3 must be >= 1 and divide train.batch_size=16'):
    trainer.setup(cfg, jax.devices()[:1])


def test_mfu_and_flops_are_logged(tiny_cfg, tmp_path, capsys):
  """A CPU has no peak in the table (test_flops: no MFU then); train.device_peak_flops gives it: MFU is logged."""
  tiny_cfg.train.device_peak_flops = 1e11
  trainer.train(tiny_cfg, str(tmp_path / 'peak'))
  records = [json.loads(line) for line in (tmp_path / 'peak' / 'metrics.jsonl').read_text().splitlines()]
  assert all(r['mfu'] == pytest.approx(r['tflops_per_device'] * 1e12 / 1e11) for r in records)
  out = capsys.readouterr().out
  assert 'GFLOP' in out and 'peak: train.device_peak_flops' in out and 'compiled step memory per device' in out
  assert 'MFU' in out


def test_log_interval_reports_mfu_only_with_a_peak():
  from mmproj.train.metrics import LogInterval
  batch = {'input_mask': np.ones((2, 5), np.int32), 'image': np.zeros((2, 4, 4, 3), np.uint8)}
  step = {'loss': np.float32(2.0), 'learning_rate': np.float32(1e-3), 'nonfinite_steps': np.int32(0)}
  for peak in (None, 1e12):
    interval = LogInterval({'pending_metrics': [{'loss': 4.0, 'learning_rate': 0.0, 'nonfinite_steps': 0}]},
                           flops_per_step=1e9, peak_flops=peak, processes=1)
    interval.add(step, batch)
    record = interval.record(2)
    assert record['loss'] == 3.0 and record['learning_rate'] == pytest.approx(1e-3)   # restored + this step
    assert ('mfu' in record) == (peak is not None)
    if peak:
      assert record['mfu'] == pytest.approx(record['tflops_per_device'] * 1e12 / peak)
    assert interval.pending == [] and interval.to_meta()['pending_metrics'] == []


def test_frozen_towers_stored_in_bfloat16(tiny_cfg, tmp_path):
  """model.param_dtype: a frozen tower stored in bfloat16 trains, checkpoints, resumes and loads in bfloat16; the
  trained parts and their optimizer state stay float32; storing a trained tower in bfloat16 is refused."""
  import mmproj
  cfg = tiny_cfg.copy_and_resolve_references()
  cfg.model.param_dtype.update(encoder='bfloat16', lm='bfloat16')
  cfg.train.frozen = ['encoder/.*', 'lm/.*']
  s = trainer.setup(cfg)
  dtypes = {part: {x.dtype.name for x in jax.tree.leaves(tree)} for part, tree in s.abstract_state.params.items()}
  assert dtypes == {'encoder': {'bfloat16'}, 'projector': {'float32'}, 'lm': {'bfloat16'}}
  assert {x.dtype.name for x in jax.tree.leaves(s.abstract_state.opt_state) if x.ndim} == {'float32'}
  cfg.train.steps = 3
  first = trainer.train(cfg, str(tmp_path))
  cfg.train.steps = 6
  resumed = trainer.train(cfg, str(tmp_path))                 # resumes from step 3's checkpoint
  assert resumed.resumed_from == 3
  frozen_before = jax.device_get(first.state.params['lm'])
  frozen_after = jax.device_get(resumed.state.params['lm'])
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(frozen_after)))
  loaded = mmproj.load(str(tmp_path))
  assert {x.dtype.name for x in jax.tree.leaves(loaded.params['lm'])} == {'bfloat16'}
  assert {x.dtype.name for x in jax.tree.leaves(loaded.params['projector'])} == {'float32'}

  cfg.train.frozen = ['encoder/.*']                           # the LM trains, but is to be stored in bfloat16
  with pytest.raises(ValueError, match=r'model.param_dtype.lm=.bfloat16.*trained parameters are stored in float32'):
    trainer.setup(cfg)
  cfg.model.param_dtype.lm = 'float16'
  with pytest.raises(ValueError, match=r"model.param_dtype.lm='float16' is not one of"):
    trainer.setup(cfg)


def test_llava15_stage1_stores_its_frozen_towers_in_bfloat16():
  """configs/llava15_stage1.py keeps CLIP and the 7B LM in bfloat16 (both frozen): half the per-device parameter
  memory of float32 storage, the projector and its optimizer state unchanged."""
  from mmproj.config_lib import load_config_file
  from mmproj.train import memory
  bf16 = memory.state_memory(load_config_file('configs/llava15_stage1.py'), 8, {'data': 8, 'fsdp': 1, 'tensor': 1})
  f32 = memory.state_memory(load_config_file('configs/llava15_stage1.py:frozen_dtype=float32'), 8,
                            {'data': 8, 'fsdp': 1, 'tensor': 1})
  for part in ('encoder', 'lm'):
    assert 2 * bf16['params'][part] == f32['params'][part], part
  assert bf16['params']['projector'] == f32['params']['projector']
  assert bf16['opt_state'] == f32['opt_state']
  assert sum(f32['params'].values()) / sum(bf16['params'].values()) > 1.99
