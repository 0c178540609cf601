"""Connectors on pretrained towers: every projector family between the stage-0 SigLIP-shaped ViT (frozen) and the
stage-0 text-pretrained LM (trained), in the scenes world, each next to a blind baseline from the same LM.

  ./launch.sh configs/scenes.py:mlp                                  # builds stage 0 on first use, then trains
  ./launch.sh configs/scenes.py:mlp,smoke --workdir /tmp/scenes-mlp  # toy towers and budget, about a minute
  python experiments/sweep.py configs/sweeps/zoo.py --workdir runs/sweeps/zoo   # the zoo table: all, 3 seeds
  ./launch.sh configs/scenes.py:mlp,align --workdir runs/mlp_align               # LLaVA's stage 1, then stage 2:
  ./launch.sh configs/scenes.py:mlp,instruct --workdir runs/mlp --config.init.projector=runs/mlp_align

The argument is NAME[,OPTION]... with NAME a key of ZOO below and the options config_lib.SCENES_OPTIONS: smoke;
align or instruct (LLaVA's two stages; without either, one stage whose rows hold the caption and then questions);
frozen_lm; pretrain (qformer: BLIP-2's stage 1). experiments/findings/ sweeps them.

The world: 96 px images of a 6x6 grid, 1-12 objects and up to 3 digit glyphs, eight question families
(mmproj/data/shapes.py). The towers (configs/stage0/scenes.py, mmproj/stage0.py): a 4-block, 128-wide ViT with
16 px patches (one per cell: a 6x6 grid, N = 36 tokens) trained with SigLIP's loss and SigLIP 2's caption decoder
on the captions, and a 4-block, 128-wide LM trained on captions and questions as text. The budget
(config_lib.scenes_experiment): 600 steps at batch 64 on 20,000 images, AdamW at 3e-3, the ViT frozen, evaluated
on the 500 test images (align: 200 steps, instruct: 500). The compressing connectors are set to M = 9 visual
tokens (a 3x3 grid where they keep one: each token covers 2x2 cells), linear and mlp keep all 36.
"""
from mmproj import config_lib

WHERE = 'configs/scenes.py'

# NAME -> projector, for N = 36 ViT tokens on a 6x6 grid. M = visual tokens the LM reads.
ZOO = {
    'avg_pool': dict(name='avg_pool', output_grid=3),  # DeCo: 2-D avg pool to 3x3 + GELU MLP, M = 9
    'c_abstractor': dict(name='c_abstractor', num_queries=9, depth=2, pos_emb_grid=(6, 6)),  # Honeybee, M = 9
    'cross_attention': dict(name='cross_attention', num_queries=9, depth=1, num_heads=4, num_kv_heads=2),  # M = 9
    'd_abstractor': dict(name='d_abstractor', num_queries=9, depth=2, num_heads=4, num_points=4,
                         pos_emb_grid=(6, 6)),  # Honeybee: deformable attention, M = 9
    'gated_xattn': dict(name='gated_xattn', every=1, heads=4, ff_mult=2),  # Flamingo: the LM cross-attends, M = 1
    'ldp': dict(name='ldp'),  # MobileVLM: token MLP + depthwise-conv blocks (stride 2), M = 9
    'ldpv2': dict(name='ldpv2'),  # MobileVLM V2: token MLP, 2x2 avg pool, positional conv, M = 9
    'frame_concat': dict(name='frame_concat'),  # per-frame mlp + a time-marker token per frame, M = 37
    'linear': dict(name='linear'),  # LLaVA: one affine map per patch, M = 36
    'llava_next_video': dict(name='llava_next_video'),  # per-frame 2x2 avg pool + MLP, M = 9
    'llava_onevision_video': dict(name='llava_onevision_video'),  # MLP, bilinear 2x down, newline, M = 10
    'mlp': dict(name='mlp', depth=2),  # LLaVA-1.5 mlp2x_gelu, M = 36
    'patch_merger': dict(name='patch_merger', spatial_merge_size=2),  # Qwen2-VL: 2x2 merge + MLP, M = 9
    'perceiver': dict(name='perceiver', num_latents=9, depth=2, num_heads=4, head_dim=32),  # Flamingo, M = 9
    'perceiver_idefics2': dict(name='perceiver', variant='idefics2', num_latents=9, depth=2, num_heads=4,
                               num_kv_heads=2, head_dim=32),  # Idefics2: SwiGLU, RMSNorm, GQA, M = 9
    'pixel_shuffle': dict(name='pixel_shuffle', scale_factor=2, norm='layernorm', depth=2,
                          use_bias=True),  # InternVL: 2x2 space-to-depth + MLP, M = 9
    'qformer': dict(name='qformer', num_query_tokens=9, hidden_dim=128, num_layers=2, num_heads=4, mlp_dim=512,
                    cross_attention_frequency=1),  # BLIP-2: 9 queries, 2 BERT layers, M = 9
    'qwen_vl_resampler': dict(name='qwen_vl_resampler', num_queries=9, num_heads=4),  # Qwen-VL, M = 9
    'tokenpacker': dict(name='tokenpacker', scale=2, num_heads=4),  # TokenPacker: region attention, M = 9
}

# Connectors built for video (F frames of tokens; here one frame, num_frames=1). They train like the others, but
# the zoo table (configs/sweeps/zoo.py) leaves them out: on single images they reduce to the image connectors above
# plus a pooling or one extra token, and the table's cells stay the ones already run.
VIDEO_CONNECTORS = ('frame_concat', 'llava_next_video', 'llava_onevision_video')

# Every entry in every variant, and each stage option once, so that tests/test_configs.py builds them all.
VARIANTS = tuple(f'{name},{v}' if v else name for name in ZOO for v in config_lib.VARIANTS) + (
    'mlp,align', 'mlp,instruct', 'gated_xattn,frozen_lm', 'gated_xattn,align,smoke')


def get_config(arg: str = ''):
  name, options = config_lib.zoo_argument(arg, ZOO, WHERE, config_lib.SCENES_OPTIONS)
  return config_lib.scenes_experiment(options, name=f'scenes_{name}', projector=ZOO[name])
