"""Stage 0 of the pretrained-tower regime: a SigLIP-shaped ViT and a text-only LM for the scenes world.

  python -m mmproj.stage0 configs/stage0/scenes.py          # builds into ~/.cache/mmproj/stage0/<key>/ and reports
  python -m mmproj.stage0 configs/stage0/scenes.py:smoke    # toy sizes, for tests

Every connector experiment of configs/scenes.py starts from these towers (cfg.init = 'stage0'), building them on
first use; this file is the same recipe on its own. What is trained and reported: mmproj/stage0.py.
"""
from mmproj import config_lib

VARIANTS = config_lib.VARIANTS


def get_config(arg: str = ''):
  return config_lib.stage0_recipe(config_lib.parse_variant(arg, 'configs/stage0/scenes.py'))
