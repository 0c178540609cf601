"""Sweep: the audio connectors of configs/audio_tones.py (a from-scratch Whisper-shaped encoder and LM, tones world) and the blind baseline on the same budget, 3 seeds: the audio connector table.

  python experiments/sweep.py configs/sweeps/audio.py --workdir runs/sweeps/audio --jobs 2
  python experiments/sweep.py configs/sweeps/audio.py --workdir runs/sweeps/audio --collect --out experiments/results
  python experiments/sweep.py configs/sweeps/audio.py:smoke --workdir /tmp/audio-sweep                 # 1 run

Variants: '' (every entry and the blind baseline, seeds 0-2), 'smoke' (the default connector at the smoke budget,
seed 0: the tool end to end in the test suite).
"""
import ml_collections

from configs import audio_tones
from mmproj import config_lib


def get_config(arg: str = ''):
  smoke = config_lib.parse_variant(arg, 'configs/sweeps/audio.py')
  names = [audio_tones.DEFAULT] if smoke else list(audio_tones.ZOO)
  variant = ',smoke' if smoke else ''
  c = ml_collections.ConfigDict()
  c.name = 'audio_smoke' if smoke else 'audio'
  c.seeds = [0] if smoke else [0, 1, 2]
  c.cells = [dict(name=n, config=f'configs/audio_tones.py:{n}{variant}', overrides={'baseline': 'none'}) for n in names]
  if not smoke:
    c.cells.append(dict(name='blind', config=f'configs/audio_tones.py:{names[0]}',
                        overrides={'baseline': 'none', 'model.use_image': False}))
  return c
