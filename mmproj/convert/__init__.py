"""Weights between transformers (PyTorch / safetensors) and mmproj params.

    flax_module, params = mmproj.convert.from_transformers(torch_module)
    y = flax_module.apply({'params': params}, x, grid=(h, w))     # same input, same output as torch_module(x)

Each supported transformers class has a converter registered with `@converter('ClassName')` in a family file
(`mmproj/convert/<family>.py`); the converter reads the module's state dict through a `StateDict`, which
fails on a missing key, a shape mismatch or a key left unused, naming the key.

Whole HF directories: `llama.load_lm`, `vision.load_vision_tower`, `whisper.load_audio_encoder`, `llava.load_llava`
(config.json + safetensors).
The way back (mmproj params -> HF tensors) lives next to each forward mapping (`vision.encoder_params_to_hf`,
`llama.lm_params_to_hf`, `llava.export_llava`); it reads params through a `ParamReader`, the export-side twin of
`StateDict` (missing / mis-shaped / leftover params raise ValueError naming the path).

Scanned models (model.lm.scan_layers / model.encoder.scan_layers, mmproj/layers/scan.py) keep their blocks as one
stacked tree `layers/...` with a leading layer axis instead of `layers_0/...`, `layers_1/...`. Converters always
produce and exporters always read the unscanned `layers_{i}` layout; `stack_layers` / `unstack_layers` (one
subtree) and `stack_model_params` / `unstack_model_params` (a whole {'encoder', 'projector', 'lm'} tree, as
cfg.model says) convert between the two. mmproj.train.pretrained stacks loaded HF weights for a scanned model; an
export of a scanned run unstacks first:
    export_llava(unstack_model_params(params, cfg.model), cfg, ...)
"""

from mmproj.convert.base import (CONVERTERS, HF_ACTIVATIONS, HF_ACTIVATION_NAMES, ParamReader, StateDict,
                                 activation, converter, from_transformers, hf_activation, scanned_depths, stack_layers,
                                 stack_model_params, unstack_layers, unstack_model_params)

# Family converters register themselves on import. Each family file adds its line.
from mmproj.convert import llava as llava
from mmproj.convert import blip2 as blip2
from mmproj.convert import mllama as mllama
from mmproj.convert import idefics3 as idefics3
from mmproj.convert import internvl as internvl
from mmproj.convert import qwen2_vl as qwen2_vl
from mmproj.convert import gemma3 as gemma3
from mmproj.convert import perceiver as perceiver
from mmproj.convert import audio as audio
from mmproj.convert import llava_video as llava_video
from mmproj.convert import llama as llama_convert
from mmproj.convert import vision as vision
from mmproj.convert import whisper as whisper

__all__ = ['CONVERTERS', 'HF_ACTIVATIONS', 'HF_ACTIVATION_NAMES', 'ParamReader', 'StateDict', 'activation', 'converter',
           'from_transformers', 'hf_activation', 'scanned_depths', 'stack_layers', 'stack_model_params',
           'unstack_layers', 'unstack_model_params']
