"""Training metrics: one record per log interval (`LogInterval`), written to the console, TensorBoard event files
and WORKDIR/metrics.jsonl (`MetricWriter`, process 0 only)."""
from __future__ import annotations

import json
import time

import jax
import numpy as np
from etils import epath

from mmproj.train import paths


def _fmt_seconds(s: float) -> str:
  s = int(max(s, 0))
  return f'{s // 3600}h{s // 60 % 60:02d}m' if s >= 3600 else f'{s // 60}m{s % 60:02d}s'


class MetricWriter:
  """Writes one record per log step. On resume, records past the restored step are dropped first, so the
  files read as one uninterrupted run. metrics.jsonl is rewritten whole at each record (paths.write_text), which
  works the same on a local disk and in cloud storage, whose objects cannot be appended to."""

  def __init__(self, workdir: str, *, total_steps: int, resume_step: int = 0, name: str = ''):
    self.enabled = jax.process_index() == 0
    self.total_steps = total_steps
    self.name = name
    self.path = epath.Path(paths.join(workdir, 'metrics.jsonl'))
    self._tb = None
    if not self.enabled:
      return
    self._lines = []
    if self.path.exists():
      self._lines = [line + '\n' for line in self.path.read_text().splitlines()
                     if line.strip() and json.loads(line).get('step', 0) <= resume_step]
      paths.write_text(self.path, ''.join(self._lines))
    from tensorboardX import SummaryWriter  # imported lazily: only process 0 writes events
    self._tb = SummaryWriter(paths.join(workdir, 'tensorboard'), flush_secs=10)
    self._start_time = time.time()
    self._start_step = resume_step

  def write(self, step: int, scalars: dict[str, float], *, console: bool = True) -> None:
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    self._lines.append(json.dumps({'step': step, **scalars}) + '\n')
    paths.write_text(self.path, ''.join(self._lines))
    for k, v in scalars.items():
      self._tb.add_scalar(k, v, step)
    if console:
      done = step - self._start_step
      elapsed = time.time() - self._start_time
      eta = elapsed / max(done, 1) * (self.total_steps - step)
      parts = [f'{self.name}step {step}/{self.total_steps}']
      for key, fmt in (('loss', '.4f'), ('accuracy', '.3f'), ('learning_rate', '.2e'), ('steps_per_sec', '.2f'),
                       ('tokens_per_sec', ',.0f'), ('examples_per_sec', ',.0f'), ('mfu', '.1%')):
        if key in scalars:
          parts.append(f'{key.replace("_per_sec", "/s").replace("mfu", "MFU")} {scalars[key]:{fmt}}')
      parts.append(f'ETA {_fmt_seconds(eta)}')
      print(' | '.join(parts), flush=True)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


class LogInterval:
  """The steps since the last log line -> one record: the mean of each step metric, the last value of running
  ones, the run's total of counted ones, and throughput (steps, tokens and examples per second, FLOP/s per device,
  MFU when the device's peak is known).

  A checkpoint keeps the metrics of the interval it cuts through and the run's counts (`to_meta`), so a resumed
  run logs the same records as one that never stopped."""

  LAST = ('learning_rate', 'nonfinite_steps')   # running values: the last step's
  SUMMED = ('bad_records',)                     # counts: summed over the whole run

  def __init__(self, meta: dict, *, flops_per_step: float, peak_flops: float | None, processes: int,
               log=print):
    # Restored float32, as the step returned them.
    self.pending = [{k: np.float32(v) for k, v in m.items()} for m in meta.get('pending_metrics', [])]
    self.totals = {k: int(meta.get(k, 0)) for k in self.SUMMED}
    self.flops_per_step = flops_per_step
    self.peak_flops = peak_flops
    self.processes = processes
    self.log = log
    self.start()

  def start(self) -> None:
    """Throughput counts the steps this process ran from here (pending may hold restored metrics)."""
    self.steps, self.tokens, self.examples, self.t0 = 0, 0, 0, time.time()

  def add(self, metrics: dict, local_batch: dict) -> None:
    self.pending.append(metrics)
    self.steps += 1
    self.tokens += int(local_batch['input_mask'].sum()) * self.processes
    self.examples += len(local_batch['input_mask']) * self.processes   # rows: images, clips, videos, captions

  def clear(self) -> None:
    self.pending = []

  def record(self, step: int) -> dict[str, float]:
    """The interval's record (and a warning for the bad records it skipped); starts the next interval."""
    values = [jax.device_get(m) for m in self.pending]
    out = {k: float(np.mean([v[k] for v in values])) for k in values[0] if k not in self.LAST + self.SUMMED}
    out.update({k: float(values[-1][k]) for k in self.LAST})
    for k in self.SUMMED:
      if k in values[0]:
        new = int(sum(v[k] for v in values))
        if new:
          self.log(f'WARNING: {new} unreadable data record(s) in steps {step - len(values) + 1}-{step} were skipped '
                   f'(data.bad_records=skip; {self.totals[k] + new} so far)')
        self.totals[k] += new
        out[k] = float(self.totals[k])
    seconds = time.time() - self.t0
    steps_per_sec = self.steps / seconds
    flops_per_device = self.flops_per_step * steps_per_sec / jax.device_count()
    out.update(steps_per_sec=steps_per_sec, tokens_per_sec=self.tokens / seconds,
               examples_per_sec=self.examples / seconds, tflops_per_device=flops_per_device / 1e12)
    if self.peak_flops:
      out['mfu'] = flops_per_device / self.peak_flops
    self.clear()
    self.start()
    return out

  def to_meta(self) -> dict:
    return {**self.totals,
            'pending_metrics': [{k: float(v) for k, v in jax.device_get(m).items()} for m in self.pending]}
