"""An exclusive lock between processes on one machine (or a shared file system with flock), so that concurrent
builders of one artifact (a dataset, a stage-0 tower) build it once and the others wait and reuse it."""
from __future__ import annotations

import contextlib
import fcntl
import os


@contextlib.contextmanager
def file_lock(path: str):
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  with open(path, 'a') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)
