"""launch.sh's multi-process modes (tpu, multinode, local-multiprocess) through --dry-run, their argument errors,
and mmproj.train.distributed's reading of the environment those modes set. Nothing here creates a venv, installs
or starts JAX processes (tests/test_multiprocess.py runs real ones)."""
from __future__ import annotations

import os
import shlex
import subprocess

import pytest

from experiment_utils import REPO, fake_venv
from mmproj.train import distributed

CONFIG = 'configs/quickstart.py:smoke'


@pytest.fixture
def launch(tmp_path):
  """Runs launch.sh with MMPROJ_VENV pointing at a directory that must never be created."""
  venv = tmp_path / 'never-created-venv'

  def run(*args, env=None):
    base = {k: v for k, v in os.environ.items() if not k.startswith(('SLURM_', 'MMPROJ_'))}
    out = subprocess.run([os.path.join(REPO, 'launch.sh'), *args], env={**base, 'MMPROJ_VENV': str(venv),
                                                                         **(env or {})},
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert not venv.exists(), 'launch.sh created the venv'
    return out

  run.python = str(venv / 'bin' / 'python')
  return run


def _lines(out) -> list[list[str]]:
  assert out.returncode == 0, out.stderr
  return [shlex.split(line) for line in out.stdout.splitlines()]


def _env_and_command(words: list[str]) -> tuple[dict[str, str], list[str]]:
  """Leading NAME=value words -> env; the rest is the command."""
  env, words = {}, list(words)
  while words and '=' in words[0] and not words[0].startswith('-'):
    key, value = words.pop(0).split('=', 1)
    env[key] = value
  return env, words


def test_tpu_dry_run_prints_one_gcloud_command_for_all_workers(launch):
  out = launch('tpu', '--name', 'my-pod', '--zone', 'us-central2-b', '--project', 'proj-1', '--dry-run', CONFIG,
               '--workdir', 'gs://bucket/run', '--config.train.steps=10', "--config.name=it's mine")
  (words,) = _lines(out)
  assert words[:10] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'my-pod', '--zone', 'us-central2-b',
                        '--project', 'proj-1']
  assert words[10:12] == ['--worker=all', '--command'] and len(words) == 13
  remote = words[12]
  steps = [shlex.split(step) for step in remote.split(' && ')]
  assert steps[0] == ['cd', '~/mmproj']
  assert ['.venv/bin/python', '-m', 'pip', 'install', '--quiet', '-e', '.[tpu]'] in steps
  env, command = _env_and_command(steps[-1])
  assert env['MMPROJ_DISTRIBUTED'] == 'auto'  # JAX detects the pod on every worker
  assert command == ['.venv/bin/python', '-m', 'mmproj.main', '--config', CONFIG, '--workdir', 'gs://bucket/run',
                     '--config.train.steps=10', "--config.name=it's mine"]


def test_tpu_repo_dir_and_default_workdir(launch):
  out = launch('tpu', '--name=pod', '--zone=z', '--repo-dir', '/opt/my repo', '--dry-run', CONFIG)
  (words,) = _lines(out)
  assert '--project' not in words
  steps = [shlex.split(step) for step in words[-1].split(' && ')]
  assert steps[0] == ['cd', '/opt/my repo']
  assert steps[-1][-2:] == ['--workdir', 'runs/quickstart-smoke']
  assert 'shares' in out.stderr  # a workdir local to each worker is flagged


def test_multinode_dry_run_exports_the_process_env(launch):
  out = launch('multinode', '--coordinator', '10.0.0.1:1234', '--num-processes', '4', '--process-id', '3',
               '--local-device-ids', '0,1', '--dry-run', CONFIG, '--workdir', '/shared/run')
  (words,) = _lines(out)
  env, command = _env_and_command(words)
  assert env == dict(MMPROJ_COORDINATOR='10.0.0.1:1234', MMPROJ_NUM_PROCESSES='4', MMPROJ_PROCESS_ID='3',
                     MMPROJ_LOCAL_DEVICE_IDS='0,1', TF_CPP_MIN_LOG_LEVEL='3')
  assert command == [launch.python, '-m', 'mmproj.main', '--config', CONFIG, '--workdir', '/shared/run']
  # What the process then does with that environment:
  assert distributed.plan(env) == dict(coordinator_address='10.0.0.1:1234', num_processes=4, process_id=3,
                                       local_device_ids=[0, 1])


def test_multinode_takes_the_process_from_slurm(launch):
  out = launch('multinode', '--coordinator', 'node001:8476', CONFIG, '--dry-run',  # --dry-run after CONFIG too
               env=dict(SLURM_NTASKS='8', SLURM_PROCID='5'))
  (words,) = _lines(out)
  env, command = _env_and_command(words)
  assert (env['MMPROJ_NUM_PROCESSES'], env['MMPROJ_PROCESS_ID']) == ('8', '5')
  assert '--dry-run' not in command


def test_local_multiprocess_dry_run_prints_one_command_per_process(launch):
  out = launch('local-multiprocess', '--num-processes', '3', '--devices-per-process', '4', '--dry-run', CONFIG,
               '--config.train.steps=5', env={'XLA_FLAGS': '--xla_dump_to=/tmp/dump'})
  lines = _lines(out)
  assert len(lines) == 3
  ports = set()
  for i, words in enumerate(lines):
    env, command = _env_and_command(words)
    # the caller's XLA flags are kept, the device count added
    assert env['XLA_FLAGS'] == '--xla_dump_to=/tmp/dump --xla_force_host_platform_device_count=4'
    assert env['JAX_PLATFORMS'] == 'cpu'
    assert env['MMPROJ_NUM_PROCESSES'] == '3' and env['MMPROJ_PROCESS_ID'] == str(i)
    host, port = env['MMPROJ_COORDINATOR'].split(':')
    assert host == '127.0.0.1' and port.isdigit()
    ports.add(port)
    assert command == [launch.python, '-m', 'mmproj.main', '--config', CONFIG, '--config.train.steps=5',
                       '--workdir', 'runs/quickstart-smoke']
    assert distributed.plan(env)['process_id'] == i
  assert len(ports) == 1  # every process meets at the same coordinator
  fixed = _lines(launch('local-multiprocess', '--num-processes', '2', '--port', '23456', '--dry-run', CONFIG))
  assert [_env_and_command(w)[0]['MMPROJ_COORDINATOR'] for w in fixed] == ['127.0.0.1:23456'] * 2
  assert all(_env_and_command(w)[0]['XLA_FLAGS'].endswith('=1') for w in fixed)  # 1 device per process


@pytest.mark.parametrize('args, expected', [
    ((), ['--config', 'configs/quickstart.py', '--workdir', 'runs/quickstart']),
    (('--workdir', 'runs/q', '--config.train.steps=5'),
     ['--config', 'configs/quickstart.py', '--workdir', 'runs/q', '--config.train.steps=5']),
    ((CONFIG, '--config.seed=1'), ['--config', CONFIG, '--config.seed=1', '--workdir', 'runs/quickstart-smoke']),
])
def test_a_run_without_a_config_is_the_quickstart(tmp_path, args, expected):
  """./launch.sh with options only runs configs/quickstart.py with them (a venv stand-in prints the command)."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(('SLURM_', 'MMPROJ_'))}
  out = subprocess.run([os.path.join(REPO, 'launch.sh'), *args], env={**env, 'MMPROJ_VENV': str(fake_venv(tmp_path))},
                       cwd=REPO, capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stderr
  assert shlex.split(out.stdout) == ['-m', 'mmproj.main', *expected]


@pytest.mark.parametrize('args, flag', [
    (('tpu', '--zone', 'z', '--dry-run', CONFIG), '--name'),
    (('tpu', '--name', 'pod', '--dry-run', CONFIG), '--zone'),
    (('multinode', '--coordinator', 'h:1', '--num-processes', 'two', '--process-id', '0', '--dry-run', CONFIG),
     '--num-processes'),
    (('multinode', '--num-processes', '2', '--process-id', '0', '--dry-run', CONFIG), '--coordinator'),
    (('multinode', '--coordinator', 'h', '--num-processes', '2', '--process-id', '0', '--dry-run', CONFIG),
     '--coordinator'),
    (('multinode', '--coordinator', 'h:1', '--num-processes', '2', '--dry-run', CONFIG), '--process-id'),
    (('multinode', '--coordinator', 'h:1', '--num-processes', '2', '--process-id', '2', '--dry-run', CONFIG),
     '--process-id'),
    (('local-multiprocess', '--num-processes', 'x', '--dry-run', CONFIG), '--num-processes'),
    (('local-multiprocess', '--num-processes', '0', '--dry-run', CONFIG), '--num-processes'),
    (('local-multiprocess', '--num-processes', '2', '--devices-per-process', '1.5', '--dry-run', CONFIG),
     '--devices-per-process'),
    (('local-multiprocess', '--num-processes', '2', '--name', 'x', '--dry-run', CONFIG), '--name'),
    (('local-multiprocess', '--num-processes', '2', '--dry-run', 'configs/missing.py'), 'configs/missing.py'),
    (('tpu', '--name', 'pod', '--zone', 'z', '--dry-run'), 'CONFIG'),
])
def test_bad_arguments_fail_naming_the_flag(launch, args, flag):
  out = launch(*args)
  assert out.returncode != 0 and not out.stdout
  assert flag in out.stderr, out.stderr


@pytest.mark.parametrize('env, name', [
    (dict(MMPROJ_NUM_PROCESSES='2', MMPROJ_PROCESS_ID='0'), 'MMPROJ_COORDINATOR'),
    (dict(MMPROJ_COORDINATOR='h:1', MMPROJ_PROCESS_ID='0'), 'MMPROJ_NUM_PROCESSES'),
    (dict(MMPROJ_COORDINATOR='h:1', MMPROJ_NUM_PROCESSES='2'), 'MMPROJ_PROCESS_ID'),
    (dict(MMPROJ_COORDINATOR='h:1', MMPROJ_NUM_PROCESSES='two', MMPROJ_PROCESS_ID='0'), 'MMPROJ_NUM_PROCESSES'),
    (dict(MMPROJ_COORDINATOR='h:1', MMPROJ_NUM_PROCESSES='2', MMPROJ_PROCESS_ID='2'), 'MMPROJ_PROCESS_ID'),
    (dict(MMPROJ_COORDINATOR='h', MMPROJ_NUM_PROCESSES='2', MMPROJ_PROCESS_ID='0'), 'MMPROJ_COORDINATOR'),
    (dict(MMPROJ_COORDINATOR='h:1', MMPROJ_NUM_PROCESSES='2', MMPROJ_PROCESS_ID='0',
          MMPROJ_LOCAL_DEVICE_IDS='0,a'), 'MMPROJ_LOCAL_DEVICE_IDS'),
    (dict(MMPROJ_DISTRIBUTED='yes'), 'MMPROJ_DISTRIBUTED'),
    (dict(MMPROJ_COORDINATOR='h:1', SLURM_NTASKS='4', SLURM_PROCID='x'), 'SLURM_PROCID'),
])
def test_distributed_env_errors_name_the_variable(env, name):
  with pytest.raises(ValueError, match=name):
    distributed.plan(env)


def test_distributed_plan():
  assert distributed.plan({}) in (None, {})  # {} only on a machine with TPU chips: JAX detects the pod
  assert distributed.plan(dict(MMPROJ_DISTRIBUTED='off', MMPROJ_COORDINATOR='h:1')) is None
  assert distributed.plan(dict(MMPROJ_DISTRIBUTED='auto')) == {}
  assert distributed.plan(dict(MMPROJ_NUM_PROCESSES='1', MMPROJ_PROCESS_ID='0')) is None  # one process
  slurm = dict(MMPROJ_COORDINATOR='node1:8476', SLURM_NTASKS='4', SLURM_PROCID='2')
  assert distributed.plan(slurm) == dict(coordinator_address='node1:8476', num_processes=4, process_id=2)
  jax_env = dict(JAX_COORDINATOR_ADDRESS='[::1]:99', MMPROJ_NUM_PROCESSES='2', MMPROJ_PROCESS_ID='1')
  assert distributed.plan(jax_env)['coordinator_address'] == '[::1]:99'
