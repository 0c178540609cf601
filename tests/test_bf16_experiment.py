"""experiments/bf16_quickstart.py: the verdict rule and the report on hand-made cell results, and its dry run."""
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


def test_dry_run_prints_one_command_per_cell(tmp_path):
  out = subprocess.run([sys.executable, 'experiments/bf16_quickstart.py', '--dry-run', '--seeds', '0,1',
                        '--runs', str(tmp_path)], cwd=REPO, env=python_env(), capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stderr
  lines = [line for line in out.stdout.splitlines() if line.startswith('$ ')]
  assert len(lines) == 4 and all('--config.baseline=none' in line for line in lines)
  assert sum('--config.model.dtype=bfloat16' in line for line in lines) == 2
