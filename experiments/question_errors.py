"""Where a trained run's answers to one question family go wrong: accuracy by the number of objects in the image,
and each wrong answer sorted by what it names (an attribute of another object in the image, or of none).

  python experiments/question_errors.py runs/sweeps/zoo/cross_attention/seed0 --family color
  python experiments/question_errors.py RUN --family shape --limit 200

Reads the run's world (its config.json's data) on the test split and answers with mmproj.generate (greedy), as
the run's own evaluation does. For 'color' ("what color is the circle ?") a wrong answer that is the colour of
another object in the image means the model read the wrong object; one no object has means it read none. The same
for 'shape' with shapes.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mmproj  # noqa: E402
from mmproj.data import shapes  # noqa: E402

NAMES = {'color': ('color', shapes.COLORS), 'shape': ('shape', shapes.SHAPES)}


def errors(run: str, family: str, limit: int | None = None, batch: int = 100) -> dict:
  bundle = mmproj.load(run)
  source = shapes.data_source(bundle.config.data, 'test')
  items = []                                        # (image, question, answer, objects)
  for i in range(len(source) if limit is None else min(limit, len(source))):
    rec = shapes.decode_record(source[i])
    items += [(rec['image'], q, a, rec['objects']) for q, a, f in zip(rec['questions'], rec['answers'],
                                                                      rec['families']) if f == family]
  said = []
  for k in range(0, len(items), batch):
    chunk = items[k:k + batch]
    said += mmproj.generate(bundle, [c[0] for c in chunk], [c[1] for c in chunk], max_new_tokens=6)
  by_count, kinds = collections.defaultdict(lambda: [0, 0]), collections.Counter()
  field, values = NAMES.get(family, (None, ()))
  for (_, _, answer, objects), got in zip(items, said):
    n = len(objects['shape'])
    by_count[n][0] += got.strip() == answer
    by_count[n][1] += 1
    if got.strip() != answer and field:
      present = {values[v] for v in objects[field]}
      kinds['another object\'s' if got.strip() in present else 'no object\'s' if got.strip() in values
            else 'not a ' + field] += 1
  out = {'run': run, 'family': family, 'questions': len(items),
         'accuracy': sum(c for c, _ in by_count.values()) / max(len(items), 1),
         'by_objects': {n: {'accuracy': c / t, 'questions': t} for n, (c, t) in sorted(by_count.items())},
         'wrong_answers': dict(kinds)}
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('run')
  p.add_argument('--family', default='color', choices=shapes.FAMILIES + ('nearest', 'text'))
  p.add_argument('--limit', type=int, default=None, help='test images read (default: all)')
  args = p.parse_args(argv)
  print(json.dumps(errors(args.run, args.family, args.limit), indent=1))
  return 0


if __name__ == '__main__':
  sys.exit(main())
