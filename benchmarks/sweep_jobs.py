"""Does `experiments/sweep.py --jobs J` finish a CPU sweep sooner than one run at a time?

  python -m benchmarks.sweep_jobs                                  # configs/scenes.py:mlp, 2 runs of 150 steps
  python -m benchmarks.sweep_jobs --config configs/zoo.py:mlp --runs 4 --steps 100 --jobs 2

The same R runs (seeds 0..R-1 of CONFIG at STEPS steps, 64 evaluation examples, no baseline) go through the
sweep's runner twice, in fresh temporary workdirs: one at a time (each run's XLA uses every core) and J at a time
(each pinned to its share of the cores). Prints both wall times and their ratio: the whole run, compile and
evaluation included, as a sweep pays it. The machine is shared and noisy, so read the ratio, measured in one go.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import ml_collections

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'experiments'))
import sweep as sweep_tool  # noqa: E402


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--config', default='configs/scenes.py:mlp')
  p.add_argument('--runs', type=int, default=2)
  p.add_argument('--steps', type=int, default=150)
  p.add_argument('--jobs', type=int, default=2)
  args = p.parse_args(argv)
  sweep = ml_collections.ConfigDict(dict(name='jobs_bench', seeds=list(range(args.runs)), cells=[dict(
      name='cell', config=args.config, overrides={'baseline': 'none', 'train.steps': args.steps,
                                                  'eval.max_examples': 64, 'checkpoint.every': args.steps})]))
  walls = {}
  for jobs in (1, args.jobs):
    with tempfile.TemporaryDirectory() as work:
      runs = sweep_tool.runs_of(sweep, work)
      start = time.time()
      failures = sweep_tool.run_all(runs, jobs, log=lambda msg: None)
      walls[jobs] = time.time() - start
      if failures:
        raise SystemExit(f'sweep_jobs: runs failed at --jobs {jobs}: {failures}')
  print(f'{args.runs} runs of {args.config} at {args.steps} steps, {len(os.sched_getaffinity(0))} cores: '
        f'--jobs 1 {walls[1]:.0f} s, --jobs {args.jobs} {walls[args.jobs]:.0f} s, '
        f'ratio {walls[1] / walls[args.jobs]:.2f}x')
  return 0


if __name__ == '__main__':
  sys.exit(main())
