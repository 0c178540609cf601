"""Measurements behind the analysis in BENCHMARKS.md, each one command.

  python -m benchmarks.diagnose faults [--calls 5] [--quick]
      Page faults and kernel time per call of a jitted forward + backward (value_and_grad of every param) of the
      Idefics2-8B perceiver resampler (mmproj's own module, random init: no torch) under three malloc settings,
      each in a fresh process pinned to the same CPUs: glibc's defaults (every call maps its gradients and
      temporaries afresh: ~3 GB, ~760,000 faults of 4 KiB pages), GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (huge
      pages on those mappings: fewer faults, no faster here), and benchmarks.host_malloc.REUSE (freed memory reused:
      no faults after the first call), the setting launch.sh and the bench use.

  python -m benchmarks.diagnose matmul-forms [--quick]
      GFLOP/s of the three matmuls of a dense layer's forward + backward, at the bench's projector shapes:
      y = x W (forward), dx = dy W^T, dW = x^T dy (contracting over the tokens), plus dW with x^T materialised
      first (a transpose copy, then a plain matmul). XLA CPU (jax 0.10) runs the first two and the last as
      YNNPACK fusions, and dW as a slower Eigen dot; mmproj's dense layers take the last form
      (mmproj/layers/matmul.py).

  python -m benchmarks.diagnose matmul-tokens [--dims D F] [--quick]
      Time of y = x W, W [D, F], against the token rows T of x, and the least-squares line time = a + b T: a is
      the part of every call that does not depend on T, b the time per token row; beside them, the time of one
      plain read of W (a column sum), to compare a with. Default W: SmolVLM-Instruct's connector (x3 shuffle of
      SigLIP-so400m, 10368 x 2048, 85 MB). With few rows per weight byte (SmolVLM's 81 tokens a tile) the fixed
      part keeps the forward and input-gradient matmuls well below the 1024^3 peak.

  python -m benchmarks.diagnose train-step [--calls 4]
      The bench's LLaVA stage-1 train step (benchmarks.train_step) timed three ways, each in a fresh process
      pinned to the same CPUs: ours alone, theirs (transformers) alone, and both in one process, alternating. Why
      the bench runs theirs in a process of its own. The children run under the bench's malloc setting
      (benchmarks.host_malloc.REUSE) unless GLIBC_TUNABLES is set: `GLIBC_TUNABLES= python -m benchmarks.diagnose
      train-step` times the same steps with glibc's defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from benchmarks import host_malloc
from benchmarks import GOAL_SETTING, best_time

ENV_CHILD = 'MMPROJ_DIAGNOSE_CHILD'
TOKENS_DIMS = (10368, 2048)        # matmul-tokens: W [D, F], SmolVLM-Instruct's connector
TOKENS_QUICK_DIMS = (256, 128)     # matmul-tokens --quick


def _perceiver_fn(quick: bool):
  import jax
  import jax.numpy as jnp

  from mmproj.projectors.perceiver import PerceiverResampler

  d, latents, depth, heads, kv, hd, n = (32, 4, 2, 4, 2, 8, 9) if quick else (4096, 64, 3, 16, 4, 128, 729)
  module = PerceiverResampler(in_dim=d, out_dim=d, variant='idefics2', num_latents=latents, depth=depth,
                              num_heads=heads, num_kv_heads=kv, head_dim=hd, proj='none')
  x = jax.random.normal(jax.random.key(0), (1, n, d), jnp.float32)
  params = jax.jit(module.init)(jax.random.key(1), x)['params']

  def loss(p, x):
    return jnp.mean(jnp.square(module.apply({'params': p}, x)))

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  return lambda: jax.block_until_ready(step(params, x))


def faults_child(calls: int, quick: bool) -> list[dict[str, float]]:
  """Per call of the perceiver's forward + backward: wall, user and system seconds, minor page faults."""
  run = _perceiver_fn(quick)
  run()                                                         # compile + first touch
  out = []
  for _ in range(calls):
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    run()
    r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    out.append({'wall': t1 - t0, 'user': r1.ru_utime - r0.ru_utime, 'sys': r1.ru_stime - r0.ru_stime,
                'minflt': r1.ru_minflt - r0.ru_minflt})
  return out


def faults(calls: int, quick: bool, threads: int) -> int:
  cpus = sorted(os.sched_getaffinity(0))[:threads] if hasattr(os, 'sched_getaffinity') else None
  print(f'perceiver forward + backward ({"tiny" if quick else "Idefics2-8B sizes, 667M params"}), {calls} calls '
        f'after a warm-up, CPUs {cpus}; median over the calls:')
  settings = (('glibc defaults', ''), ('glibc.malloc.hugetlb=1', 'glibc.malloc.hugetlb=1'),
              ('host_malloc.REUSE', host_malloc.REUSE))
  for label, tunables in settings:
    env = dict(os.environ, GLIBC_TUNABLES=tunables, **{ENV_CHILD: '1'})
    cmd = [sys.executable, '-m', 'benchmarks.diagnose', 'faults', '--calls', str(calls)] + (['--quick'] * quick)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False,
                          preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
    if proc.returncode != 0:
      print(proc.stdout + proc.stderr, file=sys.stderr)
      return proc.returncode
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    med = {k: sorted(r[k] for r in rows)[len(rows) // 2] for k in rows[0]}
    print(f'  {label:24s} wall {med["wall"]:.3f} s  user {med["user"]:.2f} s  sys {med["sys"]:.2f} s  '
          f'minor faults {med["minflt"]:,.0f}')
  return 0


def train_step_child(which: str, calls: int, quick: bool) -> dict[str, list[float]]:
  """Seconds per step of 'ours' (the CPU-tuned kernel setting), 'theirs' or 'both' (alternating in this process),
  after one untimed step each."""
  import gc

  import jax

  from benchmarks import train_step as ts
  from mmproj.train import trainer

  z = ts.sizes(quick)
  steps = {}
  setups, params, ours_batch, theirs_batch = ts.prepare(z)
  s = setups[GOAL_SETTING]
  if which in ('ours', 'both'):
    with jax.set_mesh(s.mesh):
      box = [jax.jit(lambda p: trainer.TrainState.create(p, s.tx.init(p)), out_shardings=s.state_sharding)(params)]
      batch, rng, step_fn = trainer.global_batch(s, ours_batch), jax.random.key(1), trainer.make_train_step(s)

    def ours():
      with jax.set_mesh(s.mesh):
        box[0], metrics = step_fn(box[0], batch, rng)
        jax.block_until_ready((box[0], metrics))
    steps['ours'] = ours
  del params                                      # the step's state holds its own copy
  gc.collect()
  if which in ('theirs', 'both'):
    steps['theirs'] = ts._torch_side(z, theirs_batch, len(os.sched_getaffinity(0)))[0]  # pylint: disable=protected-access
  times = {name: [] for name in steps}
  for fn in steps.values():
    fn()
  for _ in range(calls):
    for name, fn in steps.items():
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
  return times


def train_step(calls: int, quick: bool, threads: int) -> int:
  cpus = sorted(os.sched_getaffinity(0))[:threads]
  print(f'LLaVA stage-1 train step of benchmarks.train_step ({"tiny" if quick else "full bench sizes"}), {calls} '
        f'timed steps per side after one untimed, CPUs {cpus}, OMP_WAIT_POLICY=PASSIVE as in the bench, '
        f'{host_malloc.describe(host_malloc.with_reuse(dict(os.environ)))}:')
  for which in ('ours', 'theirs', 'both'):
    env = host_malloc.with_reuse(dict(os.environ, **{ENV_CHILD: '1'}))
    env.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
    env.setdefault('OMP_NUM_THREADS', str(threads))
    cmd = [sys.executable, '-m', 'benchmarks.diagnose', 'train-step', '--which', which, '--calls', str(calls)]
    proc = subprocess.run(cmd + ['--quick'] * quick, env=env, capture_output=True, text=True, check=False,
                          preexec_fn=lambda: os.sched_setaffinity(0, cpus))
    if proc.returncode != 0:
      print(proc.stdout + proc.stderr, file=sys.stderr)
      return proc.returncode
    times = json.loads(proc.stdout.strip().splitlines()[-1])
    label = {'ours': 'ours alone', 'theirs': 'theirs alone', 'both': 'both in one process'}[which]
    print(f'  {label:20s} ' + '; '.join(f'{name} ' + ' '.join(f'{t:.2f}' for t in ts) + ' s'
                                       for name, ts in times.items()))
  return 0


def matmul_forms(quick: bool) -> list[tuple[str, str, float]]:
  """[(shape, form, GFLOP/s best of 10)] for each dense shape (tokens T, in D, out F)."""
  import jax
  import jax.numpy as jnp

  shapes = [(64, 32, 48)] if quick else [
      (1152, 1024, 4096),     # llava_mlp linear_1: 2 x 576 tokens, 1024 -> 4096
      (1152, 4096, 4096),     # llava_mlp linear_2
      (338, 4608, 4096),      # idefics3_connector: 2 tiles x 169 tokens after the x2 shuffle, 1152*4 -> 4096
      (2197, 4608, 4096),     # the same for 13 tiles (one 4:3 image as Idefics3's processor splits it)
      (162, 10368, 2048),     # SmolVLM-Instruct's connector: 2 tiles x 81 tokens after the x3 shuffle -> 2048
      (512, 5120, 5120),      # qwen2_vl_merger mlp.0: 2 x 256 merged tokens, 1280*4 -> 5120
  ]
  forms = {
      'y = x W': lambda x, w, dy: x @ w,
      'dx = dy W^T': lambda x, w, dy: dy @ w.T,
      'dW = x^T dy': lambda x, w, dy: jnp.einsum('td,tf->df', x, dy),
      'dW = copy(x^T) dy': lambda x, w, dy: jax.lax.optimization_barrier(x.T) @ dy,
  }
  out = []
  for t, d, f in shapes:
    x = jnp.full((t, d), 0.5, jnp.float32)
    w = jnp.full((d, f), 0.25, jnp.float32)
    dy = jnp.full((t, f), 0.125, jnp.float32)
    for name, fn in forms.items():
      best = _best_time(jax.jit(fn), x, w, dy, calls=2 if quick else 10)
      out.append((f'T={t} D={d} F={f}', name, 2 * t * d * f / best / 1e9))
  return out


def _best_time(fn, *args, calls: int) -> float:
  """Least wall time of `calls` calls of a jitted fn, after one untimed call (the compile)."""
  import jax

  jax.block_until_ready(fn(*args))
  return best_time(lambda: jax.block_until_ready(fn(*args)), calls)


def matmul_tokens(quick: bool, dims: tuple[int, int] = TOKENS_DIMS
                  ) -> tuple[list[tuple[int, float, float]], float, float, float, float]:
  """([(T, seconds best of 8, GFLOP/s)], a, b, 2 D F / b / 1e9, read) for y = x W, x [T, D], W [D, F] (dims =
  (D, F); default SmolVLM-Instruct's connector), with time ~ a + b T fitted by least squares; read = the best
  time of one column sum of W (every byte of W read once)."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  (d, f), rows = (TOKENS_QUICK_DIMS, (8, 16, 32)) if quick else (dims, (64, 128, 162, 256, 384, 512))
  calls = 2 if quick else 8
  w = jnp.full((d, f), 0.01, jnp.float32)
  matmul = jax.jit(lambda x, w: x @ w)
  out = []
  for t in rows:
    best = _best_time(matmul, jnp.full((t, d), 0.5, jnp.float32), w, calls=calls)
    out.append((t, best, 2 * t * d * f / best / 1e9))
  slope, intercept = np.polyfit([r[0] for r in out], [r[1] for r in out], 1)
  read = _best_time(jax.jit(lambda w: jnp.sum(w, axis=0)), w, calls=calls)
  return out, float(intercept), float(slope), 2 * d * f / float(slope) / 1e9, read


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog='python -m benchmarks.diagnose', description=__doc__.split('\n\n')[0])
  p.add_argument('what', choices=('faults', 'matmul-forms', 'matmul-tokens', 'train-step'))
  p.add_argument('--which', choices=('ours', 'theirs', 'both'), default=None, help=argparse.SUPPRESS)
  p.add_argument('--calls', type=int, default=5, help='timed calls (faults: default 5; train-step: 4 is plenty)')
  p.add_argument('--quick', action='store_true', help='tiny shapes (a smoke run; numbers meaningless)')
  p.add_argument('--threads', type=int, default=2, help='CPUs the faults children are pinned to (default 2)')
  p.add_argument('--dims', type=int, nargs=2, default=TOKENS_DIMS, metavar=('D', 'F'),
                 help="matmul-tokens: the weight's shape (default SmolVLM-Instruct's connector, 10368 2048)")
  args = p.parse_args(argv)
  if args.what == 'faults':
    if os.environ.get(ENV_CHILD) == '1':
      print(json.dumps(faults_child(args.calls, args.quick)))
      return 0
    return faults(args.calls, args.quick, args.threads)
  if args.what == 'train-step':
    if os.environ.get(ENV_CHILD) == '1':
      print(json.dumps(train_step_child(args.which, args.calls, args.quick)))
      return 0
    return train_step(args.calls, args.quick, args.threads)
  if args.what == 'matmul-tokens':
    rows, fixed, per_row, row_rate, read = matmul_tokens(args.quick, tuple(args.dims))
    d, f = TOKENS_QUICK_DIMS if args.quick else args.dims
    print(f'W [{d}, {f}] f32, {d * f * 4 / 1e6:.0f} MB')
    for t, sec, rate in rows:
      print(f'T={t:<5d} {sec * 1e3:7.1f} ms {rate:7.1f} GFLOP/s')
    print(f'fit: {fixed * 1e3:.1f} ms per call + {per_row * 1e3:.3f} ms per token row (the rows alone at '
          f'{row_rate:.0f} GFLOP/s)')
    print(f'one read of W (column sum): {read * 1e3:.1f} ms ({d * f * 4 / read / 1e9:.1f} GB/s)')
    return 0
  for shape, form, rate in matmul_forms(args.quick):
    print(f'{shape:24s} {form:20s} {rate:7.1f} GFLOP/s')
  return 0


if __name__ == '__main__':
  sys.exit(main())
