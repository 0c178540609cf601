"""Projector registry: name -> flax module class turning encoder tokens [B, N, Dv] into LM tokens [B, M, Dt].

Every projector class
  - is a `flax.linen.Module` with fields `in_dim`, `out_dim`, `dtype` plus its own hyper-parameters (the keys of
    `cfg.model.projector` other than `name`, `in_dim`, `out_dim`), called as `proj(x, grid=(h, w), deterministic=True)`;
  - has methods `check()` (ValueError naming the field, `model.projector.<field>`; `check_int` / `check_choice` /
    `check_positive` below do the common checks), `num_output_tokens(grid) -> int` and `param_count() -> int` (the
    formula documented in its docstring). They read the module's fields, so a hyper-parameter's default lives only
    in its field; they are plain methods, usable on the unbound module `build` returns.

    proj = build(cfg.model.projector, in_dim=Dv, out_dim=Dt)
    y = proj.apply({'params': p}, x, grid=(h, w), deterministic=True)    # x [B, N, Dv] -> y [B, M, Dt]
    num_output_tokens(cfg.model.projector, (h, w)) == proj.num_output_tokens((h, w))    # M
    param_count(cfg.model.projector, Dv, Dt) == proj.param_count()

Grids: an image encoder's tokens come with grid=(h, w) (row-major); an audio encoder's with grid=(T,), a 1-tuple
(tokens in time order); video is F frames of grid (h, w) concatenated (N = F*h*w).
  accepts 1-D (audio) grids: linear, mlp, avg_pool (pooling along time), perceiver, qformer, cross_attention,
      gated_xattn (with a resampler that accepts them; the default linear does), and the audio connectors
      qwen2_audio, voxtral, granite_speech, audio_flamingo3 (which read any grid's tokens as one sequence).
  needs a 2-D (h, w) grid: pixel_shuffle, patch_merger, c_abstractor, d_abstractor, ldp, ldpv2, tokenpacker
      (space-to-depth, convolutions, 2-D pools or regions of the patch map), qwen_vl_resampler (its 2-D sin-cos
      key positions are resized to (h, w)) and the video connectors llava_next_video, llava_onevision_video,
      frame_concat (frames of an (h, w) grid). They raise a ValueError naming the projector and saying it needs a 2-D
      (h, w) grid, from num_output_tokens (which model validation calls) and from __call__, before any compile.
"""

from mmproj.projectors.registry import (MODALITY, REGISTRY, build, check_choice, check_int, check_positive, get,
                                       num_output_tokens, param_count, register, validate)

# Projector families register themselves on import.
from mmproj.projectors import linear as linear
from mmproj.projectors import mlp as mlp
from mmproj.projectors import gated_xattn as gated_xattn
from mmproj.projectors import qformer as qformer
from mmproj.projectors import pixel_shuffle as pixel_shuffle
from mmproj.projectors import patch_merger as patch_merger
from mmproj.projectors import avg_pool as avg_pool
from mmproj.projectors import perceiver as perceiver
from mmproj.projectors import qwen_vl_resampler as qwen_vl_resampler
from mmproj.projectors import cross_attention as cross_attention
from mmproj.projectors import tokenpacker as tokenpacker
from mmproj.projectors import c_abstractor as c_abstractor
from mmproj.projectors import d_abstractor as d_abstractor
from mmproj.projectors import ldp as ldp
from mmproj.projectors import ldpv2 as ldpv2
from mmproj.projectors import qwen2_audio as qwen2_audio
from mmproj.projectors import voxtral as voxtral
from mmproj.projectors import granite_speech as granite_speech
from mmproj.projectors import audio_flamingo3 as audio_flamingo3
from mmproj.projectors import llava_next_video as llava_next_video
from mmproj.projectors import llava_onevision_video as llava_onevision_video
from mmproj.projectors import frame_concat as frame_concat

__all__ = ['MODALITY', 'REGISTRY', 'build', 'check_choice', 'check_int', 'check_positive', 'get', 'num_output_tokens', 'param_count',
           'register', 'validate']
