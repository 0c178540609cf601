"""Video quickstart and the video connector zoo: a ViT reading each frame (or Qwen2-VL's 2-frame temporal patches),
a connector and a Llama-shaped LM trained from scratch in the motion world (mmproj/data/motion.py: the shapes world
in motion, 8 frames; questions on direction, order of events, which object moved, counts over time and colour
changes), with a blind baseline on the same budget.

  ./launch.sh configs/video_motion.py                                 # llava_onevision_video + blind baseline
  ./launch.sh configs/video_motion.py:smoke --workdir /tmp/video      # the same pipeline in a few minutes
  ./launch.sh configs/video_motion.py:perceiver                       # another connector: NAME[,smoke]

Each 48 px frame is a 4x4 grid of 12 px patches, 128 encoder tokens per clip; every connector reads them down to
M = 16 to 40 (mmproj/config_lib.py motion_experiment has the budget: 800 steps at batch 64 on 10,000 clips,
evaluated on 500). A connector with a frame count takes it from model.num_frames (= data.num_frames).
"""
from mmproj import config_lib

WHERE = 'configs/video_motion.py'
DEFAULT = 'llava_onevision_video'

# NAME -> (projector, ViT overrides); M = video tokens the LM reads (8 frames x 4x4 patches in).
ZOO = {
    'llava_onevision_video': (dict(name='llava_onevision_video'), {}),  # MLP, 2x bilinear down, newline: M = 33
    'llava_next_video': (dict(name='llava_next_video', spatial_pool_stride=2), {}),    # 2x2 average pool, MLP: 32
    'frame_concat': (dict(name='frame_concat', frame_projector=dict(name='avg_pool', output_grid=2)), {}),  # 8 x 5
    'patch_merger': (dict(name='patch_merger', spatial_merge_size=2), {}),            # Qwen2-VL 2x2 merge: 32
    'qwen2_vl': (dict(name='patch_merger', spatial_merge_size=2),
                 dict(temporal_patch_size=2)),          # Qwen2-VL: 2-frame temporal patches, 2x2 merge: 4 x 4 = 16
    'perceiver': (dict(name='perceiver', num_latents=32, depth=2, num_heads=4, head_dim=24, max_frames=8), {}),
    'qformer': (dict(name='qformer', num_query_tokens=32, hidden_dim=96, num_layers=2, num_heads=4, mlp_dim=384,
                     cross_attention_frequency=1), {}),                              # BLIP-2 over all frames: 32
    'cross_attention': (dict(name='cross_attention', num_queries=32, depth=1, num_heads=4, num_kv_heads=2), {}),
}
# The connectors that take the frame count as a field; it follows model.num_frames.
FRAME_COUNTED = ('llava_onevision_video', 'llava_next_video', 'frame_concat', 'patch_merger')

VARIANTS = ('', 'smoke') + tuple(f'{name},{v}' if v else name for name in ZOO for v in config_lib.VARIANTS)


def get_config(arg: str = ''):
  if arg in config_lib.VARIANTS:
    arg = ','.join(filter(None, (DEFAULT, arg)))
  name, options = config_lib.zoo_argument(arg, ZOO, WHERE)
  projector, encoder = ZOO[name]
  c = config_lib.motion_experiment(','.join(options), name=f'video_{name}', projector=projector, encoder=encoder)
  if projector['name'] in FRAME_COUNTED:
    frames = c.model.get_ref('num_frames')
    c.model.projector.num_frames = frames // encoder.get('temporal_patch_size', 1)
  return c
