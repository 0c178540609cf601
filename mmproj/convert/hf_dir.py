"""Reading a Hugging Face model directory without pickle: config.json + safetensors weights.

  config = read_config(path)                 # dict from config.json
  tensors = read_safetensors(path)           # {key: float32/int numpy array}, single file or sharded index
  tensors = read_safetensors(path, keep=lambda key: key.startswith('audio_tower.'))   # only some keys
  write_dir(out_dir, config, tensors, json_files={'generation_config.json': {...}}, copies={'tokenizer.json': f})

Only `*.safetensors` weights are read. A directory that holds only pickle-based weights (pytorch_model.bin,
*.pt, *.pth, *.ckpt) fails with an error naming the file and how to convert it; nothing unpickles.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Callable

import numpy as np

_PICKLE_SUFFIXES = ('.bin', '.pt', '.pth', '.ckpt', '.pkl', '.pickle')
SINGLE_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'


def read_config(path: str) -> dict[str, Any]:
  """config.json of an HF directory; ValueError naming the file when it is missing or not valid JSON."""
  file = os.path.join(path, 'config.json')
  if not os.path.isfile(file):
    raise ValueError(f'{path}: no config.json (not a Hugging Face model directory)')
  try:
    with open(file) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f'{file}: malformed JSON ({e})') from None


def weight_files(path: str) -> list[str]:
  """The safetensors files of an HF directory, in shard order; ValueError when there are none."""
  if not os.path.isdir(path):
    raise ValueError(f'{path}: not a directory')
  index = os.path.join(path, INDEX_FILE)
  if os.path.isfile(index):
    try:
      with open(index) as f:
        weight_map = json.load(f)['weight_map']
    except (json.JSONDecodeError, KeyError) as e:
      raise ValueError(f'{index}: malformed safetensors index ({e!r})') from None
    files = sorted(set(weight_map.values()))
    missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
    if missing:
      raise ValueError(f'{index} names shard(s) that do not exist: {missing}')
    return [os.path.join(path, f) for f in files]
  if os.path.isfile(os.path.join(path, SINGLE_FILE)):
    return [os.path.join(path, SINGLE_FILE)]
  pickled = sorted(f for f in os.listdir(path) if f.endswith(_PICKLE_SUFFIXES))
  if pickled:
    raise ValueError(f'{path}: only pickle-based weights ({pickled[0]}); mmproj reads safetensors only. Convert '
                     'once with transformers: AutoModel.from_pretrained(path).save_pretrained(path, '
                     'safe_serialization=True)')
  raise ValueError(f'{path}: no {SINGLE_FILE} or {INDEX_FILE}')


def safetensors_keys(path: str) -> list[str]:
  """The tensor names of an HF directory's safetensors files, read from their headers (no tensor is loaded)."""
  from safetensors import SafetensorError, safe_open

  keys: list[str] = []
  for file in weight_files(path):
    try:
      with safe_open(file, framework='numpy') as f:
        keys += list(f.keys())
    except (SafetensorError, OSError, ValueError) as e:
      raise ValueError(f'{file}: unreadable safetensors file ({e})') from None
  return keys


def read_safetensors(path: str, keep: Callable[[str], bool] | None = None) -> dict[str, np.ndarray]:
  """The tensors of an HF directory as numpy arrays (bf16/f16 are widened to float32); with `keep`, only the
  keys it accepts are loaded (e.g. one tower of a large checkpoint)."""
  from safetensors import SafetensorError, safe_open

  tensors: dict[str, np.ndarray] = {}
  for file in weight_files(path):
    try:
      with safe_open(file, framework='flax') as f:  # jax arrays: bfloat16 included, which numpy lacks
        shard = {}
        for key in f.keys():
          if keep is None or keep(key):
            v = f.get_tensor(key)
            shard[key] = np.asarray(v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) or
                                    v.dtype.name == 'bfloat16' else v)
    except (SafetensorError, OSError, ValueError) as e:
      raise ValueError(f'{file}: unreadable safetensors file ({e})') from None
    for key, value in shard.items():
      if key in tensors:
        raise ValueError(f'{file}: key {key!r} appears in more than one shard')
      tensors[key] = value
  return tensors


def write_dir(out_dir: str, config: dict[str, Any], tensors: dict[str, np.ndarray], *,
              json_files: dict[str, dict] | None = None, copies: dict[str, str] | None = None) -> str:
  """Writes an HF directory (config.json, model.safetensors, more JSON files, copies of files) whole: into a
  temporary sibling, renamed into place at the end, so a reader never sees half a directory and an existing
  out_dir is never overwritten (FileExistsError). Returns out_dir."""
  from safetensors.numpy import save_file

  out_dir = os.path.abspath(os.path.expanduser(out_dir))
  if os.path.exists(out_dir):
    raise FileExistsError(f'{out_dir} exists: export into a new directory')
  for name, src in (copies or {}).items():
    if not os.path.isfile(src):
      raise FileNotFoundError(f'{name}: {src} does not exist')
  os.makedirs(os.path.dirname(out_dir), exist_ok=True)
  tmp = tempfile.mkdtemp(dir=os.path.dirname(out_dir), prefix=f'.{os.path.basename(out_dir)}-')
  try:
    for name, obj in {'config.json': config, **(json_files or {})}.items():
      with open(os.path.join(tmp, name), 'w') as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write('\n')
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, os.path.join(tmp, SINGLE_FILE),
              metadata={'format': 'pt'})
    for name, src in (copies or {}).items():
      shutil.copyfile(src, os.path.join(tmp, name))
    os.rename(tmp, out_dir)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp)
  return out_dir
