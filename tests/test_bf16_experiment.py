"""experiments/bf16_quickstart.py: the verdict rule and the report on hand-made results, its dry run, and the\ncommitted report rebuilt from the committed runs."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from experiment_utils import REPO, python_env

sys.path.insert(0, os.path.join(REPO, 'experiments'))
import bf16_quickstart as exp  # noqa: E402


def _cell(overall: float) -> dict:
  acc = {family: overall for family in exp.FAMILIES}
  return {'vqa_accuracy': acc, 'caption_loss': 0.01, 'train_seconds': 10.0}


@pytest.mark.parametrize('low,high,seeds,expected', [
    (-1.0, 2.0, 3, 'within the margin'), (-9.0, -4.0, 3, 'worse'), (3.5, 5.0, 3, 'better'),
    (-4.0, 1.0, 3, 'inconclusive'), (0.0, 0.0, 1, 'none: one seed gives no interval')])
def test_verdict_rule(low, high, seeds, expected):
  assert exp.verdict(low, high, seeds) == expected


def test_report_pairs_seeds_and_states_the_rule():
  results = {'float32': {0: _cell(0.80), 1: _cell(0.70), 2: _cell(0.90)},
             'bfloat16': {0: _cell(0.79), 1: _cell(0.69), 2: _cell(0.89)}}
  text = exp.report(results, [0, 1, 2], 'cmd')
  # d = -1 point on every seed: no spread, so the interval is the point itself, well inside the margin.
  assert '| overall | 80.0 ± 24.8 | 79.0 ± 24.8 | -1.0 ± 0.0 |' in text
  assert 'Verdict rule (fixed before the runs)' in text and '**Verdict: within the margin**' in text


def test_dry_run_prints_one_command_per_run(tmp_path):
  out = subprocess.run([sys.executable, 'experiments/bf16_quickstart.py', '--dry-run', '--variant', 'smoke',
                        '--runs', str(tmp_path)], cwd=REPO, env=python_env(), capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  assert len(lines) == 4 and all(line.startswith('./launch.sh configs/quickstart.py:smoke') for line in lines)
  assert all('--config.baseline=none' in line for line in lines)
  assert sum('--config.model.dtype=bfloat16' in line for line in lines) == 2


def test_the_committed_runs_rebuild_the_report(tmp_path):
  """experiments/results/bf16_quickstart/ holds every run's results: the report comes back from them alone."""
  committed = os.path.join(REPO, 'experiments', 'results', 'bf16_quickstart')
  assert exp.main(['--runs', committed, '--out', str(tmp_path)]) == 0
  with open(os.path.join(REPO, 'experiments', 'results', 'bf16_quickstart.md')) as f:
    assert (tmp_path / 'bf16_quickstart.md').read_text().split('\n', 3)[3] == f.read().split('\n', 3)[3]
