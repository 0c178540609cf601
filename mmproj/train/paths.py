"""The paths of a run, local or in cloud storage: every file the experiment writes or reads in its workdir (config,
tokenizer, checkpoints, metrics.jsonl, TensorBoard events, results.json) goes through etils.epath, so a workdir
`gs://bucket/run` (or s3://) works as a local directory does. Orbax writes the checkpoints' arrays with
TensorStore, which speaks gs:// itself.

The data dir is the exception: TFDS's array_record files are written and read by array_record's C++ writer and
reader through file descriptors, which know local files only, so data.data_dir must be a local path (on a pod, a
local disk or a gcsfuse mount of the bucket); mmproj.data refuses a URL there, naming the field, before
anything is built.
"""
from __future__ import annotations

import os

from etils import epath


def is_url(path) -> bool:
  return '://' in os.fspath(path)


def resolve(path) -> str:
  """An absolute local path (~ expanded), or the URL itself (gs://...) minus a trailing slash."""
  path = os.fspath(path)
  return path.rstrip('/') if is_url(path) else os.path.abspath(os.path.expanduser(path))


def join(root, *parts: str) -> str:
  return os.fspath(epath.Path(resolve(root)).joinpath(*parts))


def write_text(path, text: str) -> None:
  """Replaces the file whole: locally through a temporary file and a rename, in cloud storage as one object upload
  (which becomes visible only once complete). A reader never sees half a file, and a crash mid-write keeps the
  old one."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  if is_url(path):
    path.write_text(text)
    return
  tmp = path.with_name(f'.{path.name}.tmp{os.getpid()}')
  tmp.write_text(text)
  os.replace(tmp, path)

