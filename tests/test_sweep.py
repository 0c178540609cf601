"""experiments/sweep.py: the smoke sweep end to end (configs/sweeps/zoo.py:smoke at a few steps), skipping
finished runs and resuming an interrupted one, --print-commands, and collection with intervals on hand-made
results."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from experiment_utils import REPO, python_env

sys.path.insert(0, os.path.join(REPO, 'experiments'))
import sweep as sweep_tool  # noqa: E402

FAST = ['--set', 'train.steps=6', '--set', 'train.warmup_steps=2', '--set', 'checkpoint.every=3',
        '--set', 'log_every=3', '--set', 'eval.max_examples=16', '--set', 'eval.batch_size=16']


def _sweep(*args, timeout=300):
  out = subprocess.run([sys.executable, 'experiments/sweep.py', 'configs/sweeps/zoo.py:smoke', *args], cwd=REPO,
                       env=python_env(), capture_output=True, text=True, timeout=timeout)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-4000:]
  return out.stdout


def test_smoke_sweep_runs_resumes_skips_finished_runs_and_collects(stage0_smoke, tmp_path, capsys):
  recipe, _ = stage0_smoke
  work, out = tmp_path / 'sweep', tmp_path / 'results'
  common = ['--workdir', str(work), '--set', f'data.data_dir={recipe.data.data_dir}', '--set',
            f'stage0.cache_dir={recipe.cache_dir}', *FAST]
  first = _sweep(*common, '--out', str(out))
  assert 'sweep: 1 runs, 0 finished, 1 to run' in first and '[1/1] mlp seed 0 (0 done, 1 left)' in first
  assert (work / 'mlp' / 'seed0' / 'results.json').exists()
  table = (out / 'zoo_smoke.md').read_text()
  assert '| mlp | 36 | ' in table and ' | 1 | ' in table
  assert all((out / f'zoo_smoke_{kind}.png').stat().st_size > 0 for kind in ('accuracy', 'tokens', 'curves'))
  assert (out / 'zoo_smoke' / 'mlp' / 'seed0' / 'results.json').exists()          # the copies --collect reads

  # --print-commands: one launch.sh line per unfinished run, quoted for a shell.
  (work / 'mlp' / 'seed0' / 'results.json').unlink()     # as if killed after its last checkpoint, before evaluating
  assert sweep_tool.main(['configs/sweeps/zoo.py:smoke', *common[:2], '--print-commands', '--set',
                          'data.data_dir=/a dir']) == 0
  assert capsys.readouterr().out.splitlines() == [
      f"./launch.sh configs/scenes.py:mlp,smoke --workdir {work}/mlp/seed0 --config.seed=0 --config.baseline=none "
      "'--config.data.data_dir=/a dir'"]

  # The unfinished run goes again, resuming from its checkpoint; a finished one is skipped. With two cores or more,
  # at --jobs 2: the run is pinned to half of them, its output in its run.log.
  cores = sorted(os.sched_getaffinity(0))
  if len(cores) >= 2:
    groups = sweep_tool.core_groups(2, cores)
    second = _sweep(*common, '--out', str(out), '--jobs', '2')
    assert (f'sweep: 1 runs, 0 finished, 1 to run, 2 at a time (cores {",".join(map(str, groups[0]))} | '
            f'{",".join(map(str, groups[1]))};') in second
    assert 'Resuming from checkpoint step 6' in (work / 'mlp' / 'seed0' / 'run.log').read_text()
  else:
    second = _sweep(*common, '--out', str(out))
    assert 'sweep: 1 runs, 0 finished, 1 to run' in second and 'Resuming from checkpoint step 6' in second
  third = _sweep(*common, '--out', str(out))
  assert 'sweep: 1 runs, 1 finished, 0 to run' in third and 'workdir:' not in third   # nothing trained

  # --collect rebuilds the same table from the copies alone.
  shutil.rmtree(work)
  assert sweep_tool.main(['configs/sweeps/zoo.py:smoke', '--workdir', str(out / 'zoo_smoke'), '--collect',
                          '--out', str(tmp_path / 'again')]) == 0
  assert (tmp_path / 'again' / 'zoo_smoke.md').read_text().split('\n', 3)[3] == table.split('\n', 3)[3]


def test_core_groups_split_the_cores_between_concurrent_runs():
  assert sweep_tool.core_groups(2, [0, 1, 2, 3, 4]) == [[0, 2, 4], [1, 3]]
  assert sweep_tool.core_groups(1, [3, 5]) == [[3, 5]]
  with pytest.raises(ValueError, match='--jobs 3: between 1 and the 2 cores'):
    sweep_tool.core_groups(3, [0, 1])


def test_print_commands_covers_every_cell_and_seed(tmp_path, capsys):
  assert sweep_tool.main(['configs/sweeps/zoo.py', '--workdir', str(tmp_path), '--print-commands']) == 0
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 3 * 17 and lines[-1].endswith(
      f'--workdir {tmp_path}/blind/seed2 --config.seed=2 --config.baseline=none --config.model.use_image=False')


def test_collection_gives_means_and_intervals(tmp_path):
  """Hand-made results: cell a at 80/70/90% (mean 80, sd 10, t(2) = 4.303: ± 24.8), cell b one seed, the blind
  baseline at 50/50/60%: a - blind = 30/20/30 (mean 26.7, sd 5.77: ± 14.3, above 0)."""
  sweep = sweep_tool.load_sweep('configs/sweeps/zoo.py')
  sweep.name, sweep.seeds = 'handmade', [0, 1, 2]
  sweep.cells = [dict(name=n, config='configs/zoo.py:mlp') for n in ('a', 'b', 'blind')]
  runs = sweep_tool.runs_of(sweep, str(tmp_path / 'w'))
  values = {('a', 0): 0.8, ('a', 1): 0.7, ('a', 2): 0.9, ('b', 0): 0.5, ('blind', 0): 0.5, ('blind', 1): 0.5,
            ('blind', 2): 0.6}
  for r in runs:
    if (r.cell, r.seed) in values:
      os.makedirs(r.workdir)
      with open(os.path.join(r.workdir, 'results.json'), 'w') as f:
        json.dump({'vqa_accuracy': {'overall': values[r.cell, r.seed], 'color': 1.0},
                   'chance': {'overall': 0.25, 'color': 0.2}}, f)
  text = sweep_tool.collect(sweep, runs, str(tmp_path / 'out'), 'cmd')
  assert '| a |  |  | 3 | 80.0 ± 24.8 | 100.0 ± 0.0 |' in text
  assert '| b |  |  | 1 | 50.0 | 100.0 |' in text
  assert '| chance (most frequent answer) | | | | 25.0 | 20.0 |' in text
  assert '| a | 26.7 ± 14.3* | 0.0 ± 0.0 |' in text            # equal on colour: no mark
  assert '| b | 0.0 |' in text                                 # one seed: no interval, no mark
  assert sweep_tool.interval([1.0]) == (1.0, 0.0)
  mean, half = sweep_tool.interval([80.0, 70.0, 90.0])
  assert mean == pytest.approx(80.0) and half == pytest.approx(24.84, abs=0.01)
  assert 'Stage-0 towers' not in text                          # no run records its towers


def test_collection_names_the_stage0_weights_each_run_read(tmp_path):
  """results.json's 'stage0' (mmproj.stage0.provenance): one set of weights is stated once; runs that read
  different weights under one key, or recorded none, are named."""
  sweep = sweep_tool.load_sweep('configs/sweeps/zoo.py')
  sweep.name, sweep.seeds = 'handmade', [0, 1]
  sweep.cells = [dict(name=n, config='configs/scenes.py:mlp') for n in ('a', 'blind')]
  runs = sweep_tool.runs_of(sweep, str(tmp_path / 'w'))
  towers = {('a', 0): {'key': 'k1', 'vision': 'v1', 'lm': 'l1'}, ('a', 1): {'key': 'k1', 'vision': 'v1', 'lm': 'l1'},
            ('blind', 0): {'key': 'k1', 'lm': 'l1'}, ('blind', 1): {'key': 'k1', 'lm': 'l1'}}

  def write(towers):
    for r in runs:
      os.makedirs(r.workdir, exist_ok=True)
      results = {'vqa_accuracy': {'overall': 0.5}, **({'stage0': towers[r.cell, r.seed]} if towers[r.cell, r.seed]
                                                      else {})}
      with open(os.path.join(r.workdir, 'results.json'), 'w') as f:
        json.dump(results, f)
    return sweep_tool.markdown(sweep, sweep_tool.gather(sweep, runs), 'cmd')

  assert ("Stage-0 towers read (results.json's `stage0`; recipe key k1): vision weights `v1`: 2 runs; "
          'lm weights `l1`: 4 runs.\n') in write(towers)
  towers['a', 1] = {'key': 'k1', 'vision': 'v2', 'lm': 'l1'}
  towers['blind', 1] = None
  text = write(towers)
  assert ('vision weights `v1`: 1 runs (a 0); lm weights `l1`: 3 runs (a 0, a 1, blind 0); vision weights `v2`: '
          '1 runs (a 1); not recorded (run before results.json kept it): 1 runs (blind 1). One key can name '
          'different weights') in text
  assert text.index('Stage-0 towers') < text.index('| cell |')


def _sweep_file(tmp_path, cells: str) -> str:
  path = tmp_path / 'handmade_sweep.py'
  path.write_text(f'def get_config(arg=""):\n  import ml_collections\n  c = ml_collections.ConfigDict()\n'
                  f'  c.name, c.seeds = "handmade", [0]\n  c.cells = {cells}\n  return c\n')
  return str(path)


def test_a_run_that_starts_from_a_failed_run_is_not_run(tmp_path):
  """'{run:CELL}': the second cell waits for the first, which fails at once (an unknown config field), so the
  second does not run and the sweep exits 1 naming both."""
  spec = _sweep_file(tmp_path, "[dict(name='first', config='configs/scenes.py:mlp,smoke', overrides={'no_such': 1}),"
                               " dict(name='second', config='configs/scenes.py:mlp,smoke',"
                               " overrides={'init.projector': '{run:first}'})]")
  out = subprocess.run([sys.executable, 'experiments/sweep.py', spec, '--workdir', str(tmp_path / 'w')], cwd=REPO,
                       env=python_env(), capture_output=True, text=True, timeout=300)
  assert out.returncode == 1, out.stdout + out.stderr
  assert 'first/seed0 (exit status 1), second/seed0 (not run: it starts from a failed run)' in out.stderr
  assert not (tmp_path / 'w' / 'second').exists()
  settings = json.loads((tmp_path / 'w' / 'first' / 'seed0' / 'sweep_run.json').read_text())
  assert settings == {'config': 'configs/scenes.py:mlp,smoke', 'seed': 0, 'overrides': {'no_such': 1}}


def test_run_references_and_shared_workdirs_are_checked(tmp_path):
  bad = _sweep_file(tmp_path, "[dict(name='a', config='configs/scenes.py:mlp', overrides={'init.projector': "
                              "'{run:b}'})]")
  with pytest.raises(ValueError, match="override init.projector='{run:b}' names 'b', which is not another cell"):
    sweep_tool.load_sweep(bad)
  # Two sweeps giving one cell name different settings in one workdir.
  zoo = sweep_tool.load_sweep('configs/sweeps/zoo.py:smoke')
  other = sweep_tool.load_sweep('configs/sweeps/zoo.py:smoke')
  other.cells = [dict(other.cells[0], overrides={'baseline': 'none', 'train.steps': 7})]
  with pytest.raises(ValueError, match="both have cell 'mlp' .* with different settings; rename one of them"):
    sweep_tool.merge_runs([('zoo', sweep_tool.runs_of(zoo, str(tmp_path))),
                           ('other', sweep_tool.runs_of(other, str(tmp_path)))])
  # A run directory already holding a run of that name with other settings: refused before anything runs.
  runs = sweep_tool.runs_of(other, str(tmp_path / 'w'))
  os.makedirs(runs[0].workdir)
  with open(os.path.join(runs[0].workdir, sweep_tool.SETTINGS), 'w') as f:
    json.dump({'config': 'configs/scenes.py:mlp,smoke', 'seed': 0, 'overrides': {'baseline': 'none'}}, f)
  with pytest.raises(ValueError, match='holds a run of cell .mlp. with other settings'):
    sweep_tool.run_all(runs)


def test_continue_from_a_collected_store_counts_its_runs_finished_unless_a_later_stage_needs_them(tmp_path, capsys):
  """--continue-from: a fresh workdir takes the store's finished runs; a first stage whose second stage has no copy
  runs again (the second needs its checkpoint), and a first stage whose second stage has one does not."""
  spec = _sweep_file(tmp_path, "[dict(name='one', config='configs/scenes.py:mlp,smoke', overrides={}),"
                               " dict(name='stage1', config='configs/scenes.py:mlp,smoke', overrides={}),"
                               " dict(name='stage2', config='configs/scenes.py:mlp,smoke',"
                               " overrides={'init.projector': '{run:stage1}'})]")
  spec_text = open(spec).read().replace('c.seeds = "handmade", [0]', 'c.seeds = "handmade", [0, 1]')
  open(spec, 'w').write(spec_text)
  store = tmp_path / 'store'
  copies = {('one', 0), ('stage1', 0), ('stage1', 1), ('stage2', 1)}   # seed 0's stage2 did not finish
  for cell, seed in copies:
    d = store / cell / f'seed{seed}'
    d.mkdir(parents=True)
    (d / 'results.json').write_text(json.dumps({'vqa_accuracy': {'overall': 0.5}}))
    (d / 'metrics.jsonl').write_text('{"step": 1, "loss": 1.0}\n')
  work = tmp_path / 'work'
  assert sweep_tool.main([spec, '--workdir', str(work), '--continue-from', str(store), '--print-commands']) == 0
  printed = capsys.readouterr().out
  assert 'sweep: 3 runs finished elsewhere' in printed
  left = sorted(line.split('--workdir ')[1].split(' ')[0][len(str(work)) + 1:] for line in printed.splitlines()
                if 'launch.sh' in line)
  assert left == ['one/seed1', 'stage1/seed0', 'stage2/seed0']
  assert json.loads((work / 'stage2' / 'seed1' / 'results.json').read_text()) == {'vqa_accuracy': {'overall': 0.5}}
  assert (work / 'one' / 'seed0' / 'metrics.jsonl').exists() and not (work / 'stage1' / 'seed0').exists()
  # Runs already finished in the workdir are left as they are; a store that is not there is an error.
  assert sweep_tool.continue_from(sweep_tool.runs_of(sweep_tool.load_sweep(spec), str(work)), str(store)) == []
  with pytest.raises(SystemExit):
    sweep_tool.main([spec, '--workdir', str(work), '--continue-from', str(tmp_path / 'nowhere')])


def test_collection_names_the_stage0_generator_each_run_read(tmp_path):
  """results.json's 'stage0_generator' (mmproj.stage0_generator.provenance) is stated beside the towers, and runs
  that read another generator under the same key are named."""
  sweep = sweep_tool.load_sweep('configs/sweeps/draw.py')
  sweep.name, sweep.seeds = 'handmade', [0, 1]
  sweep.cells = [dict(name='a', config='configs/draw.py:mlp,align')]
  runs = sweep_tool.runs_of(sweep, str(tmp_path / 'w'))

  def write(generators):
    for r in runs:
      os.makedirs(r.workdir, exist_ok=True)
      with open(os.path.join(r.workdir, 'results.json'), 'w') as f:
        json.dump({'draw': {'pipeline': {'object': 0.5}, 'reference': {'object': 0.9}},
                   'stage0': {'key': 'k1', 'lm': 'l1'}, 'stage0_generator': generators[r.seed]}, f)
    rows = sweep_tool.gather(sweep, runs)
    return sweep_tool.weights_text(rows, *sweep_tool.PROVENANCE[1]), sweep_tool.markdown(sweep, rows, 'cmd')

  line, text = write({0: {'key': 'g1', 'generator': 'd1'}, 1: {'key': 'g1', 'generator': 'd1'}})
  assert line == ("Stage-0 generator read (results.json's `stage0_generator`; recipe key g1): "
                  'generator weights `d1`: 2 runs.')
  assert text.index('Stage-0 towers read') < text.index(line) < text.index('| cell |')
  line, _ = write({0: {'key': 'g1', 'generator': 'd1'}, 1: {'key': 'g1', 'generator': 'd2'}})
  assert 'generator weights `d1`: 1 runs (a 0); generator weights `d2`: 1 runs (a 1). One key can name' in line
