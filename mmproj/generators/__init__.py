"""Modality generators: the "given" image generator of issue 22, playing Stable Diffusion's role for the draw world.

  generator = build(cfg)                         # cfg: the Generator's fields (dit.py; check_config names bad ones)
  params = init_params(generator, rng)
  cond = generator.apply({'params': params}, tokens, method='encode_text')       # int32 [B, L] -> [B, L, Dc]
  v = generator.apply({'params': params}, x_t, t, cond, method='velocity')       # [B, S, S, 3], [B] -> [B, S, S, 3]
  null = generator.apply({'params': params}, batch_size, method='null_condition')  # [B, L, Dc]
  loss = flow_matching_loss(generator, params, images_uint8, cond, rng)          # scalar, differentiable in cond
  images = sample(generator, params, cond, rng, steps=25, guidance=3.0)          # uint8 [B, S, S, 3]
  tokens = caption_tokens(tokenizer, captions, generator.text_len)               # int32 [B, L]
  save(directory, cfg, params); generator, params, cfg = load(directory)

dit.py: the model (text encoder, DiT velocity model, null conditioning); flow.py: rectified flow's loss and Euler
sampler with classifier-free guidance; storage.py: Orbax params + JSON config. The trained generator of the draw
world is a stage-0 artifact: mmproj/stage0_generator.py.
"""
from mmproj.generators.dit import (CONFIG_FIELDS, PREDICTIONS, TIME_SAMPLINGS, Generator, build, check_config,
                                   config_of, init_params, param_count)
from mmproj.generators.flow import (caption_tokens, euler_sample, flow_matching_loss, flow_matching_losses, sample,
                                    to_uint8, to_unit_range)
from mmproj.generators.storage import load, load_config, save

__all__ = [
    'CONFIG_FIELDS', 'PREDICTIONS', 'TIME_SAMPLINGS', 'Generator', 'build', 'caption_tokens', 'check_config',
    'config_of', 'euler_sample', 'flow_matching_loss', 'flow_matching_losses', 'init_params', 'load', 'load_config',
    'param_count', 'sample', 'save', 'to_uint8', 'to_unit_range',
]
