"""The from-scratch zoo: every projector family, trained with its ViT and LM from scratch in the shapes world on
one shared budget. (Connectors between pretrained towers, the way MLLMs use them: configs/scenes.py, whose sweep
configs/sweeps/zoo.py makes the zoo table.)

  ./launch.sh configs/zoo.py:perceiver                                  # full budget + blind baseline
  ./launch.sh configs/zoo.py:perceiver,smoke --workdir /tmp/perceiver   # ~2 minutes

The argument is NAME or NAME,smoke with NAME a key of ZOO below. The run is named proj_NAME (default workdir
runs/proj_NAME/).

The shared budget (mmproj/config_lib.py shapes_experiment; entries differ only in the projector): 48 px images of
a 3x3 grid of shapes, a 96-wide 3-block ViT with 8 px patches (a 6x6 grid, N = 36 visual tokens) and a 128-wide
3-block Llama-shaped LM, all trained from scratch for 800 steps at batch 64 on 20,000 images (AdamW, lr 1e-3),
evaluated on 500 test images next to the blind baseline (the same LM and budget, no image). smoke: 60 steps at
batch 32 on 512 images.

Related recipes, one override away (an entry that leaves a field at its default has no such field in its config:
override the whole projector dict):
  avg_pool       Gemma3's pooling projector: --config.model.projector="{'name': 'avg_pool', 'output_grid': 3,
                 'norm': 'rmsnorm', 'depth': 1, 'use_bias': False}"
  patch_merger   Qwen2.5-VL's merger: --config.model.projector="{'name': 'patch_merger', 'spatial_merge_size': 2,
                 'norm': 'rmsnorm'}"
  pixel_shuffle  Idefics3 / SmolVLM's connector, the same shuffle with one bias-free linear:
                 --config.model.projector.norm=none --config.model.projector.depth=1
                 --config.model.projector.use_bias=False
  gated_xattn    Flamingo's own recipe freezes the encoder and LM and trains only the blocks:
                 --config.train.frozen="['encoder/.*', 'lm/(?!xattn_layers_).*']" (with a pretrained encoder and
                 LM; here everything trains from scratch)
  qformer        here it trains end to end with the LM, without BLIP-2's stage-1 ITC/ITM/ITG pretraining (those
                 objectives: mmproj/projectors/qformer_losses.py)
"""
from mmproj import config_lib

WHERE = 'configs/zoo.py'

# NAME -> (patch size, projector). M = visual tokens the LM reads (N = 36 patches in).
ZOO = {
    'avg_pool': (8, dict(name='avg_pool', output_grid=3)),  # DeCo: 2-D avg pool to 3x3 + GELU MLP, M = 9
    'c_abstractor': (8, dict(name='c_abstractor', num_queries=9, depth=2, pos_emb_grid=(6, 6))),  # Honeybee, M = 9
    'cross_attention': (8, dict(name='cross_attention', num_queries=9, depth=1, num_heads=4, num_kv_heads=2)),  # M = 9
    'd_abstractor': (8, dict(name='d_abstractor', num_queries=9, depth=2, num_heads=4, num_points=4,
                             pos_emb_grid=(6, 6))),  # Honeybee: deformable attention, M = 9
    'gated_xattn': (8, dict(name='gated_xattn', every=1, heads=4, ff_mult=2)),  # Flamingo: LM cross-attends, M = 1
    'ldp': (8, dict(name='ldp')),  # MobileVLM: token MLP + depthwise-conv blocks (stride 2), M = 9
    'ldpv2': (8, dict(name='ldpv2')),  # MobileVLM V2: token MLP, 2x2 avg pool, positional conv, M = 9
    'frame_concat': (8, dict(name='frame_concat')),  # per-frame mlp + a time-marker token per frame, M = 37
    'linear': (8, dict(name='linear')),  # LLaVA: one affine map per patch, M = 36
    'llava_next_video': (8, dict(name='llava_next_video')),  # per-frame 2x2 avg pool + MLP, M = 9
    'llava_onevision_video': (8, dict(name='llava_onevision_video')),  # MLP, bilinear 2x down, newline, M = 10
    'mlp': (8, dict(name='mlp', depth=2)),  # LLaVA-1.5 mlp2x_gelu, M = 36
    'patch_merger': (8, dict(name='patch_merger', spatial_merge_size=2)),  # Qwen2-VL: 2x2 merge + MLP, M = 9
    'perceiver': (8, dict(name='perceiver', num_latents=9, depth=2, num_heads=4, head_dim=24)),  # Flamingo, M = 9
    'perceiver_idefics2': (8, dict(name='perceiver', variant='idefics2', num_latents=9, depth=2, num_heads=4,
                                   num_kv_heads=2, head_dim=32)),  # Idefics2: SwiGLU, RMSNorm, GQA, M = 9
    'pixel_shuffle': (8, dict(name='pixel_shuffle', scale_factor=2, norm='layernorm', depth=2,
                              use_bias=True)),  # InternVL: 2x2 space-to-depth + MLP, M = 9
    'qformer': (8, dict(name='qformer', num_query_tokens=9, hidden_dim=96, num_layers=2, num_heads=4, mlp_dim=384,
                        cross_attention_frequency=1)),  # BLIP-2: 9 queries, 2 BERT layers, M = 9
    'qwen_vl_resampler': (8, dict(name='qwen_vl_resampler', num_queries=9, num_heads=4)),  # Qwen-VL, M = 9
    'tokenpacker': (8, dict(name='tokenpacker', scale=2, num_heads=4)),  # TokenPacker: region attention, M = 9
}

# Every valid argument, so that tests/test_configs.py builds every entry in every variant.
VARIANTS = tuple(f'{name},{v}' if v else name for name in ZOO for v in config_lib.VARIANTS)


def get_config(arg: str = ''):
  name, options = config_lib.zoo_argument(arg, ZOO, WHERE)
  patch_size, projector = ZOO[name]
  return config_lib.shapes_experiment(','.join(options), name=f'proj_{name}', patch_size=patch_size,
                                      projector=projector)
