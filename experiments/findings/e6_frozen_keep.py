"""E6 what connectors keep: the object positions a linear probe can read from the visual tokens the LM receives,
for a learned-query resampler and an MLP, trained with the LM frozen and with it trained. The claim: the
resampler's outputs keep less of where objects are than the MLP's, whichever way the LM was trained.

Sources: "Lost in Space" / "Lost in Embeddings" (the connector is where visual information, spatial structure
first, is lost: probes and reconstructions on connector outputs); Honeybee (Cha et al. 2024) on resamplers losing
locality.

  python experiments/sweep.py experiments/findings/e6_frozen_keep.py --workdir runs/findings --jobs 2   # 18 runs
  python experiments/findings.py --workdir runs/findings     # probes each finished run first (connector_probe.py)

perceiver (M = 9; E1's cell) and mlp (M = 36; E3's cell), each trained LLaVA's way, stage 2 with the LM trained or
frozen ('.frozen_lm'). The probe (experiments/connector_probe.py): per grid cell, is there an object (balanced
accuracy, chance 50%), from all of the image's visual tokens.
"""
from mmproj import config_lib


def get_config(arg: str = ''):
  smoke = config_lib.parse_variant(arg, 'experiments/findings/e6_frozen_keep.py')
  c = config_lib.finding_sweep(
      'e6_frozen_keep', smoke,
      title='E6 what connectors keep: probed object positions in perceiver and mlp outputs, LM frozen or trained',
      source='Lost in Space / Lost in Embeddings (connector information loss); Honeybee (Cha et al. 2024)')
  settings = (False,) if smoke else (True, False)   # smoke: the trained-LM pair (E6a is 'not run')
  c.cells = config_lib.frozen_lm_cells(('perceiver', 'mlp'), settings, smoke)
  c.claims = [
      dict(id='E6a', says='with the LM frozen, the MLP\'s tokens keep more of the objects\' positions than the '
           'resampler\'s', statistic='difference', a=['mlp.frozen_lm'], b=['perceiver.frozen_lm'],
           families=['occupancy'], metric='probe', predict='greater'),
      dict(id='E6b', says='with the LM trained, the same', statistic='difference', a=['mlp'], b=['perceiver'],
           families=['occupancy'], metric='probe', predict='greater'),
  ]
  return c
