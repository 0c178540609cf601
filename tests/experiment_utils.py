"""Shared by the training tests: a tiny experiment config and a way to run the CLI in a subprocess."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(path: str, arg: str = ''):
  spec = importlib.util.spec_from_file_location('config_module', os.path.join(REPO, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def tiny_experiment(data_dir: str):
  """The smoke quickstart, shrunk further: seconds per run."""
  cfg = load_config('configs/quickstart.py', 'smoke')
  cfg.data.data_dir = data_dir
  cfg.model.encoder.update(width=32, depth=1, num_heads=2, mlp_dim=64)
  cfg.model.lm.update(width=32, depth=1, num_heads=4, num_kv_heads=2, mlp_dim=64)
  cfg.train.update(steps=6, batch_size=16, warmup_steps=2)
  cfg.checkpoint.every = 3
  cfg.log_every = 2
  cfg.eval.update(batch_size=32, max_examples=32)
  return cfg


def python_env(num_devices: int | None = None) -> dict[str, str]:
  # MMPROJ_VENV: launch.sh run from a test uses the environment the tests run in.
  env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL='3', MMPROJ_VENV=sys.prefix)
  if num_devices:
    env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={num_devices}'
  return env


def run_script(code: str, *, num_devices: int | None = None, timeout: int = 300) -> str:
  out = subprocess.run([sys.executable, '-c', code], env=python_env(num_devices), capture_output=True,
                       text=True, timeout=timeout, cwd=REPO)
  assert out.returncode == 0, f'subprocess failed:\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}'
  return out.stdout
