"""benchmarks/accelerator.sh and benchmarks/accelerator.py, the prepared GPU check, on the CPU: the dry run
builds and validates every row's config and prints the commands; one train row and one projector row run at the
toy shapes; the report has both tables."""
from __future__ import annotations

import math
import os
import subprocess
import sys

from experiment_utils import REPO, python_env

from benchmarks import accelerator


def test_dry_run_lists_every_row_and_runs_nothing(tmp_path):
  out = subprocess.run(['benchmarks/accelerator.sh', '--dry-run', '--out', str(tmp_path / 'gpu.md')], cwd=REPO,
                       env=dict(python_env(), PYTHON=sys.executable), capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
  for row in accelerator.TRAIN_ROWS:
    assert f"train '{row.name}'" in out.stdout
    assert f"--child train '{row.name}'" in out.stdout
  for name in accelerator.PROJECTORS:
    assert f'projector {name}:' in out.stdout
  assert 'train state 2.66 GiB' in out.stdout          # stage 1: CLIP-L and the 1.1B LM in bf16, projector f32
  assert 'train state 5.25 GiB' in out.stdout          # the same with the frozen towers in f32
  assert 'timeout 480 ' in out.stdout
  assert not os.path.exists(tmp_path / 'gpu.md')


def test_download_wheels_dry_run_names_the_missing_packages():
  out = subprocess.run(['benchmarks/accelerator.sh', '--download-wheels', '--dry-run'], cwd=REPO,
                       env=dict(python_env(), PYTHON=sys.executable), capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stderr
  assert 'pip download --no-deps --only-binary=:all: --python-version 3.12' in out.stdout
  assert 'ml_collections grain' in out.stdout


def test_tiny_rows_run_and_report():
  train = accelerator.run_train_row(accelerator.TRAIN_ROWS[0], tiny=True)
  proj = accelerator.run_projector('perceiver', tiny=True)
  assert train['step_s'] > 0 and math.isfinite(train['loss']) and train['tokens_per_s'] > 0
  assert train['kernels'] == 'dense xla, attention xla'          # 'auto' on a CPU
  assert proj['flops'] > 0 and proj['tokens_out'] == 4 and proj['ms'] > 0
  text = accelerator.report('cpu', [train, dict(name='stage 2', error='boom')], [proj], True, 'cmd', 1.0)
  assert '| stage 1 | 2 |' in text and 'error: boom' in text and '| perceiver | 4 |' in text
