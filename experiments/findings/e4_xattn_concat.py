"""E4 cross-attention vs concatenation: with the LM frozen, Flamingo's gated cross-attention does better than an
MLP whose tokens are concatenated to the text; with the LM trained, concatenation does better.

Source: Idefics2 (Laurencon et al. 2024, Table 3: the fully autoregressive architecture beats cross-attention
once the backbones train, and trails it while they are frozen).

  python experiments/sweep.py experiments/findings/e4_xattn_concat.py --workdir runs/findings --jobs 2   # 18 runs
  python experiments/findings.py --workdir runs/findings

gated_xattn (its gated blocks inside the LM train in both settings) and mlp, each trained LLaVA's way
(config_lib.llava_cells): stage 1 with the LM frozen, then stage 2 with the LM frozen ('.frozen_lm') or trained.
"""
import ml_collections

from mmproj import config_lib


def get_config(arg: str = ''):
  smoke = config_lib.parse_variant(arg, 'experiments/findings/e4_xattn_concat.py')
  c = ml_collections.ConfigDict()
  c.name = 'e4_xattn_concat' + '_smoke' * smoke
  c.store = 'findings' + '_smoke' * smoke
  c.title = 'E4 cross-attention vs concatenation: gated_xattn and mlp, LM frozen or trained in stage 2'
  c.source = 'Idefics2 (Laurencon et al. 2024) Table 3'
  c.seeds = [0] if smoke else [0, 1, 2]
  settings = (True,) if smoke else (True, False)   # smoke: the frozen-LM pair (E4b is 'not run')
  c.cells = config_lib.unique_cells([cell for name in ('gated_xattn', 'mlp') for frozen in settings
                                     for cell in config_lib.llava_cells(name, name, frozen_lm=frozen, smoke=smoke)])
  c.claims = [
      dict(id='E4a', says='with the LM frozen, gated cross-attention scores higher than concatenation',
           statistic='difference', a=['gated_xattn.frozen_lm'], b=['mlp.frozen_lm'], families=['overall'],
           predict='greater'),
      dict(id='E4b', says='with the LM trained, concatenation scores higher than gated cross-attention',
           statistic='difference', a=['mlp'], b=['gated_xattn'], families=['overall'], predict='greater'),
  ]
  return c
