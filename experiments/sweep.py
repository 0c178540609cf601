"""Sweeps: one experiment config run over a list of cells x seeds, each run an ordinary experiment in its own
workdir, and the runs' results collected into tables with intervals and plots.

  python experiments/sweep.py configs/sweeps/zoo.py --workdir runs/sweeps/zoo                   # run, resumable
  python experiments/sweep.py configs/sweeps/zoo.py:smoke --workdir /tmp/zoo                     # the smoke grid
  python experiments/sweep.py configs/sweeps/zoo.py --workdir runs/sweeps/zoo --print-commands   # for a scheduler
  python experiments/sweep.py configs/sweeps/zoo.py --workdir runs/sweeps/zoo --collect --out experiments/results

A sweep config is a small config file (configs/sweeps/, experiments/findings/) whose get_config returns `name`,
`seeds` and `cells`: each cell a dict {name, config: 'configs/X.py[:ARG]', overrides: {field: value}}
(config_lib.sweep_cells builds a grid of them). Run r = (cell, seed) trains in WORKDIR/<cell>/seed<seed>/ as
`python -m mmproj.main --config CONFIG --workdir ... --config.seed=SEED --config.FIELD=VALUE ...`. A run whose
results.json exists is skipped; an interrupted one resumes from its own checkpoint (the trainer's resume), so
re-running the sweep command continues it.

A run may start from another cell's run of the same seed: an override value '{run:CELL}' is that run's workdir
(e.g. overrides={'init.projector': '{run:mlp_align}'} for a second training stage); the run waits until that one
has finished, and does not run if it failed. Several sweep configs may be given at once: runs with the same
workdir are one run (they must have the same settings), so sweeps sharing a workdir share their common cells. Each
run's settings are kept in its sweep_run.json, and a sweep whose cell of the same name has other settings stops
before running anything. Progress is printed before each run: runs done / left and the ETA from this invocation's
mean run time. A run that fails is reported and the sweep goes on; the command then exits with status 1, naming
the failures.
--jobs N runs N at once on a CPU host, each pinned to its own share of the cores (its output then goes to
<workdir>/run.log): small models use two cores poorly, so two one-core runs finish sooner than two two-core runs
in turn (python -m benchmarks.sweep_jobs measures the ratio).

--print-commands prints one `./launch.sh` line per run not yet finished (a SLURM array or any queue can run them;
`--collect` afterwards is the same); runs that start from others come after them, in waves headed by a '# wave K'
comment line (a scheduler starts wave K + 1 when wave K has finished).

--collect reads every finished run's results.json and metrics.jsonl, copies them (small, with config.json and an
E6 probe.json) to OUT/<store>/<cell>/seed<seed>/ (store: the config's `store`, else its name) so that
`--collect --workdir OUT/<store>` rebuilds everything from the copies, and writes OUT/<name>.md (per cell and
question family: mean and 95% t-interval over the seeds, visual tokens M, seeds finished) and three plots:
OUT/<name>_accuracy.png (accuracy per family per cell, with the intervals), OUT/<name>_tokens.png (overall accuracy
against visual tokens) and OUT/<name>_curves.png (training loss against step, mean over seeds, per cell).

--continue-from OUT/<store> goes on with a sweep on another machine (a fresh clone, a new cluster allocation): every
unfinished run whose collected copy is there counts as finished, its files copied into the workdir, except a run
that an unfinished run starts from (that one needs the run's checkpoint, which the copies do not hold: it runs
again). Then only the runs nobody has finished run.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks import host_malloc  # noqa: E402  (after the path: the sweep runs as a script)


@dataclasses.dataclass(frozen=True)
class Run:
  cell: str
  seed: int
  config: str
  overrides: tuple[tuple[str, Any], ...]
  workdir: str
  needs: tuple[str, ...] = ()     # workdirs of the runs this one starts from ('{run:CELL}' overrides)

  @property
  def done(self) -> bool:
    return os.path.exists(os.path.join(self.workdir, 'results.json'))

  def args(self) -> list[str]:
    return ['--workdir', self.workdir, f'--config.seed={self.seed}'] + [
        f'--config.{field}={_literal(value)}' for field, value in self.overrides]


def _literal(value: Any) -> str:
  """A value as mmproj.main parses it back (config_lib.load_config_file: a Python literal, else a string)."""
  return value if isinstance(value, str) else repr(value)


def load_sweep(spec: str):
  from mmproj import config_lib
  sweep = config_lib.load_config_file(spec if os.path.isabs(spec) else os.path.join(REPO, spec))
  for field in ('name', 'seeds', 'cells'):
    if field not in sweep:
      raise ValueError(f'{spec}: a sweep config needs {field!r} (name, seeds, cells)')
  names = [c['name'] for c in sweep.cells]
  if len(set(names)) != len(names) or any('/' in n for n in names):
    raise ValueError(f'{spec}: cell names must be unique and contain no "/": {names}')
  for c in sweep.cells:
    for field, value in dict(c.get('overrides') or {}).items():
      for needed in RUN_REF.findall(value) if isinstance(value, str) else ():
        if needed not in names or needed == c['name']:
          raise ValueError(f'{spec}: cell {c["name"]!r} override {field}={value!r} names {needed!r}, which is not '
                           f'another cell of this sweep ({names})')
  return sweep


RUN_REF = re.compile(r'\{run:([^}]+)\}')   # '{run:CELL}' in an override value: CELL's run of the same seed


def runs_of(sweep, workdir: str, extra: dict[str, Any] | None = None) -> list[Run]:
  """Every (cell, seed) of a sweep, seeds outermost: a sweep stopped part-way has whole seeds of every cell.
  `extra` overrides every run (--set)."""
  workdir = os.path.abspath(workdir)
  where = lambda cell, seed: os.path.join(workdir, cell, f'seed{int(seed)}')
  runs = []
  for seed in sweep.seeds:
    for c in sweep.cells:
      overrides, needs = {**dict(c.get('overrides') or {}), **(extra or {})}, []
      for field, value in overrides.items():
        if isinstance(value, str) and RUN_REF.search(value):
          needs += [where(cell, seed) for cell in RUN_REF.findall(value)]
          overrides[field] = RUN_REF.sub(lambda m: where(m.group(1), seed), value)
      runs.append(Run(cell=c['name'], seed=int(seed), config=c['config'], overrides=tuple(sorted(overrides.items())),
                      workdir=where(c['name'], seed), needs=tuple(needs)))
  return runs


def merge_runs(groups: list[tuple[str, list[Run]]]) -> list[Run]:
  """The runs of several sweeps (spec, runs) as one list, each workdir once; ValueError when two sweeps give one
  workdir different settings."""
  merged: dict[str, tuple[str, Run]] = {}
  for spec, runs in groups:
    for r in runs:
      if r.workdir in merged and merged[r.workdir][1] != r:
        raise ValueError(f'{spec} and {merged[r.workdir][0]} both have cell {r.cell!r} (seed {r.seed}, '
                         f'{r.workdir}) with different settings; rename one of them')
      merged.setdefault(r.workdir, (spec, r))
  return [r for _, r in merged.values()]


SETTINGS = 'sweep_run.json'   # a run's config, seed and overrides, written when it starts


def _settings(r: Run) -> dict:
  return {'config': r.config, 'seed': r.seed, 'overrides': {k: v for k, v in r.overrides}}


def check_settings(runs: list[Run]) -> None:
  """ValueError, before anything runs, for a run whose directory holds a run with other settings."""
  for r in runs:
    path = os.path.join(r.workdir, SETTINGS)
    if os.path.exists(path):
      theirs = _read_json(path)
      if theirs != json.loads(json.dumps(_settings(r))):
        raise ValueError(f'{path}: this directory holds a run of cell {r.cell!r} with other settings ({theirs}) '
                         f'than the sweep\'s ({_settings(r)}); give the sweep another --workdir or rename the cell')


COPIED = ('results.json', 'config.json', 'metrics.jsonl', 'probe.json')   # what --collect keeps of a finished run


def continue_from(runs: list[Run], store: str, log=print) -> list[Run]:
  """Copies the collected files of store/<cell>/seed<seed>/ into the workdirs of the unfinished runs that have them,
  so that they count as finished, except runs another unfinished run starts from -> the runs so continued."""
  copied = {r.workdir: r for r in runs if not r.done and os.path.exists(os.path.join(store, r.cell,
                                                                                      f'seed{r.seed}', 'results.json'))}
  changed = True
  while changed:   # a run stays behind when a run that will train starts from it
    training = [r for r in runs if not r.done and r.workdir not in copied]
    needed = {n for r in training for n in r.needs}
    changed = bool(needed & set(copied))
    for workdir in needed & set(copied):
      del copied[workdir]
  for r in copied.values():
    os.makedirs(r.workdir, exist_ok=True)
    for name in COPIED:
      src = os.path.join(store, r.cell, f'seed{r.seed}', name)
      if os.path.exists(src):
        shutil.copyfile(src, os.path.join(r.workdir, name))
  if copied:
    log(f'sweep: {len(copied)} runs finished elsewhere, copied from {store}')
  return list(copied.values())


def _duration(seconds: float) -> str:
  s = int(seconds)
  return f'{s // 3600}h{s // 60 % 60:02d}m' if s >= 3600 else f'{s // 60}m{s % 60:02d}s'


def core_groups(jobs: int, cores: list[int]) -> list[list[int]]:
  """The host's cores split into `jobs` disjoint groups, one per concurrent run (their sizes differ by one at most)."""
  if not 1 <= jobs <= len(cores):
    raise ValueError(f'--jobs {jobs}: between 1 and the {len(cores)} cores this process may use')
  return [cores[i::jobs] for i in range(jobs)]


def _start(r: Run, cores: list[int] | None) -> subprocess.Popen:
  """Starts one run in its own process; with `cores` (--jobs > 1) pinned to them, its output to <workdir>/run.log."""
  cmd = [sys.executable, '-m', 'mmproj.main', '--config', r.config] + r.args()
  os.makedirs(r.workdir, exist_ok=True)
  with open(os.path.join(r.workdir, SETTINGS), 'w') as f:
    json.dump(_settings(r), f, indent=1)
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
  if not host_malloc.accelerator_host():     # as ./launch.sh does: XLA CPU steps reuse freed memory
    host_malloc.with_reuse(env)
  if cores is None:
    return subprocess.Popen(cmd, cwd=REPO, env=env)
  with open(os.path.join(r.workdir, 'run.log'), 'a') as out:   # XLA sizes its thread pool from the affinity
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: os.sched_setaffinity(0, cores))


def run_all(runs: list[Run], jobs: int = 1, log=print) -> list[str]:
  """Runs every unfinished run (each its own process), `jobs` at a time -> the names of those that failed."""
  if jobs > 1 and host_malloc.accelerator_host():
    raise ValueError(f'--jobs {jobs} splits CPU cores between runs; on a GPU/TPU host run one at a time, or give '
                     '--print-commands lines to a scheduler')
  groups = core_groups(jobs, sorted(os.sched_getaffinity(0))) if jobs > 1 else [None]
  check_settings(runs)
  pending = [r for r in runs if not r.done]
  log(f'sweep: {len(runs)} runs, {len(runs) - len(pending)} finished, {len(pending)} to run'
      + (f', {jobs} at a time (cores {" | ".join(",".join(map(str, g)) for g in groups)}; output in each run\'s '
         'run.log)' if jobs > 1 else ''))
  failures, running, finished, start = [], {}, 0, time.time()    # running: slot -> (run, process)
  failed: set[str] = set()                                          # workdirs of failed runs
  queue = list(pending)
  while queue or running:
    for r in [r for r in queue if failed & set(r.needs)]:          # starts from a failed run: cannot run
      queue.remove(r)
      finished += 1
      failures.append(f'{r.cell}/seed{r.seed} (not run: it starts from a failed run)')
      failed.add(r.workdir)
      log(f'sweep: {r.cell} seed {r.seed} not run: it starts from a run that failed')
    for slot in range(len(groups)):
      ready = [r for r in queue if all(os.path.exists(os.path.join(n, 'results.json')) for n in r.needs)]
      if slot not in running and ready:
        r = ready[0]
        queue.remove(r)
        i = len(pending) - len(queue) - 1
        # ETA from this invocation's throughput: wall time per finished run times the runs not finished.
        eta = f', ETA {_duration((time.time() - start) / finished * (len(pending) - finished))}' if finished else ''
        log(f'[{len(runs) - len(pending) + i + 1}/{len(runs)}] {r.cell} seed {r.seed} ({finished} done, '
            f'{len(pending) - finished} left{eta})')
        running[slot] = (r, _start(r, groups[slot]))
    if queue and not running and not any(failed & set(r.needs) for r in queue):
      raise RuntimeError(f'sweep: {[r.workdir for r in queue]} wait for runs that are not in this sweep')
    for slot, (r, process) in list(running.items()):
      if process.poll() is None:
        continue
      del running[slot]
      finished += 1
      if process.returncode or not r.done:
        failures.append(f'{r.cell}/seed{r.seed} (exit status {process.returncode})')
        failed.add(r.workdir)
        log(f'sweep: {r.cell} seed {r.seed} FAILED (exit status {process.returncode}); going on')
    if running:
      time.sleep(0.5)
  return failures


def waves(runs: list[Run]) -> list[list[Run]]:
  """The unfinished runs in dependency order: wave 0 needs no unfinished run, wave k + 1 only runs of waves <= k."""
  todo, placed, out = [r for r in runs if not r.done], set(), []
  while todo:
    wave = [r for r in todo if all(n in placed or os.path.exists(os.path.join(n, 'results.json')) for n in r.needs)]
    if not wave:
      raise ValueError(f'runs {[r.workdir for r in todo]} start from runs that are not in the sweep')
    out.append(wave)
    placed |= {r.workdir for r in wave}
    todo = [r for r in todo if r.workdir not in placed]
  return out


def print_commands(runs: list[Run]) -> list[str]:
  lines, groups = [], waves(runs)
  for k, wave in enumerate(groups, start=1):
    if len(groups) > 1:
      lines.append(f'# wave {k}' + (f': after wave {k - 1} has finished' if k > 1 else ''))
    lines += [' '.join(shlex.quote(a) for a in ['./launch.sh', r.config] + r.args()) for r in wave]
  for line in lines:
    print(line)
  return lines


# ------------------------------------------------------------------------------------------------ collecting

def interval(values: list[float]) -> tuple[float, float]:
  """Mean and half-width of its 95% t-interval (0 with one value)."""
  import numpy as np
  from scipy import stats
  x = np.asarray(values, float)
  if len(x) < 2:
    return float(x.mean()), 0.0
  return float(x.mean()), float(stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x)))


def _read_json(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def _model_facts(workdir: str) -> tuple[int | None, int | None]:
  """(visual tokens M, projector parameters) of a run, from its config.json (a model with an output side: its
  output projector's parameters)."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    return None, None
  import ml_collections

  from mmproj import config_lib, model as model_lib
  cfg_model = config_lib.model_config(**ml_collections.ConfigDict(_read_json(path)).model.to_dict())
  if model_lib.has_output(cfg_model):
    return model_lib.num_image_tokens(cfg_model), model_lib.output_projector_param_count(cfg_model)
  return model_lib.num_image_tokens(cfg_model), model_lib.projector_param_count(cfg_model)


def _losses(workdir: str) -> dict[int, float]:
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    records = [json.loads(line) for line in f if line.strip()]
  return {int(r['step']): float(r['loss']) for r in records if 'loss' in r}


def _figures(results: dict, metric: str) -> dict[str, float]:
  """results.json's figures at a dotted path ('vqa_accuracy', 'draw.pipeline'): {name: value}."""
  node = results
  for key in metric.split('.'):
    node = node.get(key, {}) if isinstance(node, dict) else {}
  return {k: float(v) for k, v in node.items() if isinstance(v, (int, float))}


def gather(sweep, runs: list[Run], copy_to: str | None = None) -> list[dict]:
  """One row per cell: {cell, seeds, accuracy: {family: [per seed]}, tokens, params, chance: {family: level},
  curve: {step: mean loss}}; each finished run's results.json, config.json and metrics.jsonl copied under
  copy_to/<cell>/seed<seed>/. The figures are results.json's sweep.metric (default 'vqa_accuracy'); a sweep
  with reference_metric (e.g. 'draw.reference') gets a last row REFERENCE_CELL with those figures of its first
  cell's runs (a reference every run evaluates, such as the generator on its own)."""
  metric, reference = sweep.get('metric', 'vqa_accuracy'), sweep.get('reference_metric')
  rows = []
  for cell in sweep.cells:
    mine = [r for r in runs if r.cell == cell['name'] and r.done]
    accuracy: dict[str, list[float]] = {}
    curves, tokens, params, chance = [], None, None, {}
    read = {field: {} for field, *_ in PROVENANCE}        # {row field: {seed: results.json's provenance}}
    for r in mine:
      results = _read_json(os.path.join(r.workdir, 'results.json'))
      for field, results_field, *_ in PROVENANCE:
        read[field][r.seed] = results.get(results_field)
      for family, value in _figures(results, metric).items():
        accuracy.setdefault(family, []).append(value)
      chance = chance or results.get('chance') or {}
      curves.append(_losses(r.workdir))
      if tokens is None:
        tokens, params = _model_facts(r.workdir)
      if copy_to:
        dst = os.path.join(copy_to, r.cell, f'seed{r.seed}')
        if os.path.abspath(dst) != os.path.abspath(r.workdir):
          os.makedirs(dst, exist_ok=True)
          for name in COPIED:
            if os.path.exists(os.path.join(r.workdir, name)):
              shutil.copyfile(os.path.join(r.workdir, name), os.path.join(dst, name))
    steps = sorted(set.intersection(*(set(c) for c in curves))) if curves and all(curves) else []
    curve = {s: sum(c[s] for c in curves) / len(curves) for s in steps}
    rows.append(dict(cell=cell['name'], seeds=[r.seed for r in mine], accuracy=accuracy, tokens=tokens,
                     params=params, chance=chance, curve=curve, **read))
  if reference and sweep.cells:
    mine = [r for r in runs if r.cell == sweep.cells[0]['name'] and r.done]
    accuracy = {}
    for r in mine:
      for family, value in _figures(_read_json(os.path.join(r.workdir, 'results.json')), reference).items():
        accuracy.setdefault(family, []).append(value)
    rows.append(dict(cell=REFERENCE_CELL, seeds=[r.seed for r in mine], accuracy=accuracy, tokens=None, params=None,
                     chance={}, curve={}, **{field: {} for field, *_ in PROVENANCE}))
  return rows


BASELINE_CELL = 'blind'   # a cell of this name is the baseline the other cells are compared with, seed by seed
METRIC_TEXT = 'Exact-match accuracy (%)'   # what the figures are (sweep.metric_text)
REFERENCE_CELL = 'reference'   # the row of sweep.reference_metric; with it, the baseline of the differences


def _cell_text(values: list[float]) -> str:
  if not values:
    return ''
  mean, half = interval(values)
  return f'{mean:.1f} ± {half:.1f}' if len(values) > 1 else f'{mean:.1f}'


def paired_differences(row: dict, base: dict, family: str) -> list[float]:
  """Percentage points row - base on `family`, one per seed both finished."""
  a = dict(zip(row['seeds'], row['accuracy'].get(family, [])))
  b = dict(zip(base['seeds'], base['accuracy'].get(family, [])))
  return [100 * (a[s] - b[s]) for s in sorted(set(a) & set(b))]


# Which stage-0 weights a run read: the row field, results.json's field and the parts it names (provenance()).
PROVENANCE = (('towers', 'stage0', 'Stage-0 towers', ('vision', 'lm')),
              ('generators', 'stage0_generator', 'Stage-0 generator', ('generator',)))


def weights_text(rows: list[dict], field: str, results_field: str, what: str, parts: tuple[str, ...]) -> str:
  """Which stage-0 weights the runs read (results.json's `results_field`: mmproj.stage0.provenance or
  stage0_generator.provenance), per part and digest, naming the runs when they did not all read the same ones;
  '' when no run records any."""
  runs = [(f'{r["cell"]} {seed}', t) for r in rows for seed, t in sorted(r.get(field, {}).items())]
  if not any(t for _, t in runs):
    return ''
  groups: dict[str, list[str]] = {}
  for name, t in runs:
    for part in parts:
      if t and part in t:
        groups.setdefault(f'{part} weights `{t[part]}`', []).append(name)
    if not t:
      groups.setdefault('not recorded (run before results.json kept it)', []).append(name)
  mixed = any(sum(g.startswith(part + ' ') for g in groups) > 1 for part in parts) or any(not t for _, t in runs)
  keys = ', '.join(sorted({t['key'] for _, t in runs if t}))
  text = f"{what} read (results.json's `{results_field}`; recipe key {keys}): " + '; '.join(
      f'{g}: {len(names)} runs' + (f' ({", ".join(names)})' if mixed else '') for g, names in groups.items()) + '.'
  if mixed:
    text += ' One key can name different weights: CPU training is not bitwise reproducible across machines and resumes.'
  return text


def markdown(sweep, rows: list[dict], command: str) -> str:
  families = list(dict.fromkeys(f for r in rows for f in r['accuracy']))
  lines = [f'# Sweep: {sweep.name}', '', f'Command: `{command}`  ',
           f'Seeds: {", ".join(map(str, sweep.seeds))}. {sweep.get("metric_text", METRIC_TEXT)} on the test split, '
           'mean ± 95% t-interval over the seeds finished (one seed: no interval); M = visual tokens the LM reads; '
           'params = the projector\'s parameters.', '',
           '| cell | M | params | seeds | ' + ' | '.join(families) + ' |', '|' + '---|' * (len(families) + 4)]
  for field, results_field, what, parts in reversed(PROVENANCE):
    text = weights_text(rows, field, results_field, what, parts)
    if text:
      lines[5:5] = [text, '']       # between the legend and the table
  for r in rows:
    cells = [_cell_text([100 * v for v in r['accuracy'].get(family, [])]) for family in families]
    lines.append(f'| {r["cell"]} | {"" if r["tokens"] is None else r["tokens"]} | '
                 f'{"" if r["params"] is None else format(r["params"], ",")} | {len(r["seeds"])} | '
                 + ' | '.join(cells) + ' |')
  chance = next((r['chance'] for r in rows if r['chance']), None)
  if chance:
    lines.append('| chance (most frequent answer) | | | | '
                 + ' | '.join(f'{100 * chance[f]:.1f}' if f in chance else '' for f in families) + ' |')
  base_cell = REFERENCE_CELL if sweep.get('reference_metric') else BASELINE_CELL
  base = next((r for r in rows if r['cell'] == base_cell and r['seeds']), None)
  if base is not None:
    lines += ['', f'Difference from the {base_cell} baseline (percentage points, paired by seed, mean ± 95% '
              't-interval; * = the interval excludes 0):', '',
              '| cell | ' + ' | '.join(families) + ' |', '|' + '---|' * (len(families) + 1)]
    for r in rows:
      if r is base or not r['seeds']:
        continue
      cells = []
      for family in families:
        diffs = paired_differences(r, base, family)
        mark = '*' if len(diffs) > 1 and abs(interval(diffs)[0]) > interval(diffs)[1] else ''
        cells.append(_cell_text(diffs) + mark)
      lines.append(f'| {r["cell"]} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def plots(sweep, rows: list[dict], out: str) -> list[str]:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  import numpy as np
  rows = [r for r in rows if r['seeds']]
  families = list(dict.fromkeys(f for r in rows for f in r['accuracy']))
  paths = []

  fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(rows) + 3), 4.5))
  width = 0.8 / max(len(families), 1)
  x = np.arange(len(rows))
  for i, family in enumerate(families):
    stats = [interval([100 * v for v in r['accuracy'].get(family, [np.nan])]) for r in rows]
    ax.bar(x + (i - len(families) / 2 + 0.5) * width, [m for m, _ in stats], width, yerr=[h for _, h in stats],
           capsize=2, label=family)
  ax.set_xticks(x, [r['cell'] for r in rows], rotation=45, ha='right', fontsize=8)
  ax.set_ylabel('exact-match accuracy (%)')
  ax.set_ylim(0, 100)
  ax.legend(ncol=min(len(families), 7), fontsize=7, loc='upper center', bbox_to_anchor=(0.5, 1.15))
  fig.tight_layout()
  paths.append(os.path.join(out, f'{sweep.name}_accuracy.png'))
  fig.savefig(paths[-1], dpi=120)
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(6, 4.5))
  ax.set_xscale('symlog', linthresh=1)
  points = [(r['cell'], r['tokens'], *interval([100 * v for v in r['accuracy']['overall']])) for r in rows
            if r['tokens'] is not None and 'overall' in r['accuracy']]
  for _, tokens, mean, half in points:
    ax.errorbar([tokens], [mean], yerr=[half], fmt='o', capsize=3)
  if points:
    # Many cells share one M (the zoo: 13 at M = 9): their labels are stacked upwards from the lowest point, at
    # least `gap` apart, each joined to its point by a thin line.
    means = [mean for *_, mean, _ in points]
    gap = max(max(means) - min(means), 10.0) / 22
    heights = []
    for tokens in sorted({t for _, t, _, _ in points}):
      placed = -np.inf
      for cell, _, mean, _ in sorted((p for p in points if p[1] == tokens), key=lambda p: p[2]):
        placed = max(mean, placed + gap)
        heights.append(placed)
        ax.annotate(cell, (tokens, mean), xytext=(12, placed), textcoords=('offset points', 'data'), fontsize=7,
                    va='center', arrowprops=dict(arrowstyle='-', lw=0.4, color='0.5'))
    low, high = ax.get_ylim()                 # the stacked labels stay inside the axes
    ax.set_ylim(min(low, min(heights) - gap), max(high, max(heights) + gap))
  ax.set_xlabel('visual tokens M')
  ax.set_ylabel('overall accuracy (%)')
  fig.tight_layout()
  paths.append(os.path.join(out, f'{sweep.name}_tokens.png'))
  fig.savefig(paths[-1], dpi=120)
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(7, 4.5))
  curves = [r for r in rows if r['curve']]
  for r in curves:
    steps = sorted(r['curve'])
    ax.plot(steps, [r['curve'][s] for s in steps], label=r['cell'], linewidth=1)
  ax.set_yscale('log')
  ax.set_xlabel('step')
  ax.set_ylabel('training loss (mean over seeds)')
  if curves:
    ax.legend(fontsize=6, ncol=2)
  fig.tight_layout()
  paths.append(os.path.join(out, f'{sweep.name}_curves.png'))
  fig.savefig(paths[-1], dpi=120)
  plt.close(fig)
  return paths


def collect(sweep, runs: list[Run], out: str, command: str) -> str:
  os.makedirs(out, exist_ok=True)
  rows = gather(sweep, runs, copy_to=os.path.join(out, sweep.get('store', sweep.name)))
  text = markdown(sweep, rows, command)
  with open(os.path.join(out, f'{sweep.name}.md'), 'w') as f:
    f.write(text)
  if any(r['seeds'] for r in rows):
    plots(sweep, rows, out)
  return text


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('sweep', nargs='+', help='sweep config file(s), each optionally with :ARG (e.g. '
                 'configs/sweeps/zoo.py:smoke); a pattern such as "experiments/findings/e*.py:smoke" is expanded')
  p.add_argument('--workdir', required=True, help='the sweep\'s directory: one sub-directory per cell and seed')
  p.add_argument('--print-commands', action='store_true', help='print a launch.sh line per unfinished run')
  p.add_argument('--collect', action='store_true', help='tables and plots from the finished runs')
  p.add_argument('--out', default=os.path.join(REPO, 'experiments', 'results'), help='where --collect writes')
  p.add_argument('--jobs', type=int, default=1,
                 help='runs at once on a CPU host, each pinned to its share of the cores (default 1)')
  p.add_argument('--continue-from', metavar='STORE',
                 help='a collected store (OUT/<store>, e.g. experiments/results/zoo): its finished runs are not '
                 'run again')
  p.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE',
                 help='an override for every run (e.g. data.data_dir=/fast/disk); repeatable')
  args = p.parse_args(argv)
  specs = [m + (':' + arg if arg else '') for spec in args.sweep
           for path, _, arg in [spec.partition(':')] for m in (sorted(glob.glob(path)) or [path])]
  sweeps = [(spec, load_sweep(spec)) for spec in specs]
  extra = {}
  for item in args.set:
    field, sep, value = item.partition('=')
    if not sep or not field:
      p.error(f'--set {item!r}: expected FIELD=VALUE')
    extra[field] = value
  per_sweep = [(spec, runs_of(sweep, args.workdir, extra)) for spec, sweep in sweeps]
  runs = merge_runs(per_sweep)
  if args.continue_from:
    if not os.path.isdir(args.continue_from):
      p.error(f'--continue-from {args.continue_from}: no such directory')
    continue_from(runs, args.continue_from)
  if args.print_commands:
    print_commands(runs)
    return 0
  if not args.collect:
    failures = run_all(runs, args.jobs)
    if failures:
      print(f'sweep: {len(failures)} run(s) failed: {", ".join(failures)}', file=sys.stderr)
      return 1
  for (spec, sweep), (_, mine) in zip(sweeps, per_sweep):
    others = ' '.join(a for a in (argv if argv is not None else sys.argv[1:]) if a not in args.sweep)
    print(collect(sweep, mine, args.out, f'python experiments/sweep.py {spec} {others}'.strip()))
  return 0


if __name__ == '__main__':
  sys.exit(main())
