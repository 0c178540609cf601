"""bfloat16 compute vs float32: the quickstart (configs/quickstart.py, image model only) trained at both
model.dtype settings over several seeds, accuracies side by side.

  .venv/bin/python experiments/bf16_quickstart.py                    # 3 seeds x 2 dtypes, 800 steps each (~40 min)
  .venv/bin/python experiments/bf16_quickstart.py --variant smoke --seeds 0,1 --out /tmp/bf16 --runs /tmp/bf16/runs
  .venv/bin/python experiments/bf16_quickstart.py --dry-run          # the commands; trains nothing

Each (dtype, seed) cell is one `python -m mmproj.main` run in RUNS/<dtype>_seed<N>/ with cfg.seed = N (the
init and the data order; the world itself is the same); a cell whose results.json exists is not run again, and an
interrupted one resumes from its checkpoint, so the experiment resumes where it stopped. Each cell's results.json
is copied to OUT/bf16_quickstart/<dtype>_seed<N>.json (small, committed) and OUT/bf16_quickstart.md is written
from those copies.

Verdict rule, fixed before the runs: with d = bf16 - float32 overall accuracy, paired by seed, and its 95%
t-interval over the seeds, bf16 is *within the margin* when the interval lies inside [-MARGIN, +MARGIN], *worse*
when it lies wholly below -MARGIN, *better* when wholly above +MARGIN, and *inconclusive* otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from sweep import interval  # noqa: E402  (experiments/sweep.py: mean and 95% t-interval)

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


def run_cell(spec: str, workdir: str, dtype: str, seed: int, dry_run: bool) -> None:
  if os.path.exists(os.path.join(workdir, 'results.json')):
    return
  cmd = [sys.executable, '-m', 'mmproj.main', '--config', spec, '--workdir', workdir, '--config.baseline=none',
         f'--config.model.dtype={dtype}', f'--config.seed={seed}']
  print('$', ' '.join(cmd[1:]), flush=True)
  if not dry_run:
    subprocess.run(cmd, check=True, cwd=REPO, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3'))


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


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--variant', default='', help="configs/quickstart.py variant ('' or 'smoke')")
  parser.add_argument('--seeds', default='0,1,2', help='comma-separated cfg.seed values')
  parser.add_argument('--out', default=os.path.join(REPO, 'experiments', 'results'), help='report + cell results')
  parser.add_argument('--runs', default=os.path.join(REPO, 'runs', 'bf16_quickstart'), help='the cells\' workdirs')
  parser.add_argument('--dry-run', action='store_true', help='print the commands that would run; train nothing')
  args = parser.parse_args(argv)
  seeds = [int(s) for s in args.seeds.split(',') if s.strip()]
  spec = 'configs/quickstart.py' + (f':{args.variant}' if args.variant else '')
  cells = os.path.join(args.out, 'bf16_quickstart')
  results: dict = {d: {} for d in DTYPES}
  for seed in seeds:
    for dtype in DTYPES:
      workdir = os.path.join(os.path.abspath(args.runs), f'{dtype}_seed{seed}')
      run_cell(spec, workdir, dtype, seed, args.dry_run)
      if args.dry_run:
        continue
      with open(os.path.join(workdir, 'results.json')) as f:
        results[dtype][seed] = json.load(f)
      os.makedirs(cells, exist_ok=True)
      with open(os.path.join(cells, f'{dtype}_seed{seed}.json'), 'w') as f:
        json.dump(results[dtype][seed], f, indent=2)
  if args.dry_run:
    return
  command = 'python experiments/bf16_quickstart.py ' + ' '.join(argv if argv is not None else sys.argv[1:])
  text = report(results, seeds, command.strip())
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'bf16_quickstart.md'), 'w') as f:
    f.write(text)
  print(text)


if __name__ == '__main__':
  main()
