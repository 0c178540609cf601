"""Training metrics to the console, TensorBoard event files and WORKDIR/metrics.jsonl (process 0 only)."""
from __future__ import annotations

import json
import os
import time

import jax


def _fmt_seconds(s: float) -> str:
  s = int(max(s, 0))
  return f'{s // 3600}h{s // 60 % 60:02d}m' if s >= 3600 else f'{s // 60}m{s % 60:02d}s'


class MetricWriter:
  """Writes one record per log step. On resume, records past the restored step are dropped first, so the
  files read as one uninterrupted run."""

  def __init__(self, workdir: str, *, total_steps: int, resume_step: int = 0, name: str = ''):
    self.enabled = jax.process_index() == 0
    self.total_steps = total_steps
    self.name = name
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._tb = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    if os.path.exists(self.path):
      with open(self.path) as f:
        kept = [line for line in f if line.strip() and json.loads(line).get('step', 0) <= resume_step]
      with open(self.path, 'w') as f:
        f.writelines(kept)
    from tensorboardX import SummaryWriter  # imported lazily: only process 0 writes events
    self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'), flush_secs=10)
    self._start_time = time.time()
    self._start_step = resume_step

  def write(self, step: int, scalars: dict[str, float], *, console: bool = True) -> None:
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    with open(self.path, 'a') as f:
      f.write(json.dumps({'step': step, **scalars}) + '\n')
    for k, v in scalars.items():
      self._tb.add_scalar(k, v, step)
    if console:
      done = step - self._start_step
      elapsed = time.time() - self._start_time
      eta = elapsed / max(done, 1) * (self.total_steps - step)
      parts = [f'{self.name}step {step}/{self.total_steps}']
      for key, fmt in (('loss', '.4f'), ('accuracy', '.3f'), ('learning_rate', '.2e'), ('steps_per_sec', '.2f'),
                       ('tokens_per_sec', ',.0f'), ('images_per_sec', ',.0f'), ('mfu', '.1%')):
        if key in scalars:
          parts.append(f'{key.replace("_per_sec", "/s").replace("mfu", "MFU")} {scalars[key]:{fmt}}')
      parts.append(f'ETA {_fmt_seconds(eta)}')
      print(' | '.join(parts), flush=True)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
