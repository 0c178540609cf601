"""E2 tokens vs type: the number of visual tokens M matters more than the connector type.

Sources: MM1 (McKinzie et al. 2024, section 3.2: image resolution and token count matter most, the connector type
little); Honeybee (Cha et al. 2024, Table 8: performance against the number of visual tokens).

  python experiments/sweep.py experiments/findings/e2_tokens.py --workdir runs/findings --jobs 2   # 54 runs
  python experiments/findings.py --workdir runs/findings

avg_pool, c_abstractor and perceiver at M = 4, 9 and 36 from the stage-0 ViT's 6 x 6 grid, each trained LLaVA's way
(config_lib.llava_cells). The M = 9 cells are E1's (the same runs when the sweeps share a workdir). The statistic:
per seed, the spread over M (max - min overall accuracy, averaged over the types) minus the spread over types
(max - min, averaged over M).
"""
from mmproj import config_lib

# type -> {M: projector overrides}; M = 9 is the entry as configs/scenes.py has it.
TOKENS = {
    'avg_pool': {4: {'model.projector.output_grid': 2}, 9: {}, 36: {'model.projector.output_grid': 6}},
    'c_abstractor': {4: {'model.projector.num_queries': 4}, 9: {}, 36: {'model.projector.num_queries': 36}},
    'perceiver': {4: {'model.projector.num_latents': 4}, 9: {}, 36: {'model.projector.num_latents': 36}},
}


def cell_name(kind: str, m: int) -> str:
  return kind if m == 9 else f'{kind}.m{m}'


def get_config(arg: str = ''):
  smoke = config_lib.parse_variant(arg, 'experiments/findings/e2_tokens.py')
  # smoke: E1's two cells, both at M = 9 (the statistic is defined on any part of the grid; spread over M is 0)
  grid = {'avg_pool': {9: {}}, 'perceiver': {9: {}}} if smoke else TOKENS
  c = config_lib.finding_sweep(
      'e2_tokens', smoke,
      title='E2 tokens vs type: avg_pool, c_abstractor and perceiver at M = 4, 9, 36',
      source='MM1 (McKinzie et al. 2024) section 3.2; Honeybee (Cha et al. 2024) Table 8')
  c.cells = [cell for kind, by_m in grid.items() for m, overrides in by_m.items()
             for cell in config_lib.llava_cells(cell_name(kind, m), kind, overrides=overrides, smoke=smoke)]
  c.claims = [dict(id='E2', says='the spread of accuracy across M exceeds the spread across connector types at a '
                   'fixed M', statistic='spread',
                   grid=[[kind, m, cell_name(kind, m)] for kind, by_m in grid.items() for m in by_m],
                   families=['overall'], predict='greater')]
  return c
