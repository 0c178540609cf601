"""Output projectors: the LM asked to draw, its signal tokens' hidden states mapped into the conditioning of the
stage-0 generator (NExT-GPT, GILL), in the scenes world at 32 px on a 2x2 grid with one or two objects.

  ./launch.sh configs/draw.py:transformer,align --workdir runs/draw/transformer_align     # stage 1 (builds stage 0)
  ./launch.sh configs/draw.py:transformer,generate --workdir runs/draw/transformer \
      --config.init.output=runs/draw/transformer_align                                    # stage 2 from stage 1
  ./launch.sh configs/draw.py:mlp,align,smoke --workdir /tmp/draw-mlp                      # toy sizes, for tests
  python experiments/sweep.py configs/sweeps/draw.py --workdir runs/sweeps/draw            # the comparison, 3 seeds

The argument is NAME[,OPTION]... with NAME a key of ZOO below and the options config_lib.DRAW_OPTIONS: align or
generate (the stage), train_lm, smoke. Stage 1 (align) regresses the output projector's conditioning onto the
generator's own text encoding of the caption, as NExT-GPT's decoding-side alignment does; stage 2 (generate) trains
through the frozen generator with its flow-matching loss on the record's image. The LM (stage-0, text-pretrained)
and the generator (configs/stage0/generator.py) stay frozen: the signal tokens' embedding and head rows and the
output projector train. Evaluated by mmproj/eval/draw.py: the recogniser's match rates of the pipeline's images
next to the generator driven by its own text encoder.
"""
from mmproj import config_lib

WHERE = 'configs/draw.py'

# NAME -> output projector, from K = 4 signal-token states of the 128-wide LM to the generator's [L, Dc].
ZOO = {
    'mlp': dict(name='mlp', depth=2),                               # per-token MLP + learned K -> L token mixing
    'transformer': dict(name='transformer', d_model=128, num_heads=4, mlp_dim=256, encoder_depth=1,
                        decoder_depth=2),                          # GILLMapper / NExT-GPT: L learned queries
}

# Every entry with each stage, smoke and not, so that tests/test_configs.py builds them all.
VARIANTS = tuple(f'{name},{stage}{smoke}' for name in ZOO for stage in ('align', 'generate')
                 for smoke in ('', ',smoke'))


def get_config(arg: str = 'transformer,align'):
  name, options = config_lib.zoo_argument(arg, ZOO, WHERE, config_lib.DRAW_OPTIONS)
  return config_lib.draw_experiment(options, name='draw', projector=ZOO[name])
