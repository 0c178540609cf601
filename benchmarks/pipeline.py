"""Input pipeline throughput vs what the train step consumes.

  loaders   examples/s of the grain training loaders, as the trainer builds them (mmproj.data.train_loader,
            read_threads from the config, no worker processes), measured alone after a warm-up, once the
            prefetch buffer has drained:
              shapes world   configs/quickstart.py's data (48 px images, 8-turn rows of text_len 64), batch 64
              LLaVA JSON     configs/llava15_stage1.py's data (stage-1 'plain' template, 336 px CLIP crop,
                             text_len 128) on a generated LLaVA-format fixture (tests/llava_fixture.py: PNG
                             images of 500 x 375 .. 640 x 480 px, captions and conversations), batch 16
  consumer  examples/s of the step each loader feeds: the quickstart train step (trainer.setup + init_state +
            make_train_step, batch 64) on a fixed batch, median of opts.iters, and the same step fed by the shapes
            loader as trainer.train runs it (loader threads and XLA share the cores); for the LLaVA JSON loader
            the LLaVA stage-1 step measured by the train-step section (`consumers`; the quickstart step stands in
            when that section did not run, and is reported beside it otherwise)
  ratio     loader examples/s / step examples/s (goal: >= 10x, the headroom that keeps the step from waiting
            when both share the machine)

--quick: the 'smoke' quickstart data (512 images) built in a temporary directory (or opts.data_dir), 8 fixture
records, short measurements.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time
from typing import Any

from benchmarks import GOAL_SETTING, SETTINGS, Options, Row, Section, interleaved, median, ratio, spread

GOAL_RATIO = 10.0
FIXTURE_SIZES = ((500, 375), (640, 480), (375, 500), (512, 384), (640, 427))


def repo_root() -> str:
  return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def quickstart_config(quick: bool):
  """configs/quickstart.py (the 'smoke' variant for quick runs)."""
  from mmproj import config_lib
  path = os.path.join(repo_root(), 'configs', 'quickstart.py')
  return config_lib.load_config_file(f'{path}:smoke' if quick else path)


def llava_fixture_module():
  """tests/llava_fixture.py (the LLaVA-format generators the tests use), imported from the repository."""
  tests = os.path.join(repo_root(), 'tests')
  if tests not in sys.path:
    sys.path.insert(0, tests)
  import llava_fixture  # pylint: disable=import-outside-toplevel
  return llava_fixture


def loader_rate(loader: Any, batch_rows: int, *, seconds: float, min_batches: int, skip: int) -> tuple[float, int]:
  """(examples/s, batches timed) of an iterable of batches: one warm-up batch, `skip` more (the prefetch buffer
  filled meanwhile), then batches until `seconds` and `min_batches` are both reached."""
  it = iter(loader)
  next(it)
  for _ in range(skip):
    next(it)
  n, t0 = 0, time.perf_counter()
  while n < min_batches or time.perf_counter() - t0 < seconds:
    next(it)
    n += 1
  return n * batch_rows / (time.perf_counter() - t0), n


def profile_loader(loader: Any, batch_rows: int, batches: int) -> str:
  """cProfile of a loader built with read_threads=0 (every transform runs in this thread): single-thread examples/s
  and the functions with the most self time, as one line for the report."""
  import cProfile
  import pstats

  it = iter(loader)
  next(it)
  prof = cProfile.Profile()
  t0 = time.perf_counter()
  prof.enable()
  for _ in range(batches):
    next(it)
  prof.disable()
  elapsed = time.perf_counter() - t0
  stats = pstats.Stats(prof).stats                                  # (file, line, fn) -> (cc, nc, tt, ct, callers)
  total = sum(v[2] for v in stats.values()) or float('nan')
  top = sorted(stats.items(), key=lambda kv: -kv[1][2])[:6]

  def where(key):
    file, _, fn = key
    m = re.fullmatch(r"<method '(\w+)' of '([\w.]+)' objects>", fn)
    if m:                                                           # a C method: Class.method
      return f'{m.group(2)}.{m.group(1)}'
    m = re.fullmatch(r'<built-in method ([\w.]+)>', fn)
    if m:                                                           # a C function: its module path, shortened
      parts = m.group(1).split('.')
      return f'{parts[-1]} ({parts[0]})'
    parts = file.replace('\\', '/').split('/')
    pkg = next((p for p in ('PIL', 'tokenizers', 'grain', 'numpy', 'mmproj', 'array_record', 'tensorflow_datasets')
                if p in parts), os.path.basename(file))
    return f'{fn} ({pkg})'

  funcs = ', '.join(f'{where(k)} {v[2] / total:.0%}' for k, v in top)
  return (f'profile (read_threads=0, cProfile, {batches} batches): {batches * batch_rows / elapsed:.0f} ex/s on one '
          f'thread under the profiler; self time: {funcs}')


def run(opts: Options, peaks: dict[str, float] | None = None, consumers: dict[str, float] | None = None) -> Section:
  """Loader rows. consumers: the LLaVA stage-1 step's examples/s per kernel setting (the train-step section's, e.g.
  {'xla': 0.3, 'cpu-tuned': 0.4}) to compare the LLaVA loader with; None or empty: the quickstart step stands in."""
  del peaks
  import jax

  from mmproj import data as data_lib
  from mmproj import config_lib
  from mmproj.train import trainer

  try:
    import tensorflow_datasets as tfds
    tfds.disable_progress_bar()
  except ImportError:
    pass
  section = Section('pipeline', 'Input pipeline vs the train step\'s consumption',
                    ['loader', 'data', 'batch', 'read threads', 'loader ex/s', 'consumer']
                    + [f'consumer ex/s {k}' for k in SETTINGS] + [f'ratio {k}' for k in SETTINGS])
  t_start = time.perf_counter()
  seconds = 0.5 if opts.quick else 8.0
  tmp = tempfile.TemporaryDirectory(prefix='mmproj-bench-')
  try:
    # The consumer: the quickstart train step.
    cfg = quickstart_config(opts.quick)
    if opts.data_dir or opts.quick:
      cfg.data.data_dir = opts.data_dir or os.path.join(tmp.name, 'shapes')
    t0 = time.perf_counter()
    _, tok = data_lib.prepare(cfg.data)
    opts.log(f'  shapes data ready in {time.perf_counter() - t0:.0f} s ({cfg.data.data_dir})')
    batch_rows = int(cfg.train.batch_size)
    threads = int(cfg.data.read_threads)
    step_rates, fed_rate, all_times = {}, None, {}
    for k in SETTINGS:                 # the quickstart step under each kernel setting (model.kernels)
      cfg.model.kernels = dict(SETTINGS[k])
      s = trainer.setup(cfg)

      def shapes_loader():
        return data_lib.train_loader(cfg.data, tok, num_image_tokens=s.num_image_tokens,
                                     global_batch_size=batch_rows, seed=int(cfg.seed), process_index=0,
                                     process_count=1)

      state = trainer.init_state(s, int(cfg.seed))
      step_fn = trainer.make_train_step(s)
      rng = jax.random.key(1)
      feed = iter(shapes_loader())
      with jax.set_mesh(s.mesh):
        batch = trainer.global_batch(s, next(feed))
        box = [state]

        def step():
          box[0], metrics = step_fn(box[0], batch, rng)
          jax.block_until_ready((box[0], metrics))

        times = interleaved([('step', step)], iters=2 if opts.quick else max(opts.iters, 3) * 4, warmup=1,
                            log=None)
        all_times[k] = times['step']
        step_rates[k] = batch_rows / median(times['step'])
        if k == GOAL_SETTING:          # the same step fed by the loader, as trainer.train runs it
          n_fed = 2 if opts.quick else 40
          for _ in range(1 if opts.quick else 2):
            box[0], metrics = step_fn(box[0], trainer.global_batch(s, next(feed)), rng)
          jax.block_until_ready(box[0])
          t0 = time.perf_counter()
          for _ in range(n_fed):
            box[0], metrics = step_fn(box[0], trainer.global_batch(s, next(feed)), rng)
          jax.block_until_ready((box[0], metrics))
          fed_rate = n_fed * batch_rows / (time.perf_counter() - t0)
      del feed
    step_rate = step_rates[GOAL_SETTING]
    consumer = f'quickstart train step (batch {batch_rows}, L {s.seq_len})'
    opts.log(f'  quickstart step: ' + ', '.join(f'{k} {r:.0f} ex/s' for k, r in step_rates.items()) +
             f' alone; {GOAL_SETTING} {fed_rate:.0f} ex/s fed by the loader')

    rows = []
    if opts.wants('pipeline/shapes'):
      rate, n = loader_rate(shapes_loader(), batch_rows, seconds=seconds, min_batches=3, skip=2 * max(threads, 1) + 1)
      row = Row('pipeline/shapes', {'loader': 'shapes world (mmproj.data.pipeline.train_loader)',
                                    'data': (f'configs/quickstart.py{":smoke" if opts.quick else ""}: '
                                             f'{cfg.data.image_size} px, text_len {cfg.data.text_len}, '
                                             f'{cfg.data.turns} turns'),
                                    'batch': batch_rows, 'read threads': threads, 'loader ex/s': rate,
                                    'consumer': consumer,
                                    **{f'consumer ex/s {k}': r for k, r in step_rates.items()},
                                    **{f'ratio {k}': ratio(rate, r) for k, r in step_rates.items()}})
      met = row.goal(f'loader >= 10x the step\'s consumption ({GOAL_SETTING})', ratio(rate, step_rate), GOAL_RATIO)
      row.notes.append(f'{n} batches timed; the {GOAL_SETTING} step fed by this loader (as trainer.train runs it) '
                       f'reaches {fed_rate:.0f} ex/s vs {step_rate:.0f} ex/s alone')
      if opts.profile and not met:
        row.notes.append(profile_loader(data_lib.train_loader(
            cfg.data, tok, num_image_tokens=s.num_image_tokens, global_batch_size=batch_rows, seed=int(cfg.seed),
            process_index=0, process_count=1, read_threads=0), batch_rows, 3 if opts.quick else 20))
      rows.append(row)
      opts.log(f'  shapes loader: {rate:.0f} ex/s ({ratio(rate, step_rate):.2f}x the step)')

    if opts.wants('pipeline/llava_json'):
      fixture = llava_fixture_module()
      root = os.path.join(tmp.name, 'llava')
      tok_path = fixture.make_tokenizer(os.path.join(root, 'tokenizer'))
      n_records = 8 if opts.quick else 128
      json_path, image_dir = fixture.make_llava_json(os.path.join(root, 'data'), n=n_records,
                                                     image_sizes=FIXTURE_SIZES)
      missing = '/nonexistent/mmproj-bench'
      lcfg = config_lib.llava15_experiment(
          f'vision={missing},lm={missing},tokenizer={tok_path},json={json_path},images={image_dir},'
          f'data_dir={os.path.join(root, "tfds")},text_len=128', stage=1, name='bench_llava15_stage1')
      t0 = time.perf_counter()
      _, ltok = data_lib.prepare(lcfg.data)
      opts.log(f'  LLaVA fixture built in {time.perf_counter() - t0:.0f} s ({n_records} records)')
      from mmproj import model as model_lib
      n_img = model_lib.num_image_tokens(lcfg.model)
      lbatch = 4 if opts.quick else 16
      from mmproj.data import llava_json
      lthreads = int(llava_json.config_value(lcfg.data, 'read_threads'))
      loader = data_lib.train_loader(lcfg.data, ltok, num_image_tokens=n_img, global_batch_size=lbatch, seed=0,
                                     process_index=0, process_count=1)
      rate, n = loader_rate(loader, lbatch, seconds=seconds, min_batches=2, skip=2 * lthreads + 1)
      # Judged against the step this loader feeds (the LLaVA stage-1 step of the train-step section); the
      # quickstart step, 1000x faster on a CPU, is reported beside it as the stricter reading.
      llava_consumer, llava_rates = 'LLaVA stage-1 step (train_step section)', consumers
      if not llava_rates:
        llava_consumer, llava_rates = consumer, step_rates
      row = Row('pipeline/llava_json', {'loader': 'LLaVA JSON (mmproj.data.llava_json.train_loader)',
                                        'data': (f'configs/llava15_stage1.py data on {n_records} fixture records '
                                                 f'(PNG {FIXTURE_SIZES[0][0]}x{FIXTURE_SIZES[0][1]}..'
                                                 f'{FIXTURE_SIZES[1][0]}x{FIXTURE_SIZES[1][1]}) -> '
                                                 f'{lcfg.data.image_size} px crop, text_len 128'),
                                        'batch': lbatch, 'read threads': lthreads, 'loader ex/s': rate,
                                        'consumer': llava_consumer,
                                        **{f'consumer ex/s {k}': r for k, r in llava_rates.items()},
                                        **{f'ratio {k}': ratio(rate, r) for k, r in llava_rates.items()}})
      met = row.goal(f'loader >= 10x the step\'s consumption ({GOAL_SETTING})',
                     ratio(rate, llava_rates[GOAL_SETTING]), GOAL_RATIO)
      row.notes.append(f'{n} batches timed')
      if llava_consumer == consumer:
        row.notes.append('the LLaVA stage-1 step was not measured in this run (--only), so the quickstart step '
                         'stands in as the consumer')
      else:
        row.notes.append(f'vs the {consumer}: {step_rate:.3g} ex/s -> {ratio(rate, step_rate):.3g}x (the '
                         'stricter reading: a 48 px toy model whose step is ~1000x the LLaVA step\'s rate here)')
      if opts.profile and not met:
        row.notes.append(profile_loader(data_lib.train_loader(
            lcfg.data, ltok, num_image_tokens=n_img, global_batch_size=lbatch, seed=0, process_index=0,
            process_count=1, read_threads=0), lbatch, 3 if opts.quick else 10))
      rows.append(row)
      opts.log(f'  LLaVA JSON loader: {rate:.0f} ex/s ({ratio(rate, llava_rates[GOAL_SETTING]):.3g}x '
               f'{llava_consumer}; {ratio(rate, step_rate):.2f}x the quickstart step)')
    section.rows.extend(rows)
    section.intro.append(
        'loader ex/s: the grain loader alone (as `mmproj.data.train_loader` builds it for the trainer: in-process, '
        'read_threads from the config), after a warm-up and once its prefetch buffer has drained; consumer ex/s: '
        'the train step the loader feeds, on a fixed batch (median): the quickstart step for the shapes loader, '
        'the LLaVA stage-1 step of the train-step section (ours) for the LLaVA JSON loader; ratio = loader / '
        'consumer (goal >= 10x).')
    section.notes.append(f'quickstart step timing spread {spread(all_times[GOAL_SETTING]):.0%} over '
                         f'{len(all_times[GOAL_SETTING])} steps ({GOAL_SETTING}); fed by the shapes loader it '
                         f'reaches {fed_rate:.0f} ex/s ({ratio(fed_rate, step_rate):.0%} of the step alone): on '
                         f'{os.cpu_count()} cores the loader threads and XLA compete for the same CPUs.')
  finally:
    tmp.cleanup()
  section.seconds = time.perf_counter() - t_start
  return section


__all__ = ['run', 'loader_rate', 'GOAL_RATIO']
