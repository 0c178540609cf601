"""`python -m benchmarks [--quick] [--only NAME] [--out BENCHMARKS.md]`: runs the benchmark sections and writes
the markdown report (see benchmarks/__init__.py).

Threads. Both frameworks get the same CPUs: the process pins itself to the first --threads CPUs of its affinity
mask (os.sched_setaffinity) and re-executes itself, so that XLA, whose CPU client sizes its thread pools from the
affinity mask when it starts (jax is already imported by `mmproj` by then), and PyTorch (torch.set_num_threads,
OMP_NUM_THREADS) both see exactly those CPUs. OMP_WAIT_POLICY=PASSIVE (unless set): PyTorch's OpenMP workers
otherwise spin after every parallel region, which on a shared machine starves XLA's threads in the interleaved
runs and makes even tiny torch ops wait tens of ms for their own spinning peers (measured: 44 ms vs 0.08 ms for a
64 x 64 matmul + backward on the 2-core development machine).

Memory. The re-exec also sets GLIBC_TUNABLES to benchmarks.host_malloc.REUSE unless it is set (empty: glibc's defaults),
as launch.sh does for every run on a CPU host: freed memory is reused instead of unmapped, so XLA's per-call
temporaries stop costing hundreds of thousands of page faults per call (benchmarks/host_malloc.py). transformers' process
runs under the same setting (it inherits the environment).

Isolation. Unless --in-process (or --quick), every projector row, the train-step section and the pipeline section
each run in a fresh child process (`--child`, same pinning and environment) that hands its rows back as JSON: a row
that allocates gigabytes per call (the perceiver, the train step) then runs on a fresh heap instead of after
every earlier row's arrays, executables and torch modules (BENCHMARKS.md's analysis has the figures). The
projector rows and the train step go further: one process per kernel setting of ours, each timed interleaved with
torch calls of its own, since two of our compiled programs alive in one process slow each other down
(BENCHMARKS.md). The train-step section also runs transformers' side in a process of its own
(benchmarks/train_step.py). The matmul and bandwidth peaks are measured once, in the parent.

The report keeps a hand-written block between `<!-- analysis -->` and `<!-- /analysis -->` of an existing output
file (it is copied into the new report), so an interpretation written after a run survives re-runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

from benchmarks import host_malloc

ENV_PINNED = 'MMPROJ_BENCH_PINNED'
ANALYSIS_BEGIN, ANALYSIS_END = '<!-- analysis -->', '<!-- /analysis -->'


def parse_args(argv: list[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog='python -m benchmarks', description=__doc__.split('\n\n')[0])
  p.add_argument('--quick', action='store_true', help='tiny shapes, 1 iteration: a smoke run (numbers meaningless)')
  p.add_argument('--only', default=None, help="run only sections / rows whose name contains this (e.g. 'qformer', "
                                              "'train_step', 'pipeline')")
  p.add_argument('--out', default='BENCHMARKS.md', help='markdown report to write (default BENCHMARKS.md)')
  p.add_argument('--iters', type=int, default=None, help='timed iterations per side (default 5; --quick 1)')
  p.add_argument('--step-iters', type=int, default=None, help='timed iterations of the full train step (default 3)')
  p.add_argument('--warmup', type=int, default=None, help='untimed iterations first (default 1; --quick 0)')
  p.add_argument('--threads', type=int, default=None,
                 help='CPU threads for both frameworks (default: min(2, CPUs available))')
  p.add_argument('--no-profile', action='store_true', help='do not profile the rows that miss a goal')
  p.add_argument('--data-dir', default=None, help='data dir of the pipeline section (default: the quickstart '
                                                  "config's; --quick: a temporary directory)")
  p.add_argument('--in-process', action='store_true',
                 help='run every section in this process (default: each projector row and each other section in a '
                      'fresh child process; --quick implies this)')
  p.add_argument('--isolate', action='store_true', help='child processes even with --quick')
  p.add_argument('--child', default=None, help=argparse.SUPPRESS)   # internal: JSON job file of a child process
  return p.parse_args(argv)


def pin_and_reexec(argv: list[str], threads: int, quick: bool = False) -> None:
  """Pins this process to `threads` CPUs and re-executes it once with the thread environment set (see the module
  docstring); returns only in the re-executed process. --quick also lowers XLA's backend optimisation level
  (compiles ~25% faster; a smoke run's timings mean nothing anyway) unless XLA_FLAGS already sets it."""
  if os.environ.get(ENV_PINNED) == '1':
    return
  env = dict(os.environ)
  env[ENV_PINNED] = '1'
  env.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
  host_malloc.with_reuse(env)
  for var in ('OMP_NUM_THREADS', 'MKL_NUM_THREADS'):
    env.setdefault(var, str(threads))
  if quick and 'xla_backend_optimization_level' not in env.get('XLA_FLAGS', ''):
    env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + ' --xla_backend_optimization_level=0').strip()
  if hasattr(os, 'sched_setaffinity'):
    cpus = sorted(os.sched_getaffinity(0))[:threads]
    os.sched_setaffinity(0, cpus)
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, '-m', 'benchmarks', *argv], env)


def _quiet() -> None:
  """Silences library chatter (TFDS progress bars, transformers config warnings) in the console log."""
  import logging
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  logging.getLogger('absl').setLevel(logging.ERROR)
  try:
    import transformers
    transformers.logging.set_verbosity_error()
  except ImportError:
    pass
  try:
    import tensorflow_datasets as tfds
    tfds.disable_progress_bar()
  except ImportError:
    pass


def xla_thread_count() -> int:
  """Threads of this process that XLA's CPU client started for intra-op work ('XLAEigen' in their name)."""
  n = 0
  try:
    for tid in os.listdir('/proc/self/task'):
      with open(f'/proc/self/task/{tid}/comm') as f:
        if 'XLAEigen' in f.read():
          n += 1
  except OSError:
    return -1
  return n


def _child_argv(opts, step_iters: int) -> list[str]:
  """The options a child process repeats (the thread environment and pinning are inherited)."""
  argv = ['--iters', str(opts.iters), '--warmup', str(opts.warmup), '--threads', str(opts.threads),
          '--step-iters', str(step_iters)]
  if opts.quick:
    argv.append('--quick')
  if not opts.profile:
    argv.append('--no-profile')
  if opts.data_dir:
    argv += ['--data-dir', opts.data_dir]
  return argv


def _json_default(o: Any) -> Any:
  return o.item() if hasattr(o, 'item') else str(o)


def run_in_child(unit: str, job: dict[str, Any], child_argv: list[str]) -> dict[str, Any]:
  """Runs one unit ('projectors/<case>', 'train_step' or 'pipeline') in a fresh `python -m benchmarks --child`
  process and returns what it wrote: {'row': ...} or {'section': ...}. A child that dies (killed for memory, a
  crash) raises RuntimeError naming the unit and its exit status."""
  with tempfile.TemporaryDirectory(prefix='mmproj-bench-child-') as tmp:
    job_path, out_path = os.path.join(tmp, 'job.json'), os.path.join(tmp, 'job.json.out')
    with open(job_path, 'w') as f:
      json.dump(dict(job, unit=unit), f, default=_json_default)
    sys.stdout.flush()
    proc = subprocess.run([sys.executable, '-m', 'benchmarks', *child_argv, '--child', job_path],
                          env=dict(os.environ), check=False)
    if proc.returncode != 0 or not os.path.exists(out_path):
      raise RuntimeError(f'bench child process for {unit!r} exited with status {proc.returncode}'
                         + (' (killed by signal %d)' % -proc.returncode if proc.returncode < 0 else ''))
    with open(out_path) as f:
      return json.load(f)


def child_main(opts, job_path: str, step_iters: int) -> int:
  """Child side of run_in_child: runs the job's unit with the parent's peaks and writes the result next to it."""
  import dataclasses

  import torch

  import benchmarks as bench

  with open(job_path) as f:
    job = json.load(f)
  unit, peaks = job['unit'], job['peaks']
  opts = dataclasses.replace(opts, settings=tuple(job.get('settings') or bench.SETTINGS))
  torch.set_num_threads(opts.threads)
  probe = bench.PeakProbe(opts.threads, size=256 if opts.quick else 1024)
  if unit.startswith('projectors/'):
    from benchmarks import projectors
    case = {c.name: c for c in projectors.CASES}[unit.split('/', 1)[1]]
    result = {'row': projectors.run_case(case, opts, peaks, probe).to_json()}
  elif unit == 'train_step':
    from benchmarks import train_step
    sec = train_step.run(dataclasses.replace(opts, iters=step_iters), peaks, probe)
    result = {'section': sec.to_json()}
  elif unit == 'pipeline':
    from benchmarks import pipeline
    result = {'section': pipeline.run(opts, peaks, job.get('consumers') or {}).to_json()}
  else:
    raise ValueError(f'unknown bench unit {unit!r}')
  with open(job_path + '.out', 'w') as f:
    json.dump(result, f, default=_json_default)
  return 0


def run_all(opts, *, step_iters: int, child_argv: list[str] | None = None) -> dict[str, Any]:
  """Runs the selected sections -> {'peaks', 'sections', 'info', ...} for `render`. child_argv: run each projector
  row and each other section in a child process started with these options (None: all in this process)."""
  import dataclasses

  import torch

  import benchmarks as bench

  torch.set_num_threads(opts.threads)
  info = bench.machine_info(opts.threads)
  window = 0.3 if opts.quick else 1.0
  info['others_start'] = bench.other_processes(window=window)
  opts.log(f'benchmarks: {info["cpu"]}, {len(info["affinity"] or [])} CPUs pinned, {opts.threads} threads, load '
           f'{info["load"][0]:.2f}; quick={opts.quick}')
  t0 = time.perf_counter()
  peaks = bench.matmul_peaks(opts.threads, size=256 if opts.quick else 1024, seconds=0.1 if opts.quick else 1.0)
  probe = bench.PeakProbe(opts.threads, size=256 if opts.quick else 1024)
  info['xla_threads'] = xla_thread_count()
  opts.log(f'peaks: XLA f32 matmul {peaks["xla_f32"] / 1e9:.1f} GFLOP/s, torch {peaks["torch_f32"] / 1e9:.1f} '
           f'GFLOP/s, XLA bandwidth {peaks["xla_bandwidth"] / 1e9:.1f} GB/s')
  sections = []
  loads = {'start': info['load']}
  if opts.wants('projectors') or any(opts.wants(f'projectors/{c}') for c in _case_names()):
    from benchmarks import projectors
    opts.log('== projectors')
    start = time.perf_counter()
    def row_in_child(name):      # one process per kernel setting (see the module docstring), rows merged
      return bench.merge_settings([
          bench.Row.from_json(run_in_child(f'projectors/{name}', {'peaks': peaks, 'settings': [k]},
                                           child_argv)['row']) for k in bench.SETTINGS])
    sec = projectors.run(opts, peaks, probe, run_row=row_in_child if child_argv is not None else None)
    sec.seconds = time.perf_counter() - start
    opts.log(f'  projectors: {sec.seconds:.0f} s')
    if sec.rows:
      sections.append(sec)
    loads['after projectors'] = bench.load_average()
  step_rate = {}
  if opts.wants('train_step') or opts.wants('train_step/llava_stage1'):
    from benchmarks import train_step
    opts.log('== train step')
    if child_argv is not None:
      sec = bench.merge_sections([
          bench.Section.from_json(run_in_child('train_step', {'peaks': peaks, 'settings': [k]},
                                               child_argv)['section']) for k in bench.SETTINGS])
    else:
      sec = train_step.run(dataclasses.replace(opts, iters=step_iters), peaks, probe)
    opts.log(f'  train step: {sec.seconds:.0f} s')
    if sec.rows:
      sections.append(sec)
      for row, setting in zip(sec.rows, bench.SETTINGS):     # one row per kernel setting, in SETTINGS order
        if 'ours (s)' in row.values and math.isfinite(row.values['ours (s)']):
          step_rate[setting] = int(str(row.values['batch x L']).split(' x ')[0]) / row.values['ours (s)']
    loads['after train step'] = bench.load_average()
  if opts.wants('pipeline') or opts.wants('pipeline/shapes') or opts.wants('pipeline/llava_json'):
    from benchmarks import pipeline
    opts.log('== pipeline')
    if child_argv is not None:
      job = {'peaks': peaks, 'consumers': step_rate}
      sec = bench.Section.from_json(run_in_child('pipeline', job, child_argv)['section'])
    else:
      sec = pipeline.run(opts, peaks, step_rate)
    opts.log(f'  pipeline: {sec.seconds:.0f} s')
    if sec.rows:
      sections.append(sec)
    loads['after pipeline'] = bench.load_average()
  info['others_end'] = bench.other_processes(window=window)
  info['loads'] = loads
  return {'peaks': peaks, 'sections': sections, 'info': info, 'seconds': time.perf_counter() - t0}


def _case_names() -> list[str]:
  from benchmarks.projectors import CASES
  return [c.name for c in CASES]


def _command(argv: list[str]) -> str:
  return ' '.join(['python -m benchmarks', *argv])


def render(result: dict[str, Any], argv: list[str], opts, analysis: str | None) -> str:
  """The markdown report."""
  import benchmarks as bench

  info, peaks = result['info'], result['peaks']
  out = ['# Benchmarks: mmproj vs the reference implementations', '']
  if opts.quick:
    out += ['**--quick smoke run: tiny shapes, one iteration. The numbers below are meaningless; run without '
            '--quick for the real benchmark.**', '']
  out += ['Generated by', '', '```', _command(argv), '```', '']
  load_lines = ', '.join(f'{k} {v[0]:.2f}' for k, v in info['loads'].items())
  out += ['## Machine and settings', '',
          f'- date: {info["date"]}; whole run {result["seconds"] / 60:.1f} min',
          f'- CPU: {info["cpu"]} ({info["cpu_flags"]}); {info["cores"]} logical CPUs, '
          f'{info.get("mem_gib", math.nan):.0f} GiB RAM ({info.get("mem_avail_gib", math.nan):.0f} GiB available at '
          'the start)',
          f'- threads: both frameworks pinned to CPUs {info["affinity"]} (os.sched_setaffinity, then re-exec, so '
          f'XLA sizes its pools from that mask: {info["xla_threads"]} XLAEigen threads seen); '
          f'torch.set_num_threads({info["threads"]}), OMP_NUM_THREADS={os.environ.get("OMP_NUM_THREADS", "unset")}, '
          f'OMP_WAIT_POLICY={os.environ.get("OMP_WAIT_POLICY", "unset")}, '
          f'{host_malloc.describe()}, transparent huge pages {info.get("thp", "unknown")}; why: '
          f'benchmarks/__main__.py; XLA_FLAGS='
          f'`{info["xla_flags"] or "(none)"}` (XLA CPU defaults: multi-threaded Eigen/YNNPACK kernels on that pool)',
          f'- processes: {info.get("isolation", "all sections in one process")} (why: benchmarks/__main__.py)',
          f'- measured at the start of the run: XLA f32 matmul {peaks["xla_f32"] / 1e9:.1f} GFLOP/s, PyTorch '
          f'({info.get("torch_blas", "?")}) f32 matmul {peaks["torch_f32"] / 1e9:.1f} GFLOP/s, XLA elementwise '
          f'bandwidth {peaks["xla_bandwidth"] / 1e9:.1f} GB/s (rooflines read against the peak sampled in the rows\' '
          'own timed rounds instead: column XLA peak GFLOP/s)',
          f'- versions: python {info["python"]}, jax {info["jax"]} / jaxlib {info["jaxlib"]}, flax {info["flax"]}, '
          f'torch {info["torch"]}, transformers {info["transformers"]}, grain {info["grain"]}',
          f'- load average (1 min): {load_lines}',
          '- the machine is shared with other engineers, so timings are noisy: every comparison is interleaved '
          '(ours / theirs / ours / ...) and reports the median; column spread = (max - min) / median of the timed '
          'iterations. Other busy processes (> 5% CPU) at the start and at the end of the run:']
  others = ([f'(start) {o}' for o in info.get('others_start', [])] +
            [f'(end) {o}' for o in info.get('others_end', [])])
  out += [f'  - `{o}`' for o in others] or ['  - none seen (the load above is this run\'s own)']
  out.append('')

  goals = [(row, g) for sec in result['sections'] for row in sec.rows for g in row.goals]
  out += ['## Goals', '',
          'From the issue: every projector >= 1.0x its reference in f32 and >= 0.85 of the matmul roofline where '
          'matmul-bound; attention-heavy projectors >= 1.3x; full train step >= 1.5x; pipeline >= 10x the step\'s '
          f'consumption. Judged on ours under the {bench.GOAL_SETTING} kernel setting (model.kernels '
          f'{bench.SETTINGS[bench.GOAL_SETTING]}); every row also reports the default, plain XLA '
          f'({bench.SETTINGS["xla"]}).', '']
  out.append(bench.markdown_table(['row', 'goal', 'measured', 'met'],
                                  [[row.name, g[0], g[1], 'met' if g[3] else '**missed**'] for row, g in goals]))
  met = sum(1 for _, g in goals if g[3])
  out += ['', f'{met} of {len(goals)} goals met.', '']

  for i, sec in enumerate(result['sections'], 1):
    out += [f'## {i}. {sec.title}', '']
    for p in sec.intro:
      out += [p, '']
    cols = [c for c in sec.columns if any(c in r.values for r in sec.rows)]
    out.append(bench.markdown_table(cols, [[r.values.get(c, '') for c in cols] for r in sec.rows]))
    out.append('')
    for r in sec.rows:
      if r.notes:
        out.append(f'- **{r.name}**')
        out += [f'  - {n}' for n in r.notes]
    for n in sec.notes:
      out.append(f'- {n}')
    out.append('')

  missed = [(row, g) for row, g in goals if not g[3]]
  out += ['## What limits the missed goals', '']
  if not missed:
    out += ['Every goal was met.', '']
  else:
    out += ['Per missed row, from the profile notes above (XLA op time by class from a jax.profiler trace of the '
            'compiled program; torch by torch.profiler self time; bounds = the same matmul FLOPs at the measured '
            'peak):', '']
    for row, g in missed:
      prof = [n for n in row.notes if n.startswith(('bounds', 'ours:', 'torch:', 'theirs:', 'profile'))]
      summary = f'{g[0]}: measured {bench.fmt(g[1])} (goal {bench.fmt(g[2])})'
      out.append(f'- **{row.name}** — {summary}' + (f'; {prof[0]} (more in the section\'s notes)' if prof else ''))
    out.append('')
  out += [ANALYSIS_BEGIN, analysis.strip() if analysis else '_(no hand-written analysis yet)_', ANALYSIS_END, '']
  return '\n'.join(out)


def read_analysis(path: str) -> str | None:
  """The hand-written block of an existing report, if any."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return None
  if ANALYSIS_BEGIN in text and ANALYSIS_END in text:
    block = text.split(ANALYSIS_BEGIN, 1)[1].split(ANALYSIS_END, 1)[0].strip()
    return None if block.startswith('_(no hand-written') else block
  return None


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  available = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
  threads = args.threads or min(2, available)
  pin_and_reexec(argv, threads, args.quick)
  _quiet()
  import benchmarks as bench

  opts = bench.Options(quick=args.quick, iters=args.iters or (1 if args.quick else 5),
                       warmup=args.warmup if args.warmup is not None else (0 if args.quick else 1),
                       only=args.only, threads=threads, profile=not args.no_profile and not args.quick,
                       data_dir=args.data_dir,
                       log=lambda s: print(s, flush=True))
  step_iters = args.step_iters or (1 if args.quick else 3)
  if args.child:
    return child_main(opts, args.child, step_iters)
  child_argv = None
  if args.isolate or not (args.in_process or args.quick):
    child_argv = _child_argv(opts, step_iters)
  result = run_all(opts, step_iters=step_iters, child_argv=child_argv)
  result['info']['isolation'] = ('each projector row and each other section in its own child process (the '
                                  'projector rows and the train step: one per kernel setting)'
                                 if child_argv is not None else 'all sections in one process')
  text = render(result, argv, opts, read_analysis(args.out))
  with open(args.out, 'w') as f:
    f.write(text)
  print(f'wrote {args.out} ({result["seconds"]:.0f} s)', flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
