"""Sweep: the audio connectors of configs/audio_tones.py (a from-scratch Whisper-shaped encoder and LM, tones world)
and the blind baseline on the same budget (400 steps), 3 seeds: the audio connector table.

  python experiments/sweep.py configs/sweeps/audio.py --workdir runs/sweeps/audio --jobs 2
  python experiments/sweep.py configs/sweeps/audio.py --workdir runs/sweeps/audio --collect --out experiments/results
  python experiments/sweep.py configs/sweeps/audio.py:smoke --workdir /tmp/audio-sweep                 # 1 run

Variants: '' (every entry and the blind baseline, seeds 0-2), 'smoke' (the default connector at the smoke budget,
seed 0), as config_lib.zoo_sweep makes them.
"""
from configs import audio_tones
from mmproj import config_lib

# Half the quickstart's 800 steps, so that the table (3 seeds of every connector and the blind baseline) takes about
# two hours of a 2-core machine with --jobs 2.
BUDGET = {'train.steps': 400, 'train.warmup_steps': 50}


def get_config(arg: str = ''):
  return config_lib.zoo_sweep(arg, name='audio', config='configs/audio_tones.py', names=audio_tones.ZOO,
                              smoke_entry=audio_tones.DEFAULT, budget=BUDGET)
