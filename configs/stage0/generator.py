"""Stage 0 of the output side: the draw world's "given" generator (a text encoder + rectified-flow DiT).

  python -m mmproj.stage0_generator configs/stage0/generator.py          # builds into ~/.cache/mmproj/stage0/<key>/
  python -m mmproj.stage0_generator configs/stage0/generator.py:smoke    # toy sizes, for tests

The output projectors of issue 22 drive this generator (frozen) with an LLM's signal-token states; this file is its
recipe on its own. What is trained and reported: mmproj/stage0_generator.py.
"""
from mmproj import config_lib

VARIANTS = config_lib.VARIANTS


def get_config(arg: str = ''):
  return config_lib.generator_recipe(config_lib.parse_variant(arg, 'configs/stage0/generator.py'))
