"""Command-line entry: `python -m mmproj.main --config=configs/X.py[:ARG] --workdir=DIR [--config.key=value ...]`.

launch.sh calls this; see the README for the short form. `--config.a.b=value` (or `--config.a.b value`) sets a
field of the config (mmproj.config_lib.load_config_file: a Python literal, else a string). Multi-process runs (TPU
pods, GPU clusters, several processes on one machine) start every process with this same command;
mmproj.train.distributed.initialize() reads the MMPROJ_* environment (launch.sh tpu / multinode /
local-multiprocess set it) before anything else touches JAX. Only process 0 prints.
"""
from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv: list[str]) -> tuple[str, str | None, list[str]]:
  """argv -> (config spec, workdir or None, ['a.b=value', ...] overrides); SystemExit naming a bad argument."""
  parser = argparse.ArgumentParser(prog='python -m mmproj.main', description=__doc__.split('\n\n')[0])
  parser.add_argument('--config', required=True, help='experiment config file, optionally with :ARG')
  parser.add_argument('--workdir', default=None, help='where checkpoints, metrics and results go')
  args, rest = parser.parse_known_args(argv)
  overrides, i = [], 0
  while i < len(rest):
    item = rest[i]
    if not item.startswith('--config.'):
      parser.error(f'unrecognized argument {item!r} (config fields are set with --config.FIELD=VALUE)')
    field, sep, value = item[len('--config.'):].partition('=')
    if not sep:
      if i + 1 >= len(rest):
        parser.error(f'{item} needs a value')
      value, i = rest[i + 1], i + 1
    overrides.append(f'{field}={value}')
    i += 1
  return args.config, args.workdir, overrides


def main(argv: list[str] | None = None) -> None:
  spec, workdir, overrides = parse_args(sys.argv[1:] if argv is None else argv)
  from absl import logging
  logging.set_verbosity(logging.WARNING)  # orbax, tfds and jax.distributed log every save/read/connect at INFO

  from mmproj.train import distributed
  distributed.initialize()  # before any other JAX use

  import jax
  import tensorflow_datasets as tfds

  from mmproj import config_lib, experiment

  tfds.disable_progress_bar()
  cfg = config_lib.load_config_file(spec, overrides)
  workdir = workdir or os.path.join('runs', cfg.name)
  if distributed.is_main_process():
    shown = workdir if '://' in workdir else os.path.abspath(workdir)
    print(f'workdir: {shown}' + (f' ({jax.process_count()} processes, {jax.device_count()} devices)'
                                  if jax.process_count() > 1 else ''), flush=True)
    if jax.default_backend() == 'cpu' and 'GLIBC_TUNABLES' not in os.environ:
      print('note: GLIBC_TUNABLES is unset; ./launch.sh sets it on CPU hosts (freed memory reused instead of '
            'unmapped: faster XLA CPU steps; benchmarks/host_malloc.py)', flush=True)
  experiment.run(cfg, workdir)


if __name__ == '__main__':
  main()
