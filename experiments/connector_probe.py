"""Linear probes of a trained connector's output: what of each grid cell (is an object there, and which shape) can
be read linearly from the visual tokens the LM receives? Finding E6 (experiments/findings/e6_frozen_keep.py) compares
connectors with it; experiments/tower_probe.py asks the same of the vision tower's own tokens.

  python experiments/connector_probe.py runs/findings/mlp/seed0          # writes runs/findings/mlp/seed0/probe.json
  python experiments/connector_probe.py RUN --train 4000 --steps 300

Features: the run's visual tokens [N, M, D] (mmproj.load, then the model's encode: ViT -> connector) on
`--train` training images of its world, standardised per feature and flattened; one softmax classifier per cell
over (empty, shape 1..K), trained full-batch with Adam (tower_probe.cell_probe). Reported on the test split, in
probe.json's 'accuracy': 'occupancy' (is the cell occupied: the mean of the recalls on occupied and on empty cells,
chance 50%; the object's position), 'what_where' (the shape in an occupied cell; chance 1 / K) and 'cell' (all
cells, empty ones included).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]      # the repository (mmproj), then experiments/

import tower_probe  # noqa: E402

from mmproj import inference  # noqa: E402
from mmproj.data import shapes  # noqa: E402

PROBE_FILE = 'probe.json'


def probe(run: str, train: int = 4000, steps: int = 300, log=print) -> dict:
  """Probes the run in workdir `run` and writes run/probe.json -> its contents."""
  bundle = inference.load(run)
  cfg = bundle.config
  if cfg.data.name != 'shapes':
    raise ValueError(f'{run}: data.name={cfg.data.name!r}; the probe reads the shapes / scenes world')
  encode = jax.jit(lambda x: bundle.model.apply({'params': bundle.params}, x, method='encode'))
  features = lambda x: np.concatenate([np.asarray(encode(x[i:i + 250]), np.float32) for i in range(0, len(x), 250)])
  x_train, y_train = tower_probe.cell_labels(cfg.data, 'train', train, 'shape')
  x_test, y_test = tower_probe.cell_labels(cfg.data, 'test', int(cfg.data.num_test), 'shape')
  f_train, f_test = features(x_train), features(x_test)                       # [N, M, D]
  mean, std = f_train.mean(0, keepdims=True), f_train.std(0, keepdims=True) + 1e-6
  got = tower_probe.cell_probe((f_train - mean) / std, y_train, (f_test - mean) / std, y_test,
                               len(shapes.SHAPES) + 1, steps)
  out = {'run': os.path.abspath(run), 'tokens': list(f_train.shape[1:]), 'train_images': len(x_train),
         'test_images': len(x_test), 'steps': steps,
         'accuracy': {'occupancy': got['occupancy_balanced'], 'what_where': got['occupied_cell_accuracy'],
                      'cell': got['cell_accuracy']},
         'chance': {'occupancy': 0.5, 'what_where': got['occupied_chance']}}
  with open(os.path.join(run, PROBE_FILE), 'w') as f:
    json.dump(out, f, indent=2)
  log(f'{run}: occupancy {out["accuracy"]["occupancy"]:.1%}, what-where {out["accuracy"]["what_where"]:.1%} '
      f'(M x D = {f_train.shape[1]} x {f_train.shape[2]})')
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('run', nargs='+', help='finished run workdirs')
  p.add_argument('--train', type=int, default=4000, help='training images for the probe')
  p.add_argument('--steps', type=int, default=300)
  args = p.parse_args(argv)
  for run in args.run:
    probe(run, args.train, args.steps)
  return 0


if __name__ == '__main__':
  sys.exit(main())
