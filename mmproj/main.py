"""Command-line entry: `python -m mmproj.main --config=configs/X.py[:ARG] --workdir=DIR [--config.key=value ...]`.

launch.sh calls this; see the README for the short form.
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
  import tensorflow_datasets as tfds
  from absl import logging

  from mmproj import experiment

  logging.set_verbosity(logging.WARNING)  # orbax and tfds log every save/read at INFO
  tfds.disable_progress_bar()

  cfg = _CONFIG.value
  workdir = _WORKDIR.value or os.path.join('runs', cfg.get('name', 'experiment'))
  print(f'workdir: {os.path.abspath(workdir)}', flush=True)
  experiment.run(cfg, workdir)


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  app.run(main)
