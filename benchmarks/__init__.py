"""Benchmarks against the reference implementations: `python -m benchmarks [--quick] [--only NAME] [--out FILE]`.

Three sections, each a module with a `run(opts) -> Section`:
  projectors   forward+backward of every projector that has a transformers reference (mmproj.convert) vs that
               PyTorch module, same weights, f32; achieved matmul GFLOP/s and the fraction of the measured f32
               matmul peak (benchmarks/projectors.py)
  train_step   the mmproj stage-1 LLaVA train step vs transformers' LlavaForConditionalGeneration + AdamW on the
               projector, same weights, tokens/s (benchmarks/train_step.py)
  pipeline     examples/s of the grain loaders (shapes world, LLaVA JSON) vs the examples/s the quickstart train
               step consumes (benchmarks/pipeline.py)
`python -m benchmarks` (benchmarks/__main__.py) pins both frameworks to the same CPU threads, runs the sections
and writes the markdown report (BENCHMARKS.md). Our side runs under two kernel settings (SETTINGS): 'xla', the
default on every platform, and 'cpu-tuned' (model.kernels dense='cpu_transpose_copy', attention='query_blocks');
the goals are judged on the CPU-tuned one, and every row reports both.

This file holds what the sections share: the options, interleaved timing (A, B, A, B, ...; warm-up excluded;
median), the section/row containers, machine facts for the report, and a per-op profile of a jitted function
(jax.profiler trace -> time per compiled HLO op, split into matmul kernels and the rest).
jax and torch are imported lazily, so that __main__ can pin the threads before either starts its thread pools.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import glob
import math
import os
import platform
import re
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

SECTIONS = ('projectors', 'train_step', 'pipeline')
# Our side runs under both kernel settings (model.kernels, mmproj/layers/kernels.py): the default every platform
# gets, plain XLA, and the CPU-tuned choices the goals are judged on.
SETTINGS = {'xla': dict(dense='xla', attention='xla'),
            'cpu-tuned': dict(dense='cpu_transpose_copy', attention='query_blocks')}
GOAL_SETTING = 'cpu-tuned'


def kernels_of(setting: str):
  """The mmproj.layers.kernels.Kernels of a SETTINGS name."""
  from mmproj.layers import kernels
  return kernels.Kernels(**SETTINGS[setting])


@dataclasses.dataclass
class Options:
  """What to run and how long.

  quick: tiny shapes, for tests and a smoke run (numbers are meaningless); iters: timed iterations per side
  (median reported); warmup: untimed calls first (compile, allocator warm-up); only: run only the rows (or
  sections) whose name contains this string; threads: CPU threads both frameworks use; profile: trace the rows
  that miss a goal (per-op time split) for the report; data_dir: where the pipeline section builds or finds its
  data sets (None: the quickstart config's data_dir for the full run, a temporary directory for --quick);
  settings: the kernel settings (SETTINGS) ours runs under in this process."""
  quick: bool = False
  iters: int = 5
  warmup: int = 1
  only: str | None = None
  threads: int = 2
  profile: bool = True
  data_dir: str | None = None
  log: Callable[[str], None] = print
  settings: tuple[str, ...] = tuple(SETTINGS)   # the kernel settings of ours measured here (a child: one)

  def wants(self, name: str) -> bool:
    """Does --only select `name` (a row name like 'projectors/llava_mlp', or a section name)?"""
    if not self.only:
      return True
    return self.only in name or name.split('/')[0] == self.only


@dataclasses.dataclass
class Row:
  """One measured comparison. `values` are the table cells (column -> number or text); `goals` the issue's goals
  this row is judged against: (goal text, measured value, threshold, met); `notes` free text (parity, profile)."""
  name: str
  values: dict[str, Any]
  goals: list[tuple[str, float, float, bool]] = dataclasses.field(default_factory=list)
  notes: list[str] = dataclasses.field(default_factory=list)

  def goal(self, text: str, value: float, threshold: float) -> bool:
    met = bool(math.isfinite(value) and value >= threshold)
    self.goals.append((text, float(value), float(threshold), met))
    return met

  def to_json(self) -> dict[str, Any]:
    return {'name': self.name, 'values': self.values, 'goals': [list(g) for g in self.goals], 'notes': self.notes}

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> 'Row':
    return cls(d['name'], dict(d['values']), [tuple(g) for g in d['goals']], list(d['notes']))


@dataclasses.dataclass
class Section:
  """A section of the report: title, column order, rows, and paragraphs before / after the table."""
  name: str
  title: str
  columns: list[str]
  rows: list[Row] = dataclasses.field(default_factory=list)
  intro: list[str] = dataclasses.field(default_factory=list)
  notes: list[str] = dataclasses.field(default_factory=list)
  seconds: float = 0.0

  def to_json(self) -> dict[str, Any]:
    return {'name': self.name, 'title': self.title, 'columns': self.columns, 'rows': [r.to_json() for r in self.rows],
            'intro': self.intro, 'notes': self.notes, 'seconds': self.seconds}

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> 'Section':
    return cls(d['name'], d['title'], list(d['columns']), [Row.from_json(r) for r in d['rows']], list(d['intro']),
               list(d['notes']), float(d['seconds']))


def merge_settings(rows: list[Row]) -> Row:
  """One row from the rows (in SETTINGS order) of one case measured with one kernel setting per process, each
  against its own torch calls (benchmarks/__main__.py says why): per-setting cells from their own row, shared
  cells (torch, peaks) and goals from the goal setting's, parity and spread joined, notes without repeats."""
  goal = rows[list(SETTINGS).index(GOAL_SETTING)]
  merged = Row(goal.name, dict(goal.values), list(goal.goals), list(goal.notes))
  for row in rows:
    for key, value in row.values.items():
      merged.values.setdefault(key, value)
    merged.goals += [g for g in row.goals if g not in merged.goals]
    merged.notes += [n for n in row.notes if n not in merged.notes]
  for key in ('parity (fwd / grad)', 'spread (ours / torch)'):
    merged.values[key] = ', '.join(r.values[key] for r in rows if key in r.values)
  return merged


def merge_sections(sections: list[Section]) -> Section:
  """One section from the same section run once per kernel setting (in SETTINGS order): rows in that order,
  notes without repeats, seconds summed."""
  merged = Section(sections[0].name, sections[0].title, list(sections[0].columns), intro=list(sections[0].intro))
  for sec in sections:
    merged.rows += sec.rows
    merged.notes += [n for n in sec.notes if n not in merged.notes]
    merged.seconds += sec.seconds
  return merged


# ------------------------------------------------------------------------------------------------ timing


def interleaved(fns: Sequence[tuple[str, Callable[[], Any]]], *, iters: int, warmup: int,
                log: Callable[[str], None] | None = None, back_to_back: int = 1) -> dict[str, list[float]]:
  """Times each fn `iters` times in turn (a, b, a, b, ...) after `warmup` untimed rounds -> {name: [seconds]}.

  Every fn must finish its work before returning (jax: block_until_ready). Interleaving makes slow drifts of a
  shared machine (other jobs starting, thermal state) hit all sides alike instead of whichever ran last.
  Garbage collection runs before each round (a, b, ...) and is disabled inside it.

  back_to_back=k > 1: each turn calls the fn k times in a row and times the last call (a, a, b, b, ...), i.e. the
  steady state of a loop of that fn, as a training loop runs its step; the first call's times come back too,
  under '<name> [first]' (that call runs right after the other side's, with their memory and caches).
  """
  for _ in range(warmup):
    for _, fn in fns:
      fn()
  times: dict[str, list[float]] = {name: [] for name, _ in fns}
  if back_to_back > 1:
    times.update({f'{name} [first]': [] for name, _ in fns})
  for i in range(iters):
    gc.collect()
    gc.disable()
    try:
      for name, fn in fns:
        for j in range(back_to_back):
          t0 = time.perf_counter()
          fn()
          elapsed = time.perf_counter() - t0
          if j == 0 and back_to_back > 1:
            times[f'{name} [first]'].append(elapsed)
        times[name].append(elapsed)
    finally:
      gc.enable()
    if log:
      log('    iter %d: %s' % (i + 1, ', '.join(f'{n} {times[n][-1] * 1e3:.1f} ms' for n, _ in fns)))
  return times


def best_time(call: Callable[[], Any], calls: int) -> float:
  """Least wall time (s) of `calls` calls of call(), which must finish its work before returning (jax:
  block_until_ready)."""
  best = math.inf
  for _ in range(calls):
    t0 = time.perf_counter()
    call()
    best = min(best, time.perf_counter() - t0)
  return best


def median(xs: Sequence[float]) -> float:
  return float(statistics.median(xs)) if xs else math.nan


def spread(xs: Sequence[float]) -> float:
  """(max - min) / median of the timed iterations: how noisy a measurement was."""
  if len(xs) < 2:
    return 0.0
  return (max(xs) - min(xs)) / median(xs)


def xla_cost(compiled: Any, key: str) -> float:
  """One figure of XLA's cost analysis of a compiled executable ('flops', 'bytes accessed'; after its dead-code
  elimination); NaN when the backend gives none."""
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get(key, math.nan))
  except Exception:  # pylint: disable=broad-except
    return math.nan


def ratio(a: float, b: float) -> float:
  return a / b if b > 0 and math.isfinite(a) and math.isfinite(b) else math.nan


# ------------------------------------------------------------------------------------------------ peaks


def measure_matmul_peak(dtype: str = 'float32', size: int = 1024, seconds: float = 0.5) -> float:
  """FLOP/s of a jitted size x size matmul in `dtype` on the first device: one warm-up call (compile), then timed
  calls until `seconds` have passed (at least 3); the best call counts, 2 * size^3 / time. The achievable matmul
  rate of a host without a published peak (a CPU): set it as train.device_peak_flops for MFU there."""
  import jax
  import jax.numpy as jnp
  a = jnp.ones((size, size), dtype)
  b = jnp.full((size, size), 0.5, dtype)
  matmul = jax.jit(lambda a, b: a @ b)
  jax.block_until_ready(matmul(a, b))
  best, calls, start = math.inf, 0, time.perf_counter()
  while calls < 3 or time.perf_counter() - start < seconds:
    t0 = time.perf_counter()
    jax.block_until_ready(matmul(a, b))
    best = min(best, time.perf_counter() - t0)
    calls += 1
  return 2 * size ** 3 / best


def matmul_peaks(threads: int, size: int = 1024, seconds: float = 1.0) -> dict[str, float]:
  """f32 matmul FLOP/s of this host: XLA (measure_matmul_peak, best call of a jitted size x size matmul) and PyTorch (the same matmul and best-call rule, torch.set_num_threads(threads)), and the
  memory bandwidth XLA reaches on a large elementwise op (bytes read + written per second, best call)."""
  import jax
  import jax.numpy as jnp
  import torch

  out = {'xla_f32': measure_matmul_peak('float32', size=size, seconds=seconds)}
  torch.set_num_threads(threads)
  a = torch.ones(size, size)
  b = torch.full((size, size), 0.5)
  torch.mm(a, b)
  best, start, calls = math.inf, time.perf_counter(), 0
  while calls < 3 or time.perf_counter() - start < seconds:
    t0 = time.perf_counter()
    torch.mm(a, b)
    best = min(best, time.perf_counter() - t0)
    calls += 1
  out['torch_f32'] = 2 * size ** 3 / best
  n = 16 * 2 ** 20                                     # 64 MiB in, 64 MiB out
  x = jnp.ones((n,), jnp.float32)
  scale = jax.jit(lambda x: x * 1.5 + 1.0)
  jax.block_until_ready(scale(x))
  best, start, calls = math.inf, time.perf_counter(), 0
  while calls < 3 or time.perf_counter() - start < seconds / 2:
    t0 = time.perf_counter()
    jax.block_until_ready(scale(x))
    best = min(best, time.perf_counter() - t0)
    calls += 1
  out['xla_bandwidth'] = 2 * 4 * n / best
  return out


class PeakProbe:
  """The f32 matmul peak under the conditions of the rows being timed: one call = a few jitted size x size XLA
  matmuls and torch.mm's, best call of each kept. Passed to `interleaved` as one more side, it samples the peak in
  every round of a comparison, so that on a shared machine a row's roofline reads against the compute available
  while it ran (a peak measured once at the start was off by 2x when another job started)."""

  def __init__(self, threads: int, size: int = 1024, calls: int = 4):
    import jax
    import jax.numpy as jnp
    import torch

    torch.set_num_threads(threads)
    self.size, self.calls = size, calls
    self._a = jnp.ones((size, size), jnp.float32)
    self._b = jnp.full((size, size), 0.5, jnp.float32)
    self._mm = jax.jit(lambda a, b: a @ b)
    jax.block_until_ready(self._mm(self._a, self._b))
    self._ta, self._tb = torch.ones(size, size), torch.full((size, size), 0.5)
    torch.mm(self._ta, self._tb)
    self.reset()

  def reset(self) -> None:
    self.xla_samples: list[float] = []
    self.torch_samples: list[float] = []

  def __call__(self) -> None:
    import jax
    import torch

    flops = 2 * self.size ** 3
    self.xla_samples.append(flops / best_time(lambda: jax.block_until_ready(self._mm(self._a, self._b)), self.calls))
    self.torch_samples.append(flops / best_time(lambda: torch.mm(self._ta, self._tb), max(1, self.calls // 2)))

  def xla(self, default: float = math.nan) -> float:
    """The best XLA matmul rate (FLOP/s) seen since reset(): measure_matmul_peak's best-call rule over every
    round of the row. (Not the median: on the 2-core development machine the rate of the same 1024 matmul is
    bimodal, ~220 or ~440 GFLOP/s, one or both cores doing the work, with no other load and no steal time.)"""
    return max(self.xla_samples) if self.xla_samples else default

  def torch(self, default: float = math.nan) -> float:
    """The best torch.mm rate (FLOP/s) seen since reset()."""
    return max(self.torch_samples) if self.torch_samples else default


# ------------------------------------------------------------------------------------------------ profiles


_COMPUTATION = re.compile(r'^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*\S+\s+([\w\-]+)\(')
_CALLS = re.compile(r'(?:calls|to_apply|body|condition|branch_computations)=\{?%?([\w.\-]+)')


def hlo_matmul_ops(hlo_text: str) -> set[str]:
  """Names of the instructions of a compiled HLO module that run a matmul or convolution: dot / convolution
  instructions and fusions (or calls) whose computation holds one, at any depth."""
  body: dict[str, list[tuple[str, str, list[str]]]] = {}
  current = None
  for line in hlo_text.splitlines():
    m = _COMPUTATION.match(line)
    if m and '=' not in line.split('{')[0]:
      current = m.group(1)
      body[current] = []
      continue
    m = _INSTRUCTION.match(line)
    if m and current is not None:
      body[current].append((m.group(1), m.group(2), _CALLS.findall(line)))
  has_dot: dict[str, bool] = {}

  def holds(comp: str, depth: int = 0) -> bool:
    if comp not in has_dot:
      has_dot[comp] = False
      has_dot[comp] = any(op in ('dot', 'convolution') or any(holds(c, depth + 1) for c in calls)
                          for _, op, calls in body.get(comp, ()))
    return has_dot[comp]

  names = set()
  for comp, instrs in body.items():
    for name, op, calls in instrs:
      if op in ('dot', 'convolution') or any(holds(c) for c in calls):
        names.add(name)
  return names


_OP_NAME = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?metadata=\{[^}]*op_name="([^"]*)"')


def hlo_op_names(hlo_text: str, parts: int = 2) -> dict[str, str]:
  """Instruction name -> the last `parts` components of the JAX op_name in its metadata (what produced it, e.g.
  'softmax/exp' or 'transpose(jvp(Attention))/dot_general'), for naming the non-matmul ops of a profile."""
  out = {}
  for line in hlo_text.splitlines():
    m = _OP_NAME.match(line)
    if m:
      out[m.group(1)] = '/'.join(m.group(2).split('/')[-parts:])
  return out


def _op_class(name: str, matmuls: set[str]) -> str:
  if name in matmuls:
    return 'matmul'
  low = name.lower()
  if 'copy' in low or 'transpose' in low:
    return 'copy/transpose'
  if 'reduce' in low:
    return 'reduce'
  return 'elementwise/other'


# Threads of XLA's CPU runtime whose trace lines hold the executed thunks: the client's and Eigen pool's (jax 0.10),
# and the execute pool's (jax 0.12).
CPU_RUNTIME_THREADS = ('XLAPjRtCpuClient', 'XLAEigen', 'XLAExecute')


def profile_jax(run: Callable[[], Any], hlo_text: str, *, calls: int = 2,
                flops: float | None = None) -> dict[str, Any]:
  """Runs `run()` (one blocking call of a jitted function) `calls` times under jax.profiler.trace and splits the
  time of the compiled HLO ops it executes: {'wall_s': seconds per call, 'op_s': summed op time per call,
  'classes': {class: seconds per call}, 'top': [(op, class, seconds per call)] (ten largest), 'matmul_gflops':
  flops / matmul op time}.

  `hlo_text` is the compiled module's text (`jitted.lower(*args).compile().as_text()`; lowering does not consume
  donated buffers). Op events come from the XLA CPU runtime's trace lines (one event per executed thunk, named
  after the HLO instruction; runtime wrappers such as 'ThunkExecutor::Execute' are skipped); an instruction is
  'matmul' when it is a dot / convolution or a fusion holding one (`hlo_matmul_ops`). Ops of one call may overlap
  on several runtime threads, so op_s can exceed wall_s."""
  import jax
  from jax.profiler import ProfileData

  matmuls = hlo_matmul_ops(hlo_text)
  op_names = hlo_op_names(hlo_text)
  run()
  with tempfile.TemporaryDirectory() as d:
    t0 = time.perf_counter()
    with jax.profiler.trace(d):
      for _ in range(calls):
        run()
    wall = (time.perf_counter() - t0) / calls
    files = glob.glob(os.path.join(d, '**', '*.xplane.pb'), recursive=True)
    data = ProfileData.from_file(files[-1]) if files else None
  per_op: dict[str, float] = {}
  if data is not None:
    for plane in data.planes:
      for line in plane.lines:
        if not any(pool in line.name for pool in CPU_RUNTIME_THREADS):
          continue
        for ev in line.events:
          if ev.name.startswith('end: ') or '::' in ev.name:
            continue
          per_op[ev.name] = per_op.get(ev.name, 0.0) + ev.duration_ns * 1e-9 / calls
  classes: dict[str, float] = {}
  for name, sec in per_op.items():
    cls = _op_class(name, matmuls)
    classes[cls] = classes.get(cls, 0.0) + sec
  ranked = sorted(((n, _op_class(n, matmuls), s) for n, s in per_op.items()), key=lambda t: -t[2])
  other = [(f'{n} [{op_names.get(n, "?")}]', c, s) for n, c, s in ranked if c != 'matmul'][:4]
  op_s = sum(per_op.values())
  mm = classes.get('matmul', 0.0)
  return {'wall_s': wall, 'op_s': op_s, 'classes': classes, 'top': ranked[:10], 'top_other': other,
          'matmul_gflops': (flops / mm / 1e9) if flops and mm > 0 else math.nan}


def profile_torch(fn: Callable[[], Any], calls: int = 2) -> dict[str, Any]:
  """torch.profiler over `calls` calls of fn: {'classes': {class: seconds per call}, 'top': [(op, seconds per
  call)]} by self CPU time of the aten ops; matmul = mm / addmm / bmm / baddbmm / matmul / linear / conv /
  scaled-dot-product kernels."""
  import torch

  fn()
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    for _ in range(calls):
      fn()
  classes: dict[str, float] = {}
  rows = []
  for ev in prof.key_averages():
    sec = ev.self_cpu_time_total * 1e-6 / calls
    if sec <= 0:
      continue
    name = ev.key
    low = name.lower()
    if any(k in low for k in ('mm', 'matmul', 'linear', 'conv', 'dot', 'scaled_dot_product', 'gemm')):
      cls = 'matmul'
    elif any(k in low for k in ('copy', 'transpose', 'contiguous', 'clone', 'cat', 'permute')):
      cls = 'copy/transpose'
    elif 'autograd' in low or 'backward' in low or 'optim' in low or 'profiler' in low:
      cls = 'framework'
    else:
      cls = 'elementwise/other'
    classes[cls] = classes.get(cls, 0.0) + sec
    rows.append((name, sec))
  rows.sort(key=lambda r: -r[1])
  return {'classes': classes, 'top': rows[:8]}


def format_profile(p: dict[str, Any], what: str = 'ours') -> str:
  """One line: where the time of a profiled call went, by op class, with the three largest ops."""
  total = sum(p['classes'].values()) or math.nan
  parts = ', '.join(f'{c} {s / total:.0%}' for c, s in sorted(p['classes'].items(), key=lambda kv: -kv[1]))
  top = p['top'][:3]
  tops = ', '.join(f'{t[0]} {t[-1] * 1e3:.1f} ms' for t in top)
  extra = ''
  if 'matmul_gflops' in p and math.isfinite(p['matmul_gflops']):
    extra = f'; inside its matmul kernels {p["matmul_gflops"]:.0f} GFLOP/s'
  others = ''
  if p.get('top_other'):
    others = '; largest non-matmul ops: ' + ', '.join(f'{t[0]} {t[-1] * 1e3:.1f} ms' for t in p['top_other'][:3])
  return f'{what}: op time {total * 1e3:.1f} ms/call = {parts}{extra}; largest ops: {tops}{others}'


# ------------------------------------------------------------------------------------------------ machine


def cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or 'unknown'


def cpu_flags() -> str:
  """The SIMD extensions of note in /proc/cpuinfo (avx2, avx512f, amx, ...)."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('flags'):
          flags = set(line.split(':', 1)[1].split())
          keep = [x for x in ('avx2', 'fma', 'avx512f', 'avx512_bf16', 'avx512_vnni', 'amx_tile') if x in flags]
          return ' '.join(keep)
  except OSError:
    pass
  return ''


def other_processes(limit: int = 5, window: float = 1.0) -> list[str]:
  """The busiest other processes right now (name, %CPU over a short window, command line head): what else the
  machine was running while the numbers were taken."""
  try:
    import psutil
  except ImportError:
    return []
  me = os.getpid()
  procs = []
  for p in psutil.process_iter(['pid', 'name', 'cmdline']):
    try:
      if p.info['pid'] == me:
        continue
      p.cpu_percent(None)
      procs.append(p)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
      pass
  time.sleep(window)
  rows = []
  for p in procs:
    try:
      cpu = p.cpu_percent(None)
      if cpu >= 5.0:
        cmd = ' '.join(p.info['cmdline'] or [p.info['name'] or '?'])
        rows.append((cpu, f'{cpu:.0f}% {cmd[:110]}'))
    except (psutil.NoSuchProcess, psutil.AccessDenied):
      pass
  rows.sort(key=lambda r: -r[0])
  return [r[1] for r in rows[:limit]]


def load_average() -> tuple[float, float, float]:
  try:
    return os.getloadavg()
  except OSError:
    return (math.nan, math.nan, math.nan)


def machine_info(threads: int) -> dict[str, Any]:
  """Facts for the report header: CPU, cores, memory, load, date, library versions, thread settings."""
  import jax
  import jaxlib

  info: dict[str, Any] = {
      'date': datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z'),
      'cpu': cpu_model(), 'cpu_flags': cpu_flags(), 'cores': os.cpu_count(),
      'affinity': sorted(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else None,
      'threads': threads, 'load': load_average(), 'python': platform.python_version(),
      'jax': jax.__version__, 'jaxlib': jaxlib.__version__, 'xla_flags': os.environ.get('XLA_FLAGS', ''),
  }
  try:
    with open('/proc/meminfo') as f:
      mem = {line.split(':')[0]: int(line.split()[1]) for line in f if line.split()[0] in ('MemTotal:',
                                                                                             'MemAvailable:')}
    info['mem_gib'] = mem.get('MemTotal', 0) / 2 ** 20
    info['mem_avail_gib'] = mem.get('MemAvailable', 0) / 2 ** 20
  except (OSError, ValueError, IndexError):
    pass
  try:                     # transparent huge pages: 'always [madvise] never' -> 'madvise' (see GLIBC_TUNABLES)
    with open('/sys/kernel/mm/transparent_hugepage/enabled') as f:
      info['thp'] = re.search(r'\[(\w+)\]', f.read()).group(1)
  except (OSError, AttributeError):
    info['thp'] = 'unknown'
  for mod in ('torch', 'transformers', 'flax', 'grain'):
    try:
      info[mod] = __import__(mod).__version__
    except (ImportError, AttributeError):
      info[mod] = 'n/a'
  try:
    import torch
    info['torch_threads'] = torch.get_num_threads()
    info['torch_blas'] = 'MKL' if torch.backends.mkl.is_available() else 'other'
  except ImportError:
    pass
  return info


# ------------------------------------------------------------------------------------------------ formatting


def fmt(value: Any, digits: int = 3) -> str:
  """A table cell: floats with `digits` significant digits, NaN as 'n/a', everything else str()."""
  if isinstance(value, bool):
    return 'yes' if value else 'no'
  if isinstance(value, float):
    if not math.isfinite(value):
      return 'n/a'
    if value != 0 and (abs(value) >= 10 ** digits or abs(value) < 10 ** -2):
      return f'{value:.{digits}g}'
    return f'{value:.{digits}g}' if abs(value) >= 1 else f'{value:.{digits}f}'.rstrip('0').rstrip('.')
  return str(value)


def flop_str(flops: float) -> str:
  """'1.23 TFLOP' / '456 GFLOP' / ... for notes."""
  for name, scale in (('PFLOP', 1e15), ('TFLOP', 1e12), ('GFLOP', 1e9), ('MFLOP', 1e6), ('kFLOP', 1e3)):
    if abs(flops) >= scale:
      return f'{flops / scale:.3g} {name}'
  return f'{flops:.3g} FLOP'


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  head = '| ' + ' | '.join(columns) + ' |'
  sep = '|' + '|'.join('---' for _ in columns) + '|'
  body = ['| ' + ' | '.join(fmt(v).replace('|', '/') for v in row) + ' |' for row in rows]
  return '\n'.join([head, sep, *body])


__all__ = ['Options', 'PeakProbe', 'Row', 'SECTIONS', 'Section', 'flop_str', 'fmt', 'format_profile',
           'hlo_matmul_ops', 'hlo_op_names', 'interleaved', 'machine_info', 'markdown_table', 'matmul_peaks',
           'median', 'other_processes', 'profile_jax', 'profile_torch', 'ratio', 'spread']
