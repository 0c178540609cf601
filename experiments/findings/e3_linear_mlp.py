"""E3 linear vs MLP: a linear map, a 2-layer MLP and a 6-layer MLP differ by little, and the 2-layer MLP is at
least as good as the linear map.

Sources: LLaVA-1.5 (Liu et al. 2023, Table 3: mlp2x_gelu over linear); Honeybee (Cha et al. 2024, Table 9: deeper
MLPs give little).

  python experiments/sweep.py experiments/findings/e3_linear_mlp.py --workdir runs/findings --jobs 2   # 18 runs
  python experiments/findings.py --workdir runs/findings

All three keep M = 36 tokens and are trained LLaVA's way (config_lib.llava_cells).
"""
from mmproj import config_lib


def get_config(arg: str = ''):
  smoke = config_lib.parse_variant(arg, 'experiments/findings/e3_linear_mlp.py')
  c = config_lib.finding_sweep(
      'e3_linear_mlp', smoke,
      title='E3 linear vs MLP: linear, mlp depth 2, mlp depth 6 (M = 36)',
      source='LLaVA-1.5 (Liu et al. 2023) Table 3; Honeybee (Cha et al. 2024) Table 9')
  arms = [('linear', 'linear', {}), ('mlp', 'mlp', {})] + [('mlp6', 'mlp', {'model.projector.depth': 6})] * (not smoke)
  c.cells = [cell for name, entry, o in arms for cell in config_lib.llava_cells(name, entry, overrides=o, smoke=smoke)]
  names = [name for name, _, _ in arms]
  c.claims = [
      dict(id='E3a', says='the 2-layer MLP scores at least as high as the linear map', statistic='difference',
           a=['mlp'], b=['linear'], families=['overall'], predict='greater'),
      dict(id='E3b', says='linear, mlp2 and mlp6 differ by little (the range of the three)', statistic='range',
           cells=names, families=['overall'], predict='similar'),
  ]
  return c
