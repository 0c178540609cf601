"""Sweep: the quickstart's image model (configs/quickstart.py, no blind baseline) at model.dtype float32 and
bfloat16, 3 seeds; experiments/bf16_quickstart.py runs it and writes the paired comparison.

  python experiments/bf16_quickstart.py                                 # 6 runs, ~40 min on 2 cores
  python experiments/sweep.py configs/sweeps/bf16_quickstart.py --workdir runs/bf16_quickstart --print-commands

Variants: '' (800 steps, seeds 0-2), 'smoke' (the smoke quickstart, seeds 0-1).
"""
import ml_collections

from mmproj import config_lib


def get_config(arg: str = ''):
  smoke = config_lib.parse_variant(arg, 'configs/sweeps/bf16_quickstart.py')
  c = ml_collections.ConfigDict()
  c.name = 'bf16_quickstart_smoke' if smoke else 'bf16_quickstart'
  c.seeds = [0, 1] if smoke else [0, 1, 2]
  config = 'configs/quickstart.py:smoke' if smoke else 'configs/quickstart.py'
  c.cells = [dict(name=dtype, config=config, overrides={'baseline': 'none', 'model.dtype': dtype})
             for dtype in ('float32', 'bfloat16')]
  return c
