"""benchmarks: a --quick smoke run of every benchmark (tiny shapes, one iteration) writes a report with every row
and finite ratios; the timing, profiling and report helpers on small inputs."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import benchmarks as bench
from benchmarks import __main__ as bench_main
from benchmarks import projectors

torch = pytest.importorskip('torch')
pytest.importorskip('transformers')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tables(text: str) -> list[list[dict[str, str]]]:
  """Every markdown table of `text` as a list of {column: cell} rows."""
  tables, lines = [], text.splitlines()
  i = 0
  while i < len(lines):
    if lines[i].startswith('| ') and i + 1 < len(lines) and lines[i + 1].startswith('|---'):
      head = [c.strip() for c in lines[i].strip('|').split('|')]
      rows, i = [], i + 2
      while i < len(lines) and lines[i].startswith('| '):
        rows.append(dict(zip(head, (c.strip() for c in lines[i].strip('|').split('|')))))
        i += 1
      tables.append(rows)
    else:
      i += 1
  return tables


def _finite(cell: str) -> bool:
  try:
    return math.isfinite(float(cell))
  except ValueError:
    return False


def test_quick_run_writes_every_row(tmp_path):
  out = tmp_path / 'BENCH.md'
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('MMPROJ_BENCH_PINNED', None)
  proc = subprocess.run([sys.executable, '-m', 'benchmarks', '--quick', '--out', str(out)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  text = out.read_text()
  assert 'python -m benchmarks --quick' in text and '## Machine and settings' in text
  assert '--quick smoke run' in text
  tables = _tables(text)
  goals, proj, step, pipe = tables
  assert {r['projector'] for r in proj} == {c.name for c in projectors.CASES}
  for r in proj:                        # both kernel settings side by side, each checked against the reference
    for setting in bench.SETTINGS:
      assert _finite(r[f'ratio {setting}']) and float(r[f'ratio {setting}']) > 0, r
      assert _finite(r[f'{setting} (ms)']) and _finite(r[f'roofline {setting}']), r
    assert _finite(r['XLA peak GFLOP/s']), r
    errors = [float(x) for pair in r['parity (fwd / grad)'].split(', ') for x in pair.split(' / ')]
    assert len(errors) == 2 * len(bench.SETTINGS) and max(errors) <= projectors.PARITY_RTOL, r
  assert [r['step'] for r in step] == [f'stage 1 (projector trains), {k}' for k in bench.SETTINGS]
  assert all(_finite(r['ratio']) and _finite(r['roofline']) for r in step)
  for r in step:
    ours_loss, theirs_loss = (float(x) for x in r['loss (ours / theirs)'].split(' / '))
    assert abs(ours_loss - theirs_loss) <= 1e-3 * abs(theirs_loss)
  assert len(pipe) == 2 and all(_finite(r['loader ex/s']) for r in pipe)
  assert all(_finite(r[f'ratio {k}']) for r in pipe for k in bench.SETTINGS)
  # One goal line per judged goal (on the CPU-tuned setting), each met or missed.
  assert len(goals) == sum(1 if c.kind == 'memory' else 2 for c in projectors.CASES) + 1 + 2
  assert all(r['met'] in ('met', '**missed**') and bench.GOAL_SETTING in r['goal'] for r in goals)
  assert {r['row'] for r in goals} >= {f'projectors/{c.name}' for c in projectors.CASES} | {
      f'train_step/llava_stage1_{bench.GOAL_SETTING}', 'pipeline/shapes', 'pipeline/llava_json'}
  # A hand-written analysis block survives a re-render.
  analysis = 'The GEMM is the limit.'
  out.write_text(text.replace('_(no hand-written analysis yet)_', analysis))
  assert bench_main.read_analysis(str(out)) == analysis


def test_interleaved_alternates_and_excludes_warmup():
  calls = []
  times = bench.interleaved([('a', lambda: calls.append('a')), ('b', lambda: calls.append('b'))], iters=3,
                            warmup=1)
  assert calls == ['a', 'b'] * 4
  assert [len(v) for v in times.values()] == [3, 3]
  assert bench.median([3.0, 1.0, 2.0]) == 2.0 and bench.spread([1.0, 2.0, 3.0]) == 1.0
  assert math.isnan(bench.ratio(1.0, 0.0))


def test_profile_splits_matmul_from_the_rest():
  f = jax.jit(lambda a, b: jnp.sum(jnp.tanh(a @ b)) + jnp.sum(jnp.sin(a)))
  a = jnp.ones((256, 256))
  compiled = f.lower(a, a).compile()
  matmuls = bench.hlo_matmul_ops(compiled.as_text())
  assert matmuls, compiled.as_text()[:2000]
  p = bench.profile_jax(lambda: jax.block_until_ready(f(a, a)), compiled.as_text(), calls=2, flops=2 * 256 ** 3)
  assert p['classes'].get('matmul', 0) > 0 and p['wall_s'] > 0
  assert 'matmul' in bench.format_profile(p) and 'non-matmul' in bench.format_profile(p)
  names = bench.hlo_op_names(compiled.as_text())
  assert any('tanh' in v or 'sin' in v for v in names.values()), names
  x = torch.ones(64, 64, requires_grad=True)

  def step():
    x.grad = None
    (x @ x).sum().backward()

  t = bench.profile_torch(step, calls=1)
  assert t['classes'].get('matmul', 0) > 0


def test_converted_weights_do_not_alias_and_parity_is_checked():
  """A case builds a reference and its port that agree; a corrupted port is reported, not timed."""
  pair = projectors.llava_mlp(quick=True)
  ours = pair.flax_call(pair.params, {'x': jnp.asarray(pair.inputs['x'])})
  with torch.no_grad():
    ref = pair.torch_call({'x': torch.from_numpy(pair.inputs['x'])}).numpy()
  assert projectors._rel_err(ours, ref) <= projectors.PARITY_RTOL

  def broken(quick):
    p = projectors.llava_mlp(quick)
    p.params['linear_2']['bias'] = np.asarray(p.params['linear_2']['bias']) + 1.0
    return p

  case = projectors.Case('broken', 'LlavaMultiModalProjector', 'matmul', broken)
  peaks = {'xla_f32': 1e11, 'torch_f32': 1e11, 'xla_bandwidth': 1e10}
  row = projectors.run_case(case, bench.Options(quick=True, iters=1, warmup=0, log=lambda s: None), peaks)
  assert any('PARITY FAILED' in n for n in row.notes) and not row.goals[0][3]


def test_peak_probe_samples_every_round():
  probe = bench.PeakProbe(threads=1, size=64, calls=2)
  bench.interleaved([('x', lambda: None), ('peak', probe)], iters=3, warmup=1)
  assert len(probe.xla_samples) == 4 and probe.xla() > 0 and probe.torch() > 0
  probe.reset()
  assert math.isnan(probe.xla()) and probe.xla(default=1.0) == 1.0


def test_markdown_helpers():
  assert bench.fmt(float('nan')) == 'n/a' and bench.fmt(1.23456) == '1.23' and bench.fmt(0.5) == '0.5'
  table = bench.markdown_table(['a', 'b'], [[1.0, 'x|y']])
  assert table.splitlines()[2] == '| 1 | x/y |'
  assert bench.flop_str(2.5e12) == '2.5 TFLOP'
  opts = bench.Options(only='qformer')
  assert opts.wants('projectors/qformer') and not opts.wants('projectors/llava_mlp')
  assert bench.Options(only='pipeline').wants('pipeline/shapes')


def test_isolated_rows_run_in_child_processes(tmp_path):
  """The default (non --quick) mode: a projector row measured in a child process comes back through JSON intact;
  a child that fails becomes a FAILED row naming the unit, not a crash of the whole run."""
  out = tmp_path / 'BENCH.md'
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('MMPROJ_BENCH_PINNED', None)
  proc = subprocess.run([sys.executable, '-m', 'benchmarks', '--quick', '--isolate', '--only', 'llava_mlp',
                         '--out', str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  text = out.read_text()
  assert 'each projector row and each other section in its own child process' in text
  goals, proj = _tables(text)
  assert [r['projector'] for r in proj] == ['llava_mlp'] and _finite(proj[0][f'ratio {bench.GOAL_SETTING}'])
  assert float(proj[0]['parity (fwd / grad)'].split(' / ')[0]) <= projectors.PARITY_RTOL
  assert {r['row'] for r in goals} == {'projectors/llava_mlp'}
  with pytest.raises(RuntimeError, match="'projectors/no_such_case' exited with status 1"):
    bench_main.run_in_child('projectors/no_such_case', {'peaks': {}}, ['--quick'])


def test_rows_and_sections_survive_json():
  row = bench.Row('projectors/x', {'ratio': 1.5, 'ours (ms)': math.nan, 'shapes': 'x [2]'}, notes=['n'])
  row.goal('>= 1.0x reference (f32)', 1.5, 1.0)
  sec = bench.Section('projectors', 'T', ['ratio'], [row], ['intro'], ['note'], 3.0)
  back = bench.Section.from_json(json.loads(json.dumps(sec.to_json())))
  assert back.rows[0].goals == row.goals and back.rows[0].notes == ['n'] and back.title == 'T'
  assert math.isnan(back.rows[0].values['ours (ms)']) and back.rows[0].values['ratio'] == 1.5


def test_rows_of_one_setting_per_process_merge_into_one():
  """The full run measures each kernel setting in its own process: the rows merge into one, the goal setting's
  shared cells and goals kept, the other setting's own cells added, parity and spread joined in SETTINGS order."""
  other, goal = [k for k in bench.SETTINGS if k != bench.GOAL_SETTING][0], bench.GOAL_SETTING
  a = bench.Row('projectors/x', {'projector': 'x', f'{other} (ms)': 10.0, f'ratio {other}': 0.5, 'torch (ms)': 5.0,
                                 'parity (fwd / grad)': 'A', 'spread (ours / torch)': '1% / 2%'}, notes=['shared'])
  b = bench.Row('projectors/x', {'projector': 'x', f'{goal} (ms)': 4.0, f'ratio {goal}': 1.25, 'torch (ms)': 5.0,
                                 'parity (fwd / grad)': 'B', 'spread (ours / torch)': '3% / 4%'},
                notes=['shared', 'profile'])
  b.values['torch (ms)'] = 5.5
  b.goal('>= 1.0x reference', 1.25, 1.0)
  m = bench.merge_settings([a, b])
  order = list(bench.SETTINGS)
  assert m.values[f'{other} (ms)'] == 10.0 and m.values[f'ratio {goal}'] == 1.25
  assert m.values['torch (ms)'] == 5.5 and m.goals == b.goals and m.notes == ['shared', 'profile']
  parts = {other: ('A', '1% / 2%'), goal: ('B', '3% / 4%')}
  assert m.values['parity (fwd / grad)'] == ', '.join(parts[k][0] for k in order)
  assert m.values['spread (ours / torch)'] == ', '.join(parts[k][1] for k in order)
  s1 = bench.Section('train_step', 'T', ['ratio'], [a], ['intro'], ['n1'], 2.0)
  s2 = bench.Section('train_step', 'T', ['ratio'], [b], ['intro'], ['n1', 'n2'], 3.0)
  sec = bench.merge_sections([s1, s2])
  assert sec.rows == [a, b] and sec.notes == ['n1', 'n2'] and sec.seconds == 5.0 and sec.intro == ['intro']


def test_diagnose_commands_measure_on_tiny_shapes():
  from benchmarks import diagnose
  forms = diagnose.matmul_forms(quick=True)
  assert {form for _, form, _ in forms} == {'y = x W', 'dx = dy W^T', 'dW = x^T dy', 'dW = copy(x^T) dy'}
  assert all(rate > 0 and math.isfinite(rate) for _, _, rate in forms)
  rows, fixed, per_row, row_rate, read = diagnose.matmul_tokens(quick=True)
  assert [t for t, _, _ in rows] == [8, 16, 32] and all(sec > 0 and rate > 0 for _, sec, rate in rows)
  assert all(map(math.isfinite, (fixed, per_row, row_rate))) and read > 0   # tiny shapes: the fit's sign is noise
  calls = diagnose.faults_child(2, quick=True)
  assert len(calls) == 2 and all(c['wall'] > 0 and c['minflt'] >= 0 for c in calls)
