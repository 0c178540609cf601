"""bfloat16 compute vs float32: the quickstart (configs/quickstart.py, image model only) trained at both
model.dtype settings over several seeds, accuracies side by side.

  .venv/bin/python experiments/bf16_quickstart.py                    # 3 seeds x 2 dtypes, 800 steps each (~40 min)
  .venv/bin/python experiments/bf16_quickstart.py --variant smoke --out /tmp/bf16 --runs /tmp/bf16/runs
  .venv/bin/python experiments/bf16_quickstart.py --runs experiments/results/bf16_quickstart   # the report again
  .venv/bin/python experiments/bf16_quickstart.py --dry-run          # the commands; trains nothing

The runs are the sweep configs/sweeps/bf16_quickstart.py (experiments/sweep.py: RUNS/<dtype>/seed<N>/, cfg.seed = N
for the init and the data order, the world itself the same; finished runs are skipped, interrupted ones resume).
Their small files are copied to OUT/bf16_quickstart/<dtype>/seed<N>/ and OUT/bf16_quickstart.md is written.

Verdict rule, fixed before the runs: with d = bf16 - float32 overall accuracy, paired by seed, and its 95%
t-interval over the seeds, bf16 is *within the margin* when the interval lies inside [-MARGIN, +MARGIN], *worse*
when it lies wholly below -MARGIN, *better* when wholly above +MARGIN, and *inconclusive* otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import sweep  # noqa: E402  (experiments/sweep.py)
from sweep import interval  # noqa: E402

DTYPES = ('float32', 'bfloat16')
FAMILIES = ('overall', 'existence', 'color', 'shape', 'count', 'position', 'relation')
MARGIN = 3.0   # percentage points of overall accuracy


def verdict(low: float, high: float, seeds: int, margin: float = MARGIN) -> str:
  if seeds < 2:
    return 'none: one seed gives no interval'
  if -margin <= low and high <= margin:
    return 'within the margin'
  if high < -margin:
    return 'worse'
  if low > margin:
    return 'better'
  return 'inconclusive'


def report(results: dict, seeds: list[int], command: str) -> str:
  """results[dtype][seed] = results.json -> the markdown report."""
  lines = ['# bfloat16 compute vs float32: the quickstart', '',
           f'Command: `{command}`  ',
           f'Seeds: {", ".join(map(str, seeds))} (cfg.seed: init and data order). Exact-match accuracy (%) on the '
           'test split, mean ± 95% t-interval over the seeds; d = bf16 - float32, paired by seed.', '',
           f'Verdict rule (fixed before the runs): bf16 is within the margin when the 95% interval of d(overall) '
           f'lies inside ±{MARGIN:g} points, worse when it lies wholly below -{MARGIN:g}, better when wholly above '
           f'+{MARGIN:g}, inconclusive otherwise.', '',
           '| family | float32 | bfloat16 | d = bf16 - f32 |', '|---|---|---|---|']
  for family in FAMILIES:
    cells = []
    for dtype in DTYPES:
      mean, half = interval([100 * results[dtype][s]['vqa_accuracy'][family] for s in seeds])
      cells.append(f'{mean:.1f} ± {half:.1f}')
    mean, half = interval([100 * (results['bfloat16'][s]['vqa_accuracy'][family]
                                  - results['float32'][s]['vqa_accuracy'][family]) for s in seeds])
    cells.append(f'{mean:+.1f} ± {half:.1f}')
    lines.append(f'| {family} | ' + ' | '.join(cells) + ' |')
  for key, name in (('caption_loss', 'caption loss'), ('train_seconds', 'train seconds')):
    cells = [f'{interval([results[d][s][key] for s in seeds])[0]:.3g}' for d in DTYPES]
    lines.append(f'| {name} (mean) | ' + ' | '.join(cells) + ' | |')
  mean, half = interval([100 * (results['bfloat16'][s]['vqa_accuracy']['overall']
                                - results['float32'][s]['vqa_accuracy']['overall']) for s in seeds])
  lines += ['', 'Per seed (overall, f32 / bf16): ' + ', '.join(
      f'seed {s}: {100 * results["float32"][s]["vqa_accuracy"]["overall"]:.1f} / '
      f'{100 * results["bfloat16"][s]["vqa_accuracy"]["overall"]:.1f}' for s in seeds), '',
      f'**Verdict: {verdict(mean - half, mean + half, len(seeds))}** (d(overall) = {mean:+.1f} ± {half:.1f} points, '
      f'interval [{mean - half:+.1f}, {mean + half:+.1f}], margin ±{MARGIN:g}).']
  return '\n'.join(lines) + '\n'


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--variant', default='', help="the sweep's variant ('' or 'smoke')")
  parser.add_argument('--out', default=os.path.join(REPO, 'experiments', 'results'), help='report + run copies')
  parser.add_argument('--runs', default=os.path.join(REPO, 'runs', 'bf16_quickstart'), help='the runs\' workdirs')
  parser.add_argument('--dry-run', action='store_true', help='print the commands that would run; train nothing')
  args = parser.parse_args(argv)
  spec = 'configs/sweeps/bf16_quickstart.py' + (f':{args.variant}' if args.variant else '')
  config = sweep.load_sweep(spec)
  runs = sweep.runs_of(config, args.runs)
  if args.dry_run:
    sweep.print_commands(runs)
    return 0
  failures = sweep.run_all(runs)
  if failures:
    print(f'bf16_quickstart: {len(failures)} run(s) failed: {", ".join(failures)}', file=sys.stderr)
    return 1
  sweep.gather(config, runs, copy_to=os.path.join(args.out, 'bf16_quickstart'))
  results: dict = {d: {} for d in DTYPES}
  for r in runs:
    with open(os.path.join(r.workdir, 'results.json')) as f:
      results[r.cell][r.seed] = json.load(f)
  command = 'python experiments/bf16_quickstart.py ' + ' '.join(argv if argv is not None else sys.argv[1:])
  text = report(results, list(config.seeds), command.strip())
  with open(os.path.join(args.out, 'bf16_quickstart.md'), 'w') as f:
    f.write(text)
  print(text)
  return 0


if __name__ == '__main__':
  sys.exit(main())
