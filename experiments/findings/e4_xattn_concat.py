"""E4 cross-attention vs concatenation: with the LM frozen, Flamingo's gated cross-attention does better than an
MLP whose tokens are concatenated to the text; with the LM trained, concatenation does better.

Source: Idefics2 (Laurencon et al. 2024, Table 3: the fully autoregressive architecture beats cross-attention
once the backbones train, and trails it while they are frozen).

  python experiments/sweep.py experiments/findings/e4_xattn_concat.py --workdir runs/findings --jobs 2   # 18 runs
  python experiments/findings.py --workdir runs/findings

gated_xattn (its gated blocks inside the LM train in both settings) and mlp, each trained LLaVA's way
(config_lib.llava_cells): stage 1 with the LM frozen, then stage 2 with the LM frozen ('.frozen_lm') or trained.
"""
from mmproj import config_lib


def get_config(arg: str = ''):
  smoke = config_lib.parse_variant(arg, 'experiments/findings/e4_xattn_concat.py')
  c = config_lib.finding_sweep(
      'e4_xattn_concat', smoke,
      title='E4 cross-attention vs concatenation: gated_xattn and mlp, LM frozen or trained in stage 2',
      source='Idefics2 (Laurencon et al. 2024) Table 3')
  settings = (True,) if smoke else (True, False)   # smoke: the frozen-LM pair (E4b is 'not run')
  c.cells = config_lib.frozen_lm_cells(('gated_xattn', 'mlp'), settings, smoke)
  c.claims = [
      dict(id='E4a', says='with the LM frozen, gated cross-attention scores higher than concatenation',
           statistic='difference', a=['gated_xattn.frozen_lm'], b=['mlp.frozen_lm'], families=['overall'],
           predict='greater'),
      dict(id='E4b', says='with the LM trained, concatenation scores higher than gated cross-attention',
           statistic='difference', a=['mlp'], b=['gated_xattn'], families=['overall'], predict='greater'),
  ]
  return c
