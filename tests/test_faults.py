"""Runs that die come back the same: SIGKILLs at random points (experiments/fault_injection.py), truncated or
altered checkpoints (fall back to the previous complete step, or stop naming the directory), checkpoints of
another config (refused, untouched), and NaN/Inf steps (skipped and counted, or the run stops with the last good
state saved)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiment_utils import REPO, python_env, tiny_experiment
from mmproj import data as data_lib
from mmproj.train import checkpoint as ckpt_lib
from mmproj.train import trainer

TIMING = ('steps_per_sec', 'tokens_per_sec', 'examples_per_sec', 'tflops_per_device', 'mfu')


def _cfg(data_dir, **train):
  cfg = tiny_experiment(data_dir)
  cfg.train.update(steps=9, **train)
  cfg.checkpoint.update(every=3, keep=100)
  cfg.log_every = 2               # does not divide checkpoint.every: a resume cuts through a log interval
  return cfg


def _records(workdir) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f if line.strip()]


def _assert_same_params(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.fixture(scope='module')
def reference(shapes_data_dir, tmp_path_factory):
  """An uninterrupted 9-step run with checkpoints at 3, 6 and 9."""
  workdir = str(tmp_path_factory.mktemp('faults') / 'reference')
  result = trainer.train(_cfg(shapes_data_dir), workdir)
  return workdir, jax.device_get(result.state.params)


def _copy(reference_dir, tmp_path) -> str:
  dst = str(tmp_path / 'run')
  shutil.copytree(reference_dir, dst)
  return dst


def _largest_file(directory) -> str:
  files = [os.path.join(d, f) for d, _, names in os.walk(directory) for f in names]
  return max(files, key=os.path.getsize)


def _truncate(step_dir):
  path = _largest_file(os.path.join(step_dir, 'state'))
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)


def _stale_state(step_dir, other_step_dir):
  """Step 9's array files replaced by step 6's: every byte decodes, only the checksums can tell."""
  shutil.rmtree(os.path.join(step_dir, 'state'))
  shutil.copytree(os.path.join(other_step_dir, 'state'), os.path.join(step_dir, 'state'))


@pytest.mark.parametrize('damage', ['truncated', 'stale'])
def test_damaged_latest_checkpoint_falls_back_and_ends_identical(reference, shapes_data_dir, tmp_path, capsys,
                                                                 damage):
  ref_dir, ref_params = reference
  run = _copy(ref_dir, tmp_path)
  ckpts = os.path.join(run, 'checkpoints')
  if damage == 'truncated':
    _truncate(os.path.join(ckpts, '9'))
  else:
    _stale_state(os.path.join(ckpts, '9'), os.path.join(ckpts, '6'))
  result = trainer.train(_cfg(shapes_data_dir), run)
  out = capsys.readouterr().out
  assert 'checkpoint step 9' in out and 'falling back to step 6' in out, out
  assert 'Resuming from checkpoint step 6' in out
  if damage == 'stale':
    assert 'checksum' in out, out
  assert os.path.isdir(os.path.join(run, ckpt_lib.CORRUPT_DIR, '9'))   # kept for inspection, not deleted
  assert result.resumed_from == 6
  _assert_same_params(jax.device_get(result.state.params), ref_params)
  assert _records(run) == _records(ref_dir)          # the log interval cut at step 6 continues where it was
  assert sorted(int(n) for n in os.listdir(ckpts)) == [3, 6, 9]


def test_no_readable_checkpoint_stops_naming_the_directory(reference, shapes_data_dir, tmp_path):
  run = _copy(reference[0], tmp_path)
  for step in (3, 6, 9):
    _truncate(os.path.join(run, 'checkpoints', str(step)))
  with pytest.raises(RuntimeError, match=r'no checkpoint in .*checkpoints reads back.*step 9.*step 6.*step 3'):
    trainer.train(_cfg(shapes_data_dir), run)
  assert sorted(os.listdir(os.path.join(run, ckpt_lib.CORRUPT_DIR))) == ['3', '6', '9']   # nothing deleted


def test_checkpoint_of_another_config_is_refused_and_left_alone(reference, shapes_data_dir, tmp_path):
  run = _copy(reference[0], tmp_path)
  cfg = _cfg(shapes_data_dir)
  cfg.model.lm.mlp_dim = 96
  with pytest.raises(ckpt_lib.IncompatibleCheckpointError, match=r'params/lm/layers_0/mlp/down_proj/kernel'):
    trainer.train(cfg, run)
  assert sorted(os.listdir(os.path.join(run, 'checkpoints'))) == ['3', '6', '9']
  assert not os.path.exists(os.path.join(run, ckpt_lib.CORRUPT_DIR))


def test_load_refuses_a_damaged_checkpoint(reference, tmp_path):
  import mmproj
  run = _copy(reference[0], tmp_path)
  _stale_state(os.path.join(run, 'checkpoints', '9'), os.path.join(run, 'checkpoints', '6'))
  with pytest.raises(ckpt_lib.CorruptCheckpointError, match=r'checkpoint step 9 in .*checkpoints: leaf '):
    mmproj.load(run)
  mmproj.load(os.path.join(run, 'checkpoints', '6'))  # the older step still loads


# ------------------------------------------------------------------------------------------------- NaN / Inf


def _poison_step(monkeypatch, bad_step: int):
  """The real loader, with one token id of batch `bad_step` set far outside the vocabulary: the embedding lookup
  yields NaN (jnp.take fills out-of-range rows with NaN), so that step's loss and gradients are NaN."""
  real = data_lib.train_loader

  def loader(*args, **kwargs):
    def poison(index, batch):
      if index + 1 == bad_step:
        batch = dict(batch, tokens=batch['tokens'].copy())
        batch['tokens'][0, 0] = 10 ** 6
      return batch
    return real(*args, **kwargs).map_with_index(poison)

  monkeypatch.setattr(data_lib, 'train_loader', loader)


def _restore(workdir, step, cfg):
  s = trainer.setup(cfg)
  manager = ckpt_lib.make_manager(workdir, cfg.checkpoint)
  try:
    return manager.restore(step, args=ckpt_lib.ocp.args.Composite(
        state=ckpt_lib.ocp.args.StandardRestore(s.abstract_state)))['state']
  finally:
    manager.close()


def test_nonfinite_step_is_skipped_and_counted(shapes_data_dir, tmp_path, monkeypatch, capsys):
  cfg = _cfg(shapes_data_dir, on_nonfinite='skip')
  cfg.train.steps = 6
  cfg.checkpoint.every = 1
  _poison_step(monkeypatch, 5)
  result = trainer.train(cfg, str(tmp_path))
  out = capsys.readouterr().out
  assert '1 step(s) up to step 6 had non-finite loss or gradients' in out, out
  assert int(result.state.nonfinite_steps) == 1 and int(result.state.step) == 6
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(result.state.params))
  s4, s5 = _restore(str(tmp_path), 4, cfg), _restore(str(tmp_path), 5, cfg)
  _assert_same_params(s4.params, s5.params)                      # step 5 applied no update
  _assert_same_params(s4.opt_state, s5.opt_state)
  assert any(not np.array_equal(np.asarray(a), np.asarray(b))   # step 6 did
             for a, b in zip(jax.tree.leaves(s5.params), jax.tree.leaves(result.state.params)))
  logged = {r['step']: r for r in _records(str(tmp_path))}
  assert logged[4]['nonfinite_steps'] == 0 and logged[6]['nonfinite_steps'] == 1


def test_nonfinite_step_stops_with_the_last_good_state_saved(shapes_data_dir, tmp_path, monkeypatch):
  cfg = _cfg(shapes_data_dir, on_nonfinite='stop')       # saves at 3, 6, 9; logs at 2, 4, 6
  _poison_step(monkeypatch, 5)
  with pytest.raises(trainer.NonFiniteError, match=r'at step 5 .*last good state \(step 4\) is saved in .*/4'):
    trainer.train(cfg, str(tmp_path))
  ckpts = os.path.join(tmp_path, 'checkpoints')
  assert sorted(int(n) for n in os.listdir(ckpts)) == [3, 4]
  with open(os.path.join(ckpts, '4', 'data', 'process_0-of-1.json')) as f:
    saved = json.load(f)                                    # {'parent': loader state, 'counter': poison's}
  assert saved['parent']['next_index'] == 4 and saved['counter'] == 4   # resuming reads batch 5 next
  good = _restore(str(tmp_path), 4, cfg)
  assert int(good.step) == 4 and int(good.nonfinite_steps) == 1 and int(good.halted_at) == 5

  skip_cfg = _cfg(shapes_data_dir, on_nonfinite='skip')  # the same 4 steps without a stop: the same params
  skip_cfg.train.steps = 9
  skip_cfg.checkpoint.every = 4
  result_dir = str(tmp_path / 'skip')
  trainer.train(skip_cfg, result_dir)
  _assert_same_params(good.params, _restore(result_dir, 4, skip_cfg).params)


def test_bad_nonfinite_policy_is_a_config_error(shapes_data_dir):
  with pytest.raises(ValueError, match='train.on_nonfinite'):
    trainer.setup(_cfg(shapes_data_dir, on_nonfinite='ignore'))


# ---------------------------------------------------------------------------------------------- SIGKILL


TINY_OVERRIDES = ['--config.baseline=none', '--config.model.encoder.width=32', '--config.model.encoder.depth=1',
                  '--config.model.encoder.num_heads=2', '--config.model.encoder.mlp_dim=64',
                  '--config.model.lm.width=32', '--config.model.lm.depth=1', '--config.model.lm.mlp_dim=64',
                  '--config.train.batch_size=16', '--config.train.warmup_steps=2', '--config.eval.batch_size=32',
                  '--config.eval.max_examples=32']


@pytest.mark.slow
def test_random_sigkills_including_during_saves_end_bitwise_equal(shapes_data_dir, tmp_path):
  """experiments/fault_injection.py: 3 SIGKILLs (one of each kind: during a save, after a step, at start-up),
  restarts, and the checks it makes: final params bitwise, metrics records, results.json, every complete
  checkpoint kept and equal."""
  workdir = tmp_path / 'faults'
  cmd = [sys.executable, 'experiments/fault_injection.py', '--workdir', str(workdir), '--kills', '3', '--seed', '1',
         'configs/quickstart.py:smoke', f'--config.data.data_dir={shapes_data_dir}', '--config.train.steps=32',
         '--config.checkpoint.every=4', '--config.log_every=3', *TINY_OVERRIDES]
  out = subprocess.run(cmd, cwd=REPO, env=python_env(), capture_output=True, text=True, timeout=900)
  report = json.loads((workdir / 'report.json').read_text()) if (workdir / 'report.json').exists() else None
  assert out.returncode == 0, (out.stdout[-4000:], out.stderr[-4000:])
  assert report['failures'] == [] and len(report['kills']) == 3, report
  assert {k['kind'] for k in report['kills']} == {'save', 'step', 'start'}, report
  assert report['kills_during_save'] >= 1 and report['resumes'] >= 1, report
  assert any(k['complete_steps_before'] for k in report['kills']), report   # a kill with checkpoints to lose
  assert report['final_checkpoint_steps'] == list(range(4, 33, 4)), report


# ------------------------------------------------------------------------------------------- bad records


@pytest.fixture(scope='module')
def corrupt_shapes_dir(shapes_data_dir, tmp_path_factory):
  """A copy of the smoke shapes data with every 8th train record's bytes cut in half (no longer parses)."""
  import glob

  from test_data_faults import _corrupt_record
  root = str(tmp_path_factory.mktemp('corrupt_shapes') / 'data')
  shutil.copytree(shapes_data_dir, root)
  files = glob.glob(os.path.join(root, '**', '*-train.array_record-*'), recursive=True)
  assert files
  from array_record.python import array_record_module
  for path in files:
    reader = array_record_module.ArrayRecordReader(path)
    n = reader.num_records()
    reader.close()
    for index in range(0, n, 8):
      _corrupt_record(path, index)
  return root


def test_trainer_skips_and_counts_bad_records_or_names_one(corrupt_shapes_dir, tmp_path, capsys):
  cfg = _cfg(corrupt_shapes_dir)
  cfg.checkpoint.every = 9
  with pytest.raises(ValueError, match=r'bad train record \d+ .*data.bad_records=error'):
    trainer.train(cfg, str(tmp_path / 'error'))
  cfg.data.bad_records = 'skip'
  result = trainer.train(cfg, str(tmp_path / 'skip'))
  out = capsys.readouterr().out
  counted = _records(str(tmp_path / 'skip'))[-1]['bad_records']
  assert 0 < counted < 9 * cfg.train.batch_size, counted
  assert f'{int(counted)} so far' in out and 'data.bad_records=skip' in out, out
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(result.state.params))
