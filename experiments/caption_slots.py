"""Teacher-forced caption accuracy of a trained scenes-world run, per kind of word (size, colour, shape, row,
column, digit): which parts of the image reach the LM. A diagnostic for connector runs.

  python experiments/caption_slots.py WORKDIR [--examples 300]
"""
from __future__ import annotations

import argparse
import collections
import json

import jax
import numpy as np

import mmproj
from mmproj.data import pipeline, shapes


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('workdir')
  parser.add_argument('--examples', type=int, default=300, help='test captions to score')
  args = parser.parse_args(argv)
  bundle = mmproj.load(args.workdir)
  grid = int(bundle.config.data.grid)
  word_kinds = dict(size=shapes.SIZES, color=shapes.COLORS, shape=shapes.SHAPES, row=shapes.ROW_WORDS[grid],
                    col=shapes.COL_WORDS[grid], digit=shapes.NUMBERS)
  kind_of = {bundle.tokenizer.token_to_id(w): kind for kind, words in word_kinds.items() for w in words}
  predict = jax.jit(lambda p, batch: bundle.model.apply({'params': p}, batch, deterministic=True).argmax(-1))
  hits, totals = collections.Counter(), collections.Counter()
  for batch in pipeline.caption_eval_batches(bundle.config.data, bundle.tokenizer,
                                             num_image_tokens=bundle.num_image_tokens, batch_size=100,
                                             split='test', max_examples=args.examples):
    valid = np.asarray(batch.pop('valid')).astype(bool)
    pred = np.asarray(predict(bundle.params, batch))
    scored = (np.asarray(batch['loss_mask']) > 0) & valid[:, None]
    for p, t in zip(pred[scored], np.asarray(batch['targets'])[scored]):
      kind = kind_of.get(int(t), 'other')
      totals[kind] += 1
      hits[kind] += int(p == t)
  out = {kind: {'accuracy': hits[kind] / totals[kind], 'words': totals[kind]} for kind in sorted(totals)}
  print(json.dumps(out))
  return out


if __name__ == '__main__':
  main()
