"""Fault injection: SIGKILL a training run at random points, restart it each time, and check that it ends exactly
where a run that was never interrupted ends.

  python experiments/fault_injection.py --workdir /tmp/faults --kills 5 --seed 0 \\
      configs/quickstart.py:smoke --config.train.steps=60 --config.baseline=none

Everything after the options is the experiment (a config and its --config.* overrides), run as
`python -m mmproj.main --config=... --workdir=...`. The script first runs it uninterrupted in WORKDIR/reference,
then runs it again in WORKDIR/faulty, killing the process --kills times; each kill picks one of
  save   the moment a checkpoint save is in flight (Orbax's temporary step directory exists)
  step   a random moment after a random logged step, once a checkpoint is complete (so that the next launch
         resumes from one: with 'save' and 'start' both able to strike before any checkpoint exists, a run could
         otherwise be killed three times without ever restoring)
  start  a random moment in the first seconds (start-up, restore, compile)
and the run is restarted after every kill until it finishes. Checks (any failure: exit status 1):
  - the final params are bitwise equal to the reference run's (same device count);
  - metrics.jsonl holds the same records (loss, accuracy, grad_norm, learning_rate and the counters; the timing
    fields differ), one per logged step;
  - results.json holds the same figures (when the experiment writes evaluation results);
  - every checkpoint step that was complete before a kill is still there at the end, and every checkpoint of the
    faulty run holds the same train state as the reference run's at that step (the state checksums saved with
    each step are compared). checkpoint.keep is raised so that no step is deleted by design.
A JSON report goes to WORKDIR/report.json and the console.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING_FIELDS = ('steps_per_sec', 'tokens_per_sec', 'examples_per_sec', 'tflops_per_device', 'mfu')
KILL_KINDS = ('save', 'step', 'start')


def _command(workdir: str, experiment: list[str]) -> list[str]:
  config, overrides = experiment[0], experiment[1:]
  return [sys.executable, '-m', 'mmproj.main', f'--config={config}', f'--workdir={workdir}',
          '--config.checkpoint.keep=1000000', *overrides]


def _env() -> dict[str, str]:
  return dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''),
              TF_CPP_MIN_LOG_LEVEL='3')


def complete_steps(workdir: str) -> set[int]:
  """Checkpoint steps whose directory is in place (Orbax renames a step's directory into place when it is
  complete; a save in flight lives in a temporary directory)."""
  d = os.path.join(workdir, 'checkpoints')
  return {int(n) for n in os.listdir(d) if n.isdigit()} if os.path.isdir(d) else set()


def _temporary_dirs(workdir: str) -> set[str]:
  """Orbax's temporary step directories: a save in flight, or one a kill left behind (removed at the next start)."""
  d = os.path.join(workdir, 'checkpoints')
  return {n for n in os.listdir(d) if 'tmp' in n} if os.path.isdir(d) else set()


def _last_logged_step(workdir: str) -> int:
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  try:
    return int(json.loads(lines[-1])['step']) if lines else 0
  except (ValueError, KeyError):  # a line being written
    return 0


def _total_steps(workdir: str) -> int | None:
  """train.steps from the config.json the run writes at start-up (None until it is there)."""
  try:
    with open(os.path.join(workdir, 'config.json')) as f:
      return int(json.load(f)['train']['steps'])
  except (OSError, ValueError, KeyError):
    return None


def run_with_kill(cmd: list[str], workdir: str, kind: str, rng: random.Random, log_path: str,
                  timeout: float) -> dict:
  """Runs cmd until the kill condition of `kind`, then SIGKILLs it. -> what happened."""
  with open(log_path, 'a') as log:
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT)
  t0 = time.time()
  first_logged = _last_logged_step(workdir)
  saves_to_let_through = rng.randint(0, 2)          # 'save': kill during the 1st, 2nd or 3rd save of this launch
  step_fraction = rng.random()                      # 'step': how far into the remaining steps
  delay = rng.uniform(0.0, 0.3) if kind == 'step' else rng.uniform(0.5, 8.0)
  fire_at, target_step, saves_seen, was_saving = None, None, 0, False
  left_behind = _temporary_dirs(workdir)           # by an earlier kill: not a save of this launch
  saving = lambda: bool(_temporary_dirs(workdir) - left_behind)
  while proc.poll() is None:
    now = time.time()
    if now - t0 > timeout:
      proc.kill()
      raise TimeoutError(f'{cmd} ran for more than {timeout} s')
    if kind == 'save':
      now_saving = saving()
      if now_saving and not was_saving:
        saves_seen += 1
        if saves_seen > saves_to_let_through:
          fire_at = now
      was_saving = now_saving
    elif kind == 'step' and fire_at is None:
      total = _total_steps(workdir)
      if target_step is None and total is not None:
        target_step = first_logged + 1 + int(step_fraction * max(total - first_logged - 2, 0))
      if target_step is not None and _last_logged_step(workdir) >= target_step and complete_steps(workdir):
        fire_at = now + delay
    elif kind == 'start' and fire_at is None:
      fire_at = t0 + delay
    if fire_at is not None and now >= fire_at:
      before = complete_steps(workdir)
      in_flight = saving()
      proc.send_signal(signal.SIGKILL)
      proc.wait()
      return {'kind': kind, 'killed': True, 'after_s': round(now - t0, 2), 'save_in_flight': in_flight,
              'complete_steps_before': sorted(before), 'last_logged_step': _last_logged_step(workdir)}
    time.sleep(0.001 if kind == 'save' else 0.01)
  if proc.returncode != 0:
    raise RuntimeError(f'the run failed (exit {proc.returncode}); see {log_path}')
  return {'kind': kind, 'killed': False, 'after_s': round(time.time() - t0, 2), 'finished': True}


def _records(workdir: str) -> list[dict]:
  path = os.path.join(workdir, 'metrics.jsonl')
  with open(path) as f:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_FIELDS} for line in f if line.strip()]


def _checksums(workdir: str, step: int) -> dict:
  with open(os.path.join(workdir, 'checkpoints', str(step), 'meta', 'metadata')) as f:
    return json.load(f)['checksums']


def compare(reference: str, faulty: str, kills: list[dict]) -> list[str]:
  """-> the failed checks, as sentences (empty: everything matched)."""
  import jax
  import numpy as np

  import mmproj

  failures = []
  ref_params, got_params = mmproj.load(reference).params, mmproj.load(faulty).params
  diff = [jax.tree_util.keystr(path) for path, a, b in zip(
      [p for p, _ in jax.tree_util.tree_flatten_with_path(ref_params)[0]], jax.tree.leaves(ref_params),
      jax.tree.leaves(got_params)) if not np.array_equal(np.asarray(a), np.asarray(b))]
  if diff:
    failures.append(f'final params differ from the uninterrupted run in {len(diff)} leaves, e.g. {diff[:3]}')
  ref_rec, got_rec = _records(reference), _records(faulty)
  if ref_rec != got_rec:
    steps = [r['step'] for r in got_rec]
    bad = next((a['step'] for a, b in zip(ref_rec, got_rec) if a != b), None)
    failures.append(f'metrics.jsonl differs (first differing step {bad}; logged steps {steps} vs '
                    f'{[r["step"] for r in ref_rec]})')
  ref_results, got_results = (os.path.join(d, 'results.json') for d in (reference, faulty))
  if os.path.exists(ref_results):
    with open(ref_results) as f, open(got_results) as g:
      a, b = json.load(f), json.load(g)
    a.pop('train_seconds', None), b.pop('train_seconds', None)
    for k in [k for k in a if k.endswith('train_seconds')]:
      a.pop(k), b.pop(k, None)
    if a != b:
      failures.append(f'results.json differs: {a} vs {b}')
  final = complete_steps(faulty)
  for kill in kills:
    lost = sorted(set(kill.get('complete_steps_before', ())) - final)
    if lost:
      failures.append(f'checkpoint steps {lost}, complete before a kill ({kill["kind"]}), are gone')
  for step in sorted(final):
    if step not in complete_steps(reference):
      failures.append(f'the faulty run has checkpoint step {step}, the reference run does not')
    elif _checksums(reference, step) != _checksums(faulty, step):
      failures.append(f'checkpoint step {step} holds a different train state than the reference run\'s')
  return failures


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', required=True, help='holds reference/, faulty/, report.json (emptied first)')
  parser.add_argument('--kills', type=int, default=4, help='SIGKILLs to deliver before letting the run finish')
  parser.add_argument('--seed', type=int, default=0, help='seeds the kill kinds and moments')
  parser.add_argument('--kinds', default=','.join(KILL_KINDS), help=f'kill kinds to draw from: {KILL_KINDS}')
  parser.add_argument('--timeout', type=float, default=900, help='seconds any one launch may run')
  parser.add_argument('experiment', nargs=argparse.REMAINDER, help='CONFIG[:ARG] [--config.key=value ...]')
  args = parser.parse_args(argv)
  kinds = args.kinds.split(',')
  if not args.experiment or any(k not in KILL_KINDS for k in kinds):
    parser.error(f'give a config after the options, and --kinds from {KILL_KINDS}')
  rng = random.Random(args.seed)
  shutil.rmtree(args.workdir, ignore_errors=True)
  reference, faulty = (os.path.join(args.workdir, d) for d in ('reference', 'faulty'))
  os.makedirs(args.workdir)

  t0 = time.time()
  with open(os.path.join(args.workdir, 'reference.log'), 'w') as log:
    subprocess.run(_command(reference, args.experiment), cwd=REPO, env=_env(), stdout=log,
                   stderr=subprocess.STDOUT, check=True, timeout=args.timeout)
  print(f'reference run: {time.time() - t0:.0f} s', flush=True)

  kills, launches = [], 0
  cmd, log_path = _command(faulty, args.experiment), os.path.join(args.workdir, 'faulty.log')
  # Kinds are drawn in turn from a shuffled list, so every kind occurs once --kills reaches their number.
  schedule = []
  while len(schedule) < args.kills:
    schedule += rng.sample(kinds, len(kinds))
  for kind in schedule[:args.kills]:
    launches += 1
    event = run_with_kill(cmd, faulty, kind, rng, log_path, args.timeout)
    kills.append(event)
    print(f'launch {launches}: {event}', flush=True)
    if not event['killed']:
      break
  if not kills or kills[-1]['killed']:
    launches += 1
    with open(log_path, 'a') as log:
      subprocess.run(cmd, cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT, check=True,
                     timeout=args.timeout)
  with open(log_path) as f:
    resumes = f.read().count('Resuming from checkpoint step')

  failures = compare(reference, faulty, kills)
  report = {'kills': [k for k in kills if k['killed']], 'launches': launches, 'resumes': resumes,
            'kills_during_save': sum(1 for k in kills if k.get('save_in_flight')),
            'final_checkpoint_steps': sorted(complete_steps(faulty)), 'failures': failures,
            'seconds': round(time.time() - t0, 1)}
  with open(os.path.join(args.workdir, 'report.json'), 'w') as f:
    json.dump(report, f, indent=2)
  print(json.dumps(report, indent=2))
  print('FAILED: ' + '; '.join(failures) if failures else
        f'OK: {len(report["kills"])} kills ({report["kills_during_save"]} during a save), {resumes} resumes; '
        'final params, metrics and every checkpoint equal the uninterrupted run\'s')
  return 1 if failures else 0


if __name__ == '__main__':
  sys.exit(main())
