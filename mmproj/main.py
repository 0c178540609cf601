"""Command-line entry: `python -m mmproj.main --config=configs/X.py[:ARG] --workdir=DIR [--config.key=value ...]`.

launch.sh calls this; see the README for the short form. Multi-process runs (TPU pods, GPU clusters, several
processes on one machine) start every process with this same command; mmproj.train.distributed.initialize()
reads the MMPROJ_* environment (launch.sh tpu / multinode / local-multiprocess set it) before anything else
touches JAX. Only process 0 prints.
"""
from __future__ import annotations

import os

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file, optionally with :ARG.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints, metrics and results go.')


def main(argv):
  del argv
  from absl import logging
  logging.set_verbosity(logging.WARNING)  # orbax, tfds and jax.distributed log every save/read/connect at INFO

  from mmproj.train import distributed
  distributed.initialize()  # before any other JAX use

  import jax
  import tensorflow_datasets as tfds

  from mmproj import experiment, host_malloc

  tfds.disable_progress_bar()

  cfg = _CONFIG.value
  workdir = _WORKDIR.value or os.path.join('runs', cfg.get('name', 'experiment'))
  if distributed.is_main_process():
    shown = workdir if '://' in workdir else os.path.abspath(workdir)
    print(f'workdir: {shown}' + (f' ({jax.process_count()} processes, {jax.device_count()} devices)'
                                  if jax.process_count() > 1 else ''), flush=True)
    if jax.default_backend() == 'cpu' and host_malloc.ENV not in os.environ:
      print(f'note: {host_malloc.ENV} is unset; ./launch.sh sets {host_malloc.ENV}={host_malloc.REUSE} on CPU '
            'hosts (freed memory reused instead of unmapped: faster XLA CPU steps; mmproj/host_malloc.py)', flush=True)
  experiment.run(cfg, workdir)


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  app.run(main)
