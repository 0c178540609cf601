"""E5 stages: (a) the Q-Former does better after BLIP-2's first stage (ITC + ITM + ITG on the frozen ViT) than
without it; (b) for the MLP connector, one stage of instruction tuning does as well as alignment then
instruction tuning.

Sources: BLIP-2 (Li et al. 2023, Figure 5: without the representation-learning stage the Q-Former's zero-shot VQA
drops sharply); Prismatic VLMs (Karamcheti et al. 2024, section 4.1: single-stage training matches LLaVA's two
stages, and saves the first stage's compute).

  python experiments/sweep.py experiments/findings/e5_stages.py --workdir runs/findings --jobs 2   # 24 runs
  python experiments/findings.py --workdir runs/findings

(a) 'qformer.pretrained': BLIP-2's stage 1 (configs/scenes.py:qformer,pretrain; mmproj/qformer_stage1.py), then
the LLaVA-style align and instruct stages starting from it; 'qformer': the same two stages from a fresh Q-Former
(E1's cell). (b) 'mlp' (align, then instruct; E3's cell) against 'mlp.one_stage' (instruct only).
"""
from mmproj import config_lib


def get_config(arg: str = ''):
  smoke = config_lib.parse_variant(arg, 'experiments/findings/e5_stages.py')
  s = ',smoke' if smoke else ''
  c = config_lib.finding_sweep(
      'e5_stages', smoke,
      title='E5 stages: the Q-Former with and without BLIP-2\'s stage 1; the MLP with one stage or two',
      source='BLIP-2 (Li et al. 2023) Figure 5; Prismatic VLMs (Karamcheti et al. 2024) section 4.1')
  stage1 = dict(name='qformer.stage1', config=f'configs/scenes.py:qformer,pretrain{s}', overrides={'baseline': 'none'})
  c.cells = [stage1,
             *config_lib.llava_cells('qformer.pretrained', 'qformer', start='{run:qformer.stage1}', smoke=smoke),
             *config_lib.llava_cells('qformer', 'qformer', smoke=smoke),
             *config_lib.llava_cells('mlp', 'mlp', smoke=smoke)]
  if not smoke:   # smoke runs stage 2 alone, where the two would be the same run (E5b is 'not run')
    c.cells += config_lib.llava_cells('mlp', 'mlp', one_stage=True)
  c.claims = [
      dict(id='E5a', says='the Q-Former scores higher after BLIP-2\'s stage 1 than without it', statistic='difference',
           a=['qformer.pretrained'], b=['qformer'], families=['overall'], predict='greater'),
      dict(id='E5b', says='the MLP connector does as well with one stage as with two', statistic='difference',
           a=['mlp'], b=['mlp.one_stage'], families=['overall'], predict='similar'),
  ]
  return c
