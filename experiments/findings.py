"""The published connector findings, tested on the scenes world: each finding's sweep (experiments/findings/e*.py)
collected, its claims decided by one verdict rule written before the runs, and experiments/results/findings.md
written with the tables, plots, verdicts and the commands that made them.

  python experiments/sweep.py experiments/findings/e*.py --workdir runs/findings --jobs 2   # every run, resumable
  python experiments/findings.py --workdir runs/findings                                   # collect and decide
  python experiments/findings.py --workdir experiments/results/findings                    # the same, from the copies
  python experiments/sweep.py experiments/findings/e*.py:smoke --workdir /tmp/findings     # the smoke grids
  python experiments/findings.py --smoke --workdir /tmp/findings --out /tmp/findings-out

The sweeps share one workdir, so a cell two findings use (E1's perceiver is also E2's M = 9 perceiver and E6's)
runs once. Collecting copies every finished run's results.json, config.json, metrics.jsonl and probe.json (E6:
experiments/connector_probe.py writes it) to OUT/findings/<cell>/seed<seed>/, from which the second command
rebuilds everything. The discussion of each finding (why it came out so) is written by hand, after its runs, in
experiments/findings/discussion.md under a '## E<k>' heading; the report puts it below the finding's verdicts.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, 'experiments')]

import connector_probe  # noqa: E402
import sweep as sweep_tool  # noqa: E402

FINDINGS = sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, 'experiments', 'findings', 'e*.py')))
DISCUSSION = os.path.join(REPO, 'experiments', 'findings', 'discussion.md')
SIMILAR_MARGIN = 5.0     # percentage points: 'similar' predicts |d| < this
PREDICTIONS = ('greater', 'similar')
STATISTICS = ('difference', 'range', 'spread')

RULE = f"""\
**Verdict rule** (fixed before any run; the same for every claim). A claim names a statistic d, computed per seed
in percentage points from runs that share that seed (the same data order and initialisation in every cell), and
the region it predicts for d: `greater` predicts d > 0, `similar` predicts |d| < {SIMILAR_MARGIN:g} points. Over
the seeds, d has a mean and a 95% t-interval (3 seeds: mean ± 4.30 s / sqrt 3). The finding **agrees** when the
whole interval lies inside the predicted region, **disagrees** when the whole interval lies outside it, and is
**inconclusive** otherwise. With fewer than two seeds there is no interval and no verdict. Statistics:
`difference` = mean accuracy of the cells in a - mean accuracy of the cells in b; `range` = the highest minus the
lowest of the cells; `spread` = the mean over connector types of (max - min over M) minus the mean over M of
(max - min over types). Accuracy is the mean over the claim's question families of the test-split exact-match
accuracy (E6: of the probe accuracy)."""


# ------------------------------------------------------------------------------------------------ the rule

def verdict(values: list[float], predict: str) -> tuple[float, float, str]:
  """(mean, half-width of the 95% t-interval, verdict) of a claim's per-seed statistic (percentage points)."""
  if predict not in PREDICTIONS:
    raise ValueError(f'predict={predict!r}: expected one of {PREDICTIONS}')
  if len(values) < 2:
    mean = float(np.mean(values)) if values else float('nan')
    return mean, float('nan'), 'no verdict (fewer than 2 seeds)'
  mean, half = sweep_tool.interval(values)
  lo, hi = mean - half, mean + half
  if predict == 'greater':
    inside, outside = lo > 0, hi <= 0
  else:
    inside, outside = -SIMILAR_MARGIN < lo and hi < SIMILAR_MARGIN, lo >= SIMILAR_MARGIN or hi <= -SIMILAR_MARGIN
  return mean, half, 'agrees' if inside else 'disagrees' if outside else 'inconclusive'


# ------------------------------------------------------------------------------------------------ statistics

def _read(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def run_scores(run: sweep_tool.Run, metric: str) -> dict[str, float] | None:
  """{family: accuracy in %} of a finished run: 'vqa' from its results.json, 'probe' from its probe.json."""
  if metric == 'vqa':
    return {k: 100 * v for k, v in _read(os.path.join(run.workdir, 'results.json'))['vqa_accuracy'].items()} \
        if run.done else None
  path = os.path.join(run.workdir, 'probe.json')
  return {k: 100 * v for k, v in _read(path)['accuracy'].items()} if os.path.exists(path) else None


def claim_values(claim: dict, runs: list[sweep_tool.Run], seeds: list[int]) -> dict[int, float]:
  """{seed: the claim's statistic} for every seed at which all the cells it reads have finished."""
  metric, families = claim.get('metric', 'vqa'), list(claim['families'])
  by_cell = {(r.cell, r.seed): r for r in runs}

  def score(cell: str, seed: int) -> float | None:
    r = by_cell.get((cell, seed))
    s = run_scores(r, metric) if r is not None else None
    if s is None:
      return None
    missing = [f for f in families if f not in s]
    if missing:
      raise ValueError(f'claim {claim["id"]}: {r.workdir} has no {metric} accuracy for {missing[0]!r}')
    return float(np.mean([s[f] for f in families]))

  out = {}
  for seed in seeds:
    if claim['statistic'] == 'difference':
      a, b = [score(c, seed) for c in claim['a']], [score(c, seed) for c in claim['b']]
      if None not in a + b:
        out[seed] = float(np.mean(a) - np.mean(b))
    elif claim['statistic'] == 'range':
      v = [score(c, seed) for c in claim['cells']]
      if None not in v:
        out[seed] = max(v) - min(v)
    elif claim['statistic'] == 'spread':
      grid = {(kind, int(m)): score(cell, seed) for kind, m, cell in claim['grid']}
      if None in grid.values():
        continue
      kinds, tokens = sorted({k for k, _ in grid}), sorted({m for _, m in grid})
      spread = lambda v: max(v) - min(v) if v else 0.0
      over_m = np.mean([spread([grid[k, m] for m in tokens if (k, m) in grid]) for k in kinds])
      over_type = np.mean([spread([grid[k, m] for k in kinds if (k, m) in grid]) for m in tokens])
      out[seed] = float(over_m - over_type)
    else:
      raise ValueError(f'claim {claim["id"]}: statistic {claim["statistic"]!r}; expected one of {STATISTICS}')
  return out


def claim_cells(claim: dict) -> list[str]:
  if claim['statistic'] == 'difference':
    return list(claim['a']) + list(claim['b'])
  if claim['statistic'] == 'range':
    return list(claim['cells'])
  return [cell for _, _, cell in claim['grid']]


def check_finding(spec: str, sweep) -> None:
  """ValueError naming the finding's file when a claim is malformed or reads a cell the sweep does not have."""
  names = {c['name'] for c in sweep.cells}
  for field in ('title', 'source', 'claims'):
    if field not in sweep:
      raise ValueError(f'{spec}: a finding needs {field!r}')
  for claim in sweep.claims:
    where = f'{spec}: claim {claim.get("id")}'
    if claim.get('statistic') not in STATISTICS or claim.get('predict') not in PREDICTIONS:
      raise ValueError(f'{where}: statistic must be one of {STATISTICS} and predict one of {PREDICTIONS}')
    unknown = [c for c in claim_cells(claim) if c not in names]
    if unknown:
      raise ValueError(f'{where} reads cell {unknown[0]!r}, which the sweep does not have')


def ensure_probes(sweep, runs: list[sweep_tool.Run], log=print) -> None:
  """Probes (experiments/connector_probe.py) every finished run a 'probe' claim reads that has no probe.json yet
  and still has its checkpoints (the copies under experiments/results/ keep probe.json, not checkpoints)."""
  cells = {c for claim in sweep.claims if claim.get('metric') == 'probe' for c in claim_cells(claim)}
  for r in runs:
    if (r.cell in cells and r.done and not os.path.exists(os.path.join(r.workdir, connector_probe.PROBE_FILE))
        and os.path.isdir(os.path.join(r.workdir, 'checkpoints'))):
      log(f'probing {r.workdir}')
      connector_probe.probe(r.workdir, log=log)


# ------------------------------------------------------------------------------------------------ the report

def _discussion() -> dict[str, str]:
  if not os.path.exists(DISCUSSION):
    return {}
  sections, key = {}, None
  with open(DISCUSSION) as f:
    for line in f:
      if line.startswith('## '):
        key = line[3:].split()[0]
        sections[key] = ''
      elif key:
        sections[key] += line
  return {k: v.strip() for k, v in sections.items()}


def verdict_plot(decided: list[dict], path: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 0.45 * len(decided) + 1.2))
  for i, d in enumerate(reversed(decided)):
    if d['predict'] == 'similar':
      ax.fill_betweenx([i - 0.4, i + 0.4], -SIMILAR_MARGIN, SIMILAR_MARGIN, color='tab:green', alpha=0.15, lw=0)
    else:
      ax.fill_betweenx([i - 0.4, i + 0.4], 0, max(SIMILAR_MARGIN, abs(d['mean']) + (d['half'] or 0) + 2),
                       color='tab:green', alpha=0.15, lw=0)
    color = {'agrees': 'tab:green', 'disagrees': 'tab:red'}.get(d['verdict'], 'tab:gray')
    ax.errorbar([d['mean']], [i], xerr=[0 if np.isnan(d['half']) else d['half']], fmt='o', color=color, capsize=3)
  ax.axvline(0, color='k', lw=0.5)
  ax.set_yticks(range(len(decided)), [d['id'] for d in reversed(decided)])
  ax.set_xlabel('statistic d (percentage points), mean and 95% interval over seeds; green: predicted region')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def report(workdir: str, out: str, smoke: bool = False, log=print) -> str:
  """Collects every finding's sweep from `workdir` into `out` and writes out/findings.md -> its text."""
  specs = [f + (':smoke' if smoke else '') for f in FINDINGS]
  sweeps = [(spec, sweep_tool.load_sweep(spec)) for spec in specs]
  for spec in FINDINGS:                        # the full grids: every claim reads cells its sweep has
    check_finding(spec, sweep_tool.load_sweep(spec))
  per_sweep = [(spec, sweep_tool.runs_of(sweep, workdir)) for spec, sweep in sweeps]
  sweep_tool.merge_runs(per_sweep)             # the sweeps agree on every shared cell
  name = 'findings' + '_smoke' * smoke
  inside = os.path.commonpath([REPO, os.path.abspath(workdir)]) == REPO
  workdir_text = os.path.relpath(workdir, REPO) if inside else workdir     # the commands as anyone re-runs them
  discussion = _discussion()
  decided, sections = [], []
  for (spec, sweep), (_, runs) in zip(sweeps, per_sweep):
    ensure_probes(sweep, runs, log)
    command = f'python experiments/sweep.py {spec} --workdir {workdir_text}'
    table = sweep_tool.collect(sweep, runs, out, command)
    finding = sweep.name.split('_')[0].upper()
    lines = [f'## {sweep.title}', '', f'Source: {sweep.source}.  ', f'Runs: `{command} --jobs 2`', '',
             table.split('\n', 3)[3].strip(), '', f'![{sweep.name}]({sweep.name}_accuracy.png)', '',
             '| claim | says | d (pp), mean ± 95% CI | seeds | predicted | verdict |', '|---|---|---|---|---|---|']
    for claim in sweep.claims:
      values = claim_values(claim, runs, list(sweep.seeds))
      mean, half, word = verdict(list(values.values()), claim['predict'])
      predicted = 'd > 0' if claim['predict'] == 'greater' else f'abs(d) < {SIMILAR_MARGIN:g}'
      shown = 'not run' if not values else f'{mean:+.1f}' + ('' if np.isnan(half) else f' ± {half:.1f}')
      lines.append(f'| {claim["id"]} | {claim["says"]} | {shown} | {len(values)} | {predicted} | **{word}** |')
      decided.append(dict(id=claim['id'], says=claim['says'], mean=mean, half=half, verdict=word, seeds=len(values),
                          predict=claim['predict'], finding=finding))
    lines += ['', discussion.get(finding, '_Discussion: written once the runs have finished._')]
    sections.append('\n'.join(lines))
  summary = ['| claim | says | d (pp) | seeds | verdict |', '|---|---|---|---|---|']
  for d in decided:
    shown = 'not run' if not d['seeds'] else f'{d["mean"]:+.1f}' + (
        '' if np.isnan(d['half']) else f' ± {d["half"]:.1f}')
    summary.append(f'| {d["id"]} | {d["says"]} | {shown} | {d["seeds"]} | {d["verdict"]} |')
  if any(d['seeds'] for d in decided):
    verdict_plot([d for d in decided if d['seeds']], os.path.join(out, f'{name}_verdicts.png'))
  every = "'experiments/findings/e*.py" + ':smoke' * smoke + "'"
  text = '\n'.join([
      '# Published connector findings, tested', '',
      'Each finding is a sweep over connectors trained between the stage-0 towers of the scenes world (a frozen '
      'SigLIP-shaped ViT and a text-pretrained LM; configs/scenes.py), LLaVA\'s way unless the finding is about '
      'the stages: stage 1 on captions with the LM frozen, stage 2 on questions with the LM trained '
      '(config_lib.llava_cells). The direction of each published claim is tested, not its values.', '',
      f'Every run: `python experiments/sweep.py {every} --workdir {workdir_text} --jobs 2`  ',
      f'This report: `python experiments/findings.py --workdir {workdir_text}{" --smoke" * smoke}`', '',
      RULE, '', '## Verdicts', '', *summary, '', f'![verdicts]({name}_verdicts.png)', '', '\n\n'.join(sections)]) + '\n'
  with open(os.path.join(out, f'{name}.md'), 'w') as f:
    f.write(text)
  log(f'wrote {os.path.join(out, name + ".md")}')
  return text


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--workdir', required=True, help='the findings sweeps\' shared workdir (or the copies)')
  p.add_argument('--out', default=os.path.join(REPO, 'experiments', 'results'))
  p.add_argument('--smoke', action='store_true', help='the sweeps\' smoke variants')
  args = p.parse_args(argv)
  report(os.path.abspath(args.workdir), os.path.abspath(args.out), args.smoke)
  return 0


if __name__ == '__main__':
  sys.exit(main())
