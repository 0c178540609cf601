"""Audio quickstart and the audio connector zoo: a Whisper-shaped encoder, a connector and a Llama-shaped LM trained
from scratch in the tones world (mmproj/data/tones.py: 2 s clips of synthesized tones, chords and noise bursts;
questions on count, order, timbre, timing, loudness and pitch), with a blind baseline on the same budget.

  ./launch.sh configs/audio_tones.py                                  # qwen2_audio, full budget + blind baseline
  ./launch.sh configs/audio_tones.py:smoke --workdir /tmp/audio       # the same pipeline in about 2 minutes
  ./launch.sh configs/audio_tones.py:voxtral                          # another connector: NAME[,smoke]

The encoder turns 2 s into 200 log-mel frames and T = 100 tokens (stride-2 conv stem); every connector but mlp
reads them down to M = 25 (mmproj/config_lib.py tones_experiment has the budget: 800 steps at batch 64 on 10,000
clips, evaluated on 500).
"""
from mmproj import config_lib

WHERE = 'configs/audio_tones.py'
DEFAULT = 'qwen2_audio'

# NAME -> projector, M = audio tokens the LM reads (T = 100 encoder tokens in).
ZOO = {
    'qwen2_audio': dict(name='qwen2_audio', pool_stride=4, norm='layernorm'),   # Qwen2-Audio: mean of 4, LN, linear
    'voxtral': dict(name='voxtral', stack_factor=4),                            # Voxtral: 4 frames stacked + MLP
    'granite_speech': dict(name='granite_speech', window_size=20, downsample_rate=4, hidden_dim=96, num_layers=2,
                           num_heads=4, mlp_dim=384),                           # 5 queries per 20-token window
    'audio_flamingo3': dict(name='audio_flamingo3', pool_stride=4),             # Audio Flamingo 3: mean of 4 + MLP
    'mlp': dict(name='mlp', depth=2),                                           # LLaVA-1.5 mlp2x_gelu, M = 100
    'avg_pool': dict(name='avg_pool', output_grid=25),                          # DeCo's pooling along time
    'perceiver': dict(name='perceiver', num_latents=25, depth=2, num_heads=4, head_dim=24),          # Flamingo
    'qformer': dict(name='qformer', num_query_tokens=25, hidden_dim=96, num_layers=2, num_heads=4, mlp_dim=384,
                    cross_attention_frequency=1),                               # BLIP-2 / SALMONN without windows
    'cross_attention': dict(name='cross_attention', num_queries=25, depth=1, num_heads=4, num_kv_heads=2),
}

VARIANTS = ('', 'smoke') + tuple(f'{name},{v}' if v else name for name in ZOO for v in config_lib.VARIANTS)


def get_config(arg: str = ''):
  if arg in config_lib.VARIANTS:
    arg = ','.join(filter(None, (DEFAULT, arg)))
  name, options = config_lib.zoo_argument(arg, ZOO, WHERE)
  return config_lib.tones_experiment(','.join(options), name=f'audio_{name}', projector=ZOO[name])
