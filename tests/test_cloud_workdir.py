"""A workdir in cloud storage: gs://bucket/run on a local GCS emulator (gcp-storage-emulator, offline), reached the
way a TPU pod reaches a real bucket: etils.epath -> fsspec -> gcsfs for the run files, metrics and results,
TensorStore's own gcs driver for Orbax's arrays, google-cloud-storage for TensorBoard's events. Both clients are
pointed at the emulator by their standard variables (STORAGE_EMULATOR_HOST, TENSORSTORE_GCS_HTTP_URL);
tests/gcs_emulator.py adds the generation headers real GCS sends.

The run is SIGKILLed once its first checkpoint is complete, resumed, evaluated (results.json) and loaded with
mmproj.load; its params must equal, bit for bit, those of the same run in a local workdir that was never
interrupted."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

from experiment_utils import REPO, python_env


WATCHER = r'''
import json, os, signal, subprocess, sys, time
sys.path.insert(0, 'tests')
import numpy as np

data_dir, local_dir = sys.argv[1], sys.argv[2]
TRAIN = """
import sys
sys.path.insert(0, 'tests')
from experiment_utils import tiny_experiment
from mmproj import experiment
cfg = tiny_experiment(sys.argv[1])
cfg.baseline = 'none'
cfg.checkpoint.async_save = False
experiment.run(cfg, sys.argv[2])
"""

def train(workdir):
  return subprocess.Popen([sys.executable, '-c', TRAIN, data_dir, workdir])

import gcsfs
import orbax.checkpoint as ocp
fs = gcsfs.GCSFileSystem(token='anon', project='test')

def complete_steps():
  manager = ocp.CheckpointManager('gs://bucket/run/checkpoints', options=ocp.CheckpointManagerOptions(read_only=True))
  return list(manager.all_steps())

run = train('gs://bucket/run')
deadline = time.time() + 300
while run.poll() is None and not complete_steps() and time.time() < deadline:
  time.sleep(0.2)
assert run.poll() is None, 'the run ended before it could be killed'
killed_with = complete_steps()
run.send_signal(signal.SIGKILL)
run.wait()
assert subprocess.run([sys.executable, '-c', TRAIN, data_dir, 'gs://bucket/run'], capture_output=True, text=True,
                      check=True).stdout.count('Resuming from checkpoint step') == 1
assert train(local_dir).wait() == 0

# The report from a fresh process: gcsfs caches directory listings per process, and this one listed the
# checkpoints while the run was writing them.
REPORT = """
import json, os, sys
import gcsfs, jax, numpy as np
import mmproj
local_dir = sys.argv[1]
fs = gcsfs.GCSFileSystem(token='anon', project='test')
remote, local = mmproj.load('gs://bucket/run'), mmproj.load(local_dir)
same = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))),
                                    remote.params, local.params))
files = sorted(p.rstrip('/').rsplit('/', 1)[1] for p in fs.ls('bucket/run', detail=False))
results = json.loads(fs.cat('bucket/run/results.json'))
metrics = [json.loads(line)['step'] for line in fs.cat('bucket/run/metrics.jsonl').decode().splitlines()]
with open(os.path.join(local_dir, 'results.json')) as f:
  local_results = json.load(f)
print(json.dumps(dict(steps=remote.step, same=all(same), files=files, metrics=metrics,
                      results=results['vqa_accuracy'], local_results=local_results['vqa_accuracy'],
                      events=len(fs.find('bucket/run/tensorboard')))))
"""
out = subprocess.run([sys.executable, '-c', REPORT, local_dir], capture_output=True, text=True, check=True).stdout
print(json.dumps(dict(json.loads(out.strip().splitlines()[-1]), killed_with=killed_with)))
'''


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_gs_workdir_trains_is_killed_resumes_and_loads(shapes_data_dir, tmp_path):
  port = _free_port()
  url = f'http://127.0.0.1:{port}'
  emulator = subprocess.Popen([sys.executable, 'tests/gcs_emulator.py', str(port)], cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    for _ in range(100):
      try:
        socket.create_connection(('127.0.0.1', port), timeout=1).close()
        break
      except OSError:
        time.sleep(0.1)
    env = dict(python_env(), STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url,
               GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT='false',   # no gRPC bucket-type probe (the emulator speaks JSON)
               GOOGLE_CLOUD_PROJECT='test')
    out = subprocess.run([sys.executable, '-c', WATCHER, shapes_data_dir, str(tmp_path / 'local')], env=env,
                         capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
  finally:
    emulator.kill()
  print(report)
  assert report['killed_with'] and max(report['killed_with']) < 6, report      # killed mid-run, after a save
  assert report['steps'] == 6 and report['same'], report                       # resumed to the end, exactly
  assert {'config.json', 'tokenizer.json', 'metrics.jsonl', 'results.json', 'checkpoints',
          'tensorboard'} <= set(report['files']), report
  assert report['metrics'] == [2, 4, 6], report                                # one record per logged step
  assert report['results'] == report['local_results'], report
  assert report['events'] >= 1, report
