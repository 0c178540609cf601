"""benchmarks.host_malloc: the glibc setting launch.sh and the bench start processes with, checked for what it is for
(a jitted call stops page-faulting its temporaries) and for who sets it when."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from experiment_utils import REPO, fake_venv
from benchmarks import host_malloc

# A jitted function whose temporaries (~100 MB) are far above glibc's largest mmap threshold (32 MiB).
_CHILD = r'''
import json, resource, jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.tanh(x @ x.T + 1.0) @ x)        # [2048, 4096] -> temporaries of 16-64 MB each
x = jnp.full((2048, 4096), 0.01, jnp.float32)
for _ in range(5):
  jax.block_until_ready(f(x))
faults = []
for _ in range(6):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  jax.block_until_ready(f(x))
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(faults))
'''


def _faults_per_call(tunables: str) -> int:
  env = dict(os.environ, GLIBC_TUNABLES=tunables, JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-c', _CHILD], env=env, capture_output=True, text=True, timeout=300,
                       check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  return min(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='GLIBC_TUNABLES is glibc (Linux) only')
def test_reuse_setting_stops_per_call_page_faults():
  default = _faults_per_call('')
  reuse = _faults_per_call(host_malloc.REUSE)
  # glibc's defaults map every large temporary afresh (~8,000 4 KiB pages per call here); REUSE serves the same
  # calls from pages the process already has. The least of several calls: under load (CI's other test worker),
  # a REUSE call now and then still touches a fresh 16-32 MB block (4,096-8,192 faults).
  assert default > 2_000, default
  assert reuse < default / 20, (reuse, default)


def test_with_reuse_only_fills_in_a_missing_variable():
  assert host_malloc.with_reuse({})[host_malloc.ENV] == host_malloc.REUSE
  assert host_malloc.with_reuse({host_malloc.ENV: ''})[host_malloc.ENV] == ''
  assert host_malloc.with_reuse({host_malloc.ENV: 'glibc.malloc.hugetlb=1'})[host_malloc.ENV] == 'glibc.malloc.hugetlb=1'
  assert 'REUSE' in host_malloc.describe({host_malloc.ENV: host_malloc.REUSE})
  assert 'unset' in host_malloc.describe({})
  assert 'empty' in host_malloc.describe({host_malloc.ENV: ''})


def test_the_file_prints_the_setting_launch_sh_reads():
  out = subprocess.run([sys.executable, os.path.join(REPO, 'benchmarks', 'host_malloc.py')], capture_output=True,
                       text=True, check=True)
  assert out.stdout.strip() == host_malloc.REUSE
  with open(os.path.join(REPO, 'launch.sh')) as f:
    assert 'glibc.malloc' not in f.read()          # no copy of the string to drift


def _has_accelerator() -> bool:
  return any(re.match(r'(nvidia|accel)\d+$', name) for name in os.listdir('/dev')) or (
      os.path.isdir('/dev/vfio') and any(n.isdigit() for n in os.listdir('/dev/vfio')))


@pytest.mark.parametrize('given, expected', [
    (None, host_malloc.REUSE),                      # unset: launch.sh fills it in on a CPU host
    ('', ''),                                       # empty: the user asked for glibc's defaults
    ('glibc.malloc.hugetlb=1', 'glibc.malloc.hugetlb=1'),
])
def test_launch_sh_sets_it_on_a_cpu_host_unless_given(tmp_path, given, expected):
  if _has_accelerator():
    pytest.skip('this host has a GPU/TPU device node: launch.sh leaves GLIBC_TUNABLES alone there')
  env = {k: v for k, v in os.environ.items() if k != host_malloc.ENV and not k.startswith(('SLURM_', 'MMPROJ_'))}
  if given is not None:
    env[host_malloc.ENV] = given
  env['MMPROJ_VENV'] = str(fake_venv(tmp_path, 'echo "GLIBC_TUNABLES=${GLIBC_TUNABLES-<unset>}"'))
  out = subprocess.run([os.path.join(REPO, 'launch.sh'), 'configs/quickstart.py:smoke'], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=60, check=False)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == f'GLIBC_TUNABLES={expected}'

