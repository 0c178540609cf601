"""Shared by the training tests: a tiny experiment config and a way to run the CLI in a subprocess."""
from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(path: str, arg: str = ''):
  """configs/X.py (relative to the repo) with its get_config argument, through the one config loader."""
  from mmproj import config_lib
  return config_lib.load_config_file(os.path.join(REPO, path) + (f':{arg}' if arg else ''))


def llava_config(path: str, vision: str, lm: str, tokenizer: str, **args):
  """configs/llava15_*.py for the towers in the HF directories `vision` and `lm` (e.g. tiny test models): the
  config's arguments plus the model fields those directories and the tokenizer describe, as a config for them
  would set them (mmproj.convert.llava.model_fields_from_dirs)."""
  from mmproj.convert import llava
  cfg = load_config(path, ','.join(f'{k}={v}' for k, v in dict(vision=vision, lm=lm, tokenizer=tokenizer,
                                                                   **args).items()))
  encoder, lm_fields, image_token_id = llava.model_fields_from_dirs(vision, lm, tokenizer)
  cfg.model.encoder.update(encoder)
  cfg.model.lm.update(lm_fields)
  cfg.model.image_token_id = image_token_id
  return cfg


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


def tiny_media_experiment(modality: str, data_dir: str):
  """configs/audio_tones.py or configs/video_motion.py (modality 'audio' | 'video') at the smoke budget, shrunk to
  seconds: 1 s clips of at most 2 sounds, or 4 frames; one-block towers; 6 steps."""
  if modality == 'audio':
    cfg = load_config('configs/audio_tones.py', 'smoke')
    cfg.data.update(clip_seconds=1.0, max_events=2)
  else:
    cfg = load_config('configs/video_motion.py', 'smoke')
    cfg.data.num_frames = 4
  cfg.data.update(data_dir=data_dir, num_train=32, num_test=8)
  cfg.model.encoder.update(width=32, depth=1, num_heads=2, mlp_dim=64)
  cfg.model.lm.update(width=32, depth=1, num_heads=4, num_kv_heads=2, mlp_dim=64)
  cfg.train.update(steps=6, batch_size=8, warmup_steps=2)
  cfg.checkpoint.update(every=3, async_save=False)
  cfg.log_every = 2
  cfg.eval.update(batch_size=8, max_examples=8)
  return cfg


def tiny_draw(data_dir: str, generator_dir: str | None, stage: str = 'align', name: str = 'mlp'):
  """configs/draw.py at the smoke budget, shrunk further: a one-block random LM (init.lm None), the generator in
  generator_dir (None: a random one), 6 steps."""
  cfg = load_config('configs/draw.py', f'{name},{stage},smoke')
  cfg.data.update(data_dir=data_dir, num_train=32, num_test=8)
  cfg.model.lm.update(width=32, depth=1, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64)
  cfg.init.lm = None
  cfg.init.generator = generator_dir
  cfg.train.update(steps=6, batch_size=8, warmup_steps=2)
  cfg.checkpoint.update(every=3, async_save=False)
  cfg.log_every = 2
  cfg.eval.update(batch_size=8, max_examples=8, draw_steps=2)
  return cfg


def python_env(num_devices: int | None = None) -> dict[str, str]:
  # MMPROJ_VENV: launch.sh run from a test uses the environment the tests run in.
  env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL='3', MMPROJ_VENV=sys.prefix)
  if num_devices:
    env['XLA_FLAGS'] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={num_devices}".strip()
  return env


def run_script(code: str, *, num_devices: int | None = None, timeout: int = 300) -> str:
  out = subprocess.run([sys.executable, '-c', code], env=python_env(num_devices), capture_output=True,
                       text=True, timeout=timeout, cwd=REPO)
  assert out.returncode == 0, f'subprocess failed:\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}'
  return out.stdout


def fake_venv(tmp_path, script: str = 'echo "$@"'):
  """A venv launch.sh takes as installed (its install stamp is in place), whose python runs `script` instead."""
  venv = tmp_path / 'venv'
  (venv / 'bin').mkdir(parents=True)
  python = venv / 'bin' / 'python'
  python.write_text(f'#!/bin/sh\n{script}\n')
  python.chmod(0o755)
  with open(os.path.join(REPO, 'pyproject.toml'), 'rb') as f:
    # launch.sh's stamp: `cksum < pyproject.toml` (POSIX CRC), computed here the same way.
    crc = subprocess.run(['cksum'], stdin=f, capture_output=True, text=True, check=True).stdout.split()[0]
  (venv / f'.mmproj-installed-{crc}').touch()
  return venv
