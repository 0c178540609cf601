"""Sweep: every output projector of configs/draw.py trained in NExT-GPT's two stages (align on the generator's text
conditioning, then the generator's own loss) between the frozen stage-0 LM and the frozen stage-0 generator,
3 seeds, next to the generator driven by its own text encoder (the 'reference' row).

  python experiments/sweep.py configs/sweeps/draw.py --workdir runs/sweeps/draw                      # 12 runs
  python experiments/sweep.py configs/sweeps/draw.py --workdir runs/sweeps/draw --collect --out experiments/results
  python experiments/sweep.py configs/sweeps/draw.py:smoke --workdir /tmp/draw-sweep                 # 1 run

Variants: '' (every output projector, both stages, seeds 0-2), 'smoke' (mlp's stage 1 at the smoke budget, seed 0:
the tool end to end in the test suite). The table reads each run's draw.pipeline match rates
(mmproj/eval/draw.py); the reference row is the generator on its own, from the same runs' evaluations.
"""
from configs import draw
from mmproj import config_lib


def get_config(arg: str = ''):
  smoke = config_lib.parse_variant(arg, 'configs/sweeps/draw.py')
  c = config_lib.sweep_base('draw', smoke)
  c.metric, c.reference_metric = 'draw.pipeline', 'draw.reference'
  c.metric_text = 'Recogniser match rate (%) of the drawn pictures (mmproj/eval/draw.py)'
  if smoke:
    c.cells = [dict(name='mlp.align', config='configs/draw.py:mlp,align,smoke', overrides={})]
    return c
  c.cells = []
  for name in draw.ZOO:
    c.cells += [dict(name=f'{name}.align', config=f'configs/draw.py:{name},align', overrides={}),
                dict(name=name, config=f'configs/draw.py:{name},generate',
                     overrides={'init.output': '{run:%s.align}' % name})]
  return c
