"""E1 locality: at equal visual tokens, learned-query resamplers lose to locality-keeping compressors on the
spatial and text-reading questions, and tie with them on colour and shape.

Sources: Honeybee (Cha et al. 2024, Table 3: C-Abstractor over resampler on spatial understanding); Cambrian-1
(Tong et al. 2024, the spatial vision aggregator); DeCo (Yao et al. 2024: adaptive average pooling over Q-Former).

  python experiments/sweep.py experiments/findings/e1_locality.py --workdir runs/findings --jobs 2   # 48 runs
  python experiments/findings.py --workdir runs/findings              # every finding's table, plot and verdict

Every connector keeps M = 9 visual tokens from the 6 x 6 grid of the stage-0 ViT (configs/scenes.py) and is trained
LLaVA's way: stage 1 on captions with the LM frozen, stage 2 on questions with the LM trained (config_lib.llava_cells).
"""
from mmproj import config_lib

RESAMPLERS = ('perceiver', 'qformer', 'cross_attention')
LOCAL = ('c_abstractor', 'avg_pool', 'pixel_shuffle', 'ldpv2', 'tokenpacker')
SPATIAL = ('position', 'relation', 'nearest')


def get_config(arg: str = ''):
  smoke = config_lib.parse_variant(arg, 'experiments/findings/e1_locality.py')
  resamplers, local = (RESAMPLERS[:1], LOCAL[1:2]) if smoke else (RESAMPLERS, LOCAL)
  c = config_lib.finding_sweep(
      'e1_locality', smoke,
      title='E1 locality: learned-query resamplers against locality-keeping compressors at M = 9',
      source='Honeybee (Cha et al. 2024) Table 3; Cambrian-1 (Tong et al. 2024); DeCo (Yao et al. 2024)')
  c.cells = [cell for name in resamplers + local for cell in config_lib.llava_cells(name, name, smoke=smoke)]
  c.claims = [
      dict(id='E1a', says='locality-keeping compressors score higher than resamplers on the spatial families '
           '(position, relation, nearest)', statistic='difference', a=list(local), b=list(resamplers),
           families=list(SPATIAL), predict='greater'),
      dict(id='E1b', says='locality-keeping compressors score higher than resamplers on text reading',
           statistic='difference', a=list(local), b=list(resamplers), families=['text'], predict='greater'),
      dict(id='E1c', says='the two groups are similar on colour and shape', statistic='difference',
           a=list(local), b=list(resamplers), families=['color', 'shape'], predict='similar'),
  ]
  return c
