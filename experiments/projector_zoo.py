"""Trains every projector zoo entry (configs/zoo.py:NAME) in the shapes world on one budget and compares them.

  pip install -e ".[experiments]"   # matplotlib, for the plot
  .venv/bin/python experiments/projector_zoo.py                       # all projectors, 400 steps each
  .venv/bin/python experiments/projector_zoo.py --steps 800 --only perceiver,qformer
  .venv/bin/python experiments/projector_zoo.py --variant smoke --out /tmp/zoo   # seconds per projector
  .venv/bin/python experiments/projector_zoo.py --dry-run             # the entries and commands; trains nothing

Each projector trains in its own subprocess (`python -m mmproj.main --config configs/zoo.py:NAME[,smoke]`) into
OUT/runs/proj_NAME/ (the config's name), with the same data, encoder, LM, optimiser, steps and batch
(config_lib.shapes_experiment); a finished run (results.json present) is not trained again, so an interrupted
sweep resumes. The blind baseline (same LM and budget, no image) is trained once. Writes OUT/projector_zoo.md
(table: accuracy per question family, output tokens M, projector parameters, median train-step time) and
OUT/projector_zoo.png (accuracy per family, one bar group per projector).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

FAMILIES = ('overall', 'existence', 'color', 'shape', 'count', 'position', 'relation')
ZOO = 'configs/zoo.py'


def _spec(name: str, variant: str) -> str:
  return f'{ZOO}:{name},{variant}' if variant else f'{ZOO}:{name}'


def _load(spec: str):
  from mmproj import config_lib
  return config_lib.load_config_file(os.path.join(REPO, spec))


def _train(spec: str, workdir: str, steps: int | None, blind: bool, dry_run: bool = False) -> float:
  """Runs one experiment unless its results.json exists; returns the wall seconds spent (0 when skipped)."""
  if os.path.exists(os.path.join(workdir, 'results.json')):
    return 0.0
  cmd = [sys.executable, '-m', 'mmproj.main', '--config', spec, '--workdir', workdir, '--config.baseline=none']
  if steps:
    cmd.append(f'--config.train.steps={steps}')
  if blind:
    cmd.append('--config.model.use_image=False')
  print('$', ' '.join(cmd[1:]), flush=True)
  if dry_run:
    return 0.0
  start = time.time()
  subprocess.run(cmd, check=True, cwd=REPO, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3'))
  return time.time() - start


def _step_seconds(workdir: str) -> float:
  """Median seconds per train step over the logged intervals, the first (compile) one excluded."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rates = [r['steps_per_sec'] for r in map(json.loads, f) if 'steps_per_sec' in r]
  rates = rates[1:] or rates
  return 1.0 / statistics.median(rates)


def _row(name: str, workdir: str, cfg) -> dict:
  from mmproj import model as model_lib
  with open(os.path.join(workdir, 'results.json')) as f:
    results = json.load(f)
  row = dict(name=name, accuracy=results['vqa_accuracy'], caption_loss=results['caption_loss'],
             step_ms=1000 * _step_seconds(workdir), tokens=0, params=0)
  if cfg.model.use_image:
    row['tokens'] = model_lib.num_image_tokens(cfg.model)
    row['params'] = model_lib.projector_param_count(cfg.model)  # gated_xattn: + its blocks under 'lm'
  return row


def _markdown(rows: list[dict], command: str, steps: int) -> str:
  head = ['projector', 'M', 'params'] + list(FAMILIES) + ['caption loss', 'step ms']
  lines = ['# Projector zoo: the shapes world, one budget', '',
           f'Command: `{command}`  ', f'Budget: {steps} steps per projector, identical data, encoder, LM and '
           'optimiser (mmproj/config_lib.py). Accuracy is exact match on the test split; M = visual tokens the '
           'LM reads; params = projector parameters (gated_xattn: its cross-attention blocks in the LM '
           'included); step ms = median train-step time on this machine (same run, same process count).', '',
           '| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for r in rows:
    cells = [r['name'], str(r['tokens']), f'{r["params"]:,}'] + [f'{100 * r["accuracy"][k]:.1f}' for k in FAMILIES]
    cells += [f'{r["caption_loss"]:.3f}', f'{r["step_ms"]:.0f}']
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def _plot(rows: list[dict], path: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  import numpy as np
  fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(rows) + 3), 4.5))
  width = 0.8 / len(FAMILIES)
  x = np.arange(len(rows))
  for i, family in enumerate(FAMILIES):
    ax.bar(x + (i - len(FAMILIES) / 2 + 0.5) * width, [100 * r['accuracy'][family] for r in rows], width,
           label=family)
  ax.set_xticks(x, [f'{r["name"]}\nM={r["tokens"]}' for r in rows], rotation=45, ha='right', fontsize=8)
  ax.set_ylabel('exact-match accuracy (%)')
  ax.set_ylim(0, 100)
  ax.legend(ncol=len(FAMILIES), fontsize=7, loc='upper center', bbox_to_anchor=(0.5, 1.12))
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--steps', type=int, default=400, help='train steps per projector (0 = the config\'s own)')
  parser.add_argument('--variant', default='', help="config variant ('' or 'smoke')")
  parser.add_argument('--only', default='', help=f'comma-separated zoo entry names (NAME in {ZOO}:NAME)')
  parser.add_argument('--out', default=os.path.join(REPO, 'experiments', 'results'))
  parser.add_argument('--no-blind', action='store_true', help='skip the blind baseline row')
  parser.add_argument('--dry-run', action='store_true', help='print the commands that would run; train nothing')
  args = parser.parse_args(argv)

  from configs import zoo  # its table's names; each config is built by config_lib.load_config_file (_load)
  from mmproj import config_lib
  if args.variant not in config_lib.VARIANTS:
    raise SystemExit(f'--variant: {args.variant!r} is not one of {config_lib.VARIANTS}')
  names = list(zoo.ZOO)
  if args.only:
    wanted = {n.strip() for n in args.only.split(',') if n.strip()}
    unknown = wanted - set(names)
    if unknown or not wanted:
      raise SystemExit(f'--only: no zoo entry {sorted(unknown)} in {ZOO} (entries: {", ".join(names)})')
    names = [n for n in names if n in wanted]
  runs = os.path.join(os.path.abspath(args.out), 'runs')
  rows = []
  for name in names:
    spec = _spec(name, args.variant)
    cfg = _load(spec)
    workdir = os.path.join(runs, cfg.name)   # proj_NAME, as the runs of earlier sweeps are named
    _train(spec, workdir, args.steps, blind=False, dry_run=args.dry_run)
    if not args.dry_run:
      rows.append(_row(name, workdir, cfg))
  if not args.no_blind:
    spec = _spec(names[0], args.variant)
    workdir = os.path.join(runs, 'blind')
    _train(spec, workdir, args.steps, blind=True, dry_run=args.dry_run)
    if not args.dry_run:
      cfg = _load(spec)
      cfg.model.use_image = False
      rows.append(_row('blind (no image)', workdir, cfg))
  if args.dry_run:
    return

  steps = args.steps or int(_load(_spec(names[0], args.variant)).train.steps)
  command = 'python experiments/projector_zoo.py ' + ' '.join(argv if argv is not None else sys.argv[1:])
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'projector_zoo.md'), 'w') as f:
    f.write(_markdown(rows, command.strip(), steps))
  _plot(rows, os.path.join(args.out, 'projector_zoo.png'))
  print(_markdown(rows, command.strip(), steps))


if __name__ == '__main__':
  main()
