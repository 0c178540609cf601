"""Linear probe of a frozen vision tower: what of each grid cell (empty, or an object's colour / shape / size) can
be read linearly from its output tokens? A diagnostic for stage-0 towers (mmproj/stage0.py).

  python experiments/tower_probe.py ~/.cache/mmproj/stage0/<key>/vision --field shape
  python experiments/tower_probe.py ~/.cache/mmproj/stage0/<key>/vision --field shape --random   # same ViT, untrained
  python experiments/tower_probe.py ~/.cache/mmproj/stage0/<key>/vision --field token_position

Features: the tower's output tokens [N, T, D] on `--train` scenes-world training images, standardised and
flattened; one softmax classifier per cell over (empty, value 1..K) trained full-batch with Adam; reported on the
test split: per-cell accuracy, occupancy accuracy, and the accuracy on occupied cells (chance 1 / K there).

--field token_position asks the other question: does a token's content say where it is? One softmax classifier
over the T token indices reads a single output token's D features (every token of every image a sample, the
index itself never shown); reported per token and for tokens over an empty or an occupied cell (chance 1 / T).
An LM reads a visual token's content through attention values, which RoPE leaves unrotated: where that content
does not carry the token's place, the LM can find it only through the positions of its own keys.
"""
from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmproj import config_lib
from mmproj.convert.vision import load_vision_tower
from mmproj.data import shapes


def cell_labels(data_cfg, split: str, n: int, field: str) -> tuple[np.ndarray, np.ndarray]:
  """(images [n, S, S, 3] uint8, labels [n, grid * grid]: 0 empty, else the object's `field` + 1)."""
  source = shapes.data_source(data_cfg, split)
  records = [shapes.decode_record(source[i]) for i in range(min(n, len(source)))]
  grid = int(data_cfg.grid)
  labels = np.zeros((len(records), grid * grid), np.int32)
  for k, r in enumerate(records):
    o = r['objects']
    labels[k, o['row'] * grid + o['col']] = o[field] + 1
  return np.stack([r['image'] for r in records]), labels


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('vision', help='an HF vision-tower directory (a stage-0 <key>/vision)')
  parser.add_argument('--field', default='shape', choices=('color', 'shape', 'size', 'token_position'))
  parser.add_argument('--random', action='store_true', help='probe the same architecture at its initialisation')
  parser.add_argument('--layer', type=int, default=None,
                      help="read this block's output instead (-1 last, -2 penultimate: the encoder's output_layer)")
  parser.add_argument('--train', type=int, default=4000, help='training images for the probe')
  parser.add_argument('--steps', type=int, default=300)
  parser.add_argument('--recipe', default='configs/stage0/scenes.py', help="the stage-0 recipe whose world to read")
  parser.add_argument('--data_dir', default=None, help="the world's data.data_dir (default: the recipe's)")
  args = parser.parse_args(argv)
  data_cfg = config_lib.load_config_file(args.recipe).data
  if args.data_dir:
    data_cfg.data_dir = args.data_dir
  vit, params = load_vision_tower(args.vision)
  if args.layer is not None:
    vit = vit.clone(output_layer=args.layer)
  if args.random:
    size = int(data_cfg.image_size)
    params = vit.init(jax.random.key(0), jnp.zeros((1, size, size, 3), jnp.uint8))['params']
  encode = jax.jit(lambda p, x: vit.apply({'params': p}, x)[0])
  features = lambda x: np.concatenate([np.asarray(encode(params, x[i:i + 250])) for i in range(0, len(x), 250)])
  label_field = 'shape' if args.field == 'token_position' else args.field   # token_position: occupancy only
  x_train, y_train = cell_labels(data_cfg, 'train', args.train, label_field)
  x_test, y_test = cell_labels(data_cfg, 'test', int(data_cfg.num_test), label_field)
  f_train, f_test = features(x_train), features(x_test)                       # [N, T, D]
  # Standardised per feature over images (and, for token_position, over tokens too: a per-token mean would
  # subtract the very offset that tells the tokens apart).
  axes = (0, 1) if args.field == 'token_position' else 0
  mean, std = f_train.mean(axes, keepdims=True), f_train.std(axes, keepdims=True) + 1e-6
  f_train, f_test = (f_train - mean) / std, (f_test - mean) / std
  if args.field == 'token_position':
    out = dict(vision=args.vision, random_init=args.random, field=args.field, layer=vit.output_layer,
               **token_position_probe(f_train, f_test, y_test > 0, args.steps))
    print(json.dumps(out))
    return out
  classes = len({'color': shapes.COLORS, 'shape': shapes.SHAPES, 'size': shapes.SIZES}[args.field]) + 1
  out = {'vision': args.vision, 'random_init': args.random, 'field': args.field, 'layer': vit.output_layer,
         **cell_probe(f_train, y_train, f_test, y_test, classes, args.steps)}
  print(json.dumps(out))
  return out


def cell_probe(f_train: np.ndarray, y_train: np.ndarray, f_test: np.ndarray, y_test: np.ndarray, classes: int,
               steps: int) -> dict:
  """One softmax classifier per cell over (empty, value 1..classes-1), reading all of an image's standardised
  tokens f [N, T, D] flattened; labels y [N, cells] -> test accuracies: per cell, occupancy (empty or not; also
  balanced: the mean of the recalls on empty and on occupied cells, chance 50%) and on occupied cells."""
  cells = y_train.shape[1]
  w = {'w': jnp.zeros((f_train[0].size, cells * classes)), 'b': jnp.zeros((cells * classes,))}

  def logits(w, f):
    return (f.reshape(len(f), -1) @ w['w'] + w['b']).reshape(len(f), cells, classes)

  def loss(w, f, y):
    xent = optax.softmax_cross_entropy_with_integer_labels(logits(w, f), y).mean()
    return xent + 1e-4 * (w['w'] ** 2).sum()

  opt = optax.adam(1e-3)
  state = opt.init(w)

  @jax.jit
  def step(w, state):
    grads = jax.grad(loss)(w, f_train, y_train)
    updates, state = opt.update(grads, state)
    return optax.apply_updates(w, updates), state

  for _ in range(steps):
    w, state = step(w, state)
  pred = np.asarray(logits(w, f_test).argmax(-1))
  occupied = y_test > 0
  return {'cell_accuracy': float((pred == y_test).mean()),
          'occupancy_accuracy': float(((pred > 0) == occupied).mean()),
          'occupancy_balanced': float(((pred > 0)[occupied].mean() + (pred == 0)[~occupied].mean()) / 2),
          'occupied_cell_accuracy': float((pred[occupied] == y_test[occupied]).mean()),
          'occupied_chance': 1.0 / (classes - 1)}


def token_position_probe(f_train: np.ndarray, f_test: np.ndarray, occupied_test: np.ndarray, steps: int) -> dict:
  """Linear read-out of a token's index from its own features: f [N, T, D] -> accuracy over T classes."""
  n, t, d = f_train.shape
  x, y = f_train.reshape(n * t, d), np.tile(np.arange(t), n)
  w = {'w': jnp.zeros((d, t)), 'b': jnp.zeros((t,))}
  loss = lambda w: optax.softmax_cross_entropy_with_integer_labels(x @ w['w'] + w['b'], y).mean()
  opt = optax.adam(1e-2)
  state = opt.init(w)

  @jax.jit
  def step(w, state):
    updates, state = opt.update(jax.grad(loss)(w), state)
    return optax.apply_updates(w, updates), state

  for _ in range(steps):
    w, state = step(w, state)
  correct = np.asarray((f_test @ w['w'] + w['b']).argmax(-1)) == np.arange(t)       # [N_test, T]
  out = {'token_accuracy': float(correct.mean()), 'chance': 1.0 / t}
  if occupied_test.shape[1] == t:   # one token per cell: split by what the cell holds
    out.update(empty_cell_tokens=float(correct[~occupied_test].mean()),
               occupied_cell_tokens=float(correct[occupied_test].mean()))
  return out


if __name__ == '__main__':
  main()
