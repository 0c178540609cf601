"""LLaVA-NeXT-Video and LLaVA-OneVision video connectors -> mmproj `llava_next_video` / `llava_onevision_video`.

In transformers neither connector is one module: LLaVA-NeXT-Video's is two siblings of LlavaNextVideoModel
(`vision_resampler`, a LlavaNextVideoPooler, then `multi_modal_projector`), LLaVA-OneVision's is the model's
`multi_modal_projector`, its `apply_pooling` method and its `image_newline` parameter. So they are ported by
functions taking those parts, not through `from_transformers`:

  module, params = llava_next_video_connector(model.vision_resampler, model.multi_modal_projector, num_frames=F)
  module, params = llava_onevision_video_connector(model, num_frames=F)    # a LlavaOnevisionModel (or
                                                                           # ...ForConditionalGeneration)
  y = module.apply({'params': params}, x, grid=(h, w))    # x [B, F*h*w, Dv]: the vision tower's selected features
                                                          # of the B*F frames, frames of a video consecutive

y equals HF's video features for the same frame features: LlavaNextVideo's
multi_modal_projector(vision_resampler(feats)).unflatten(0, (B, F)).flatten(1, 2); LlavaOnevision's
cat(apply_pooling(multi_modal_projector(feats)).reshape(B, F*h'*w', Dt), image_newline). The projectors alone
(LlavaNextVideoMultiModalProjector, LlavaOnevisionMultiModalProjector, the image path's MLP) go through
`from_transformers` to an mmproj `mlp`, as LlavaMultiModalProjector does.

Pooler: AvgPool2d / MaxPool2d / Conv2d with kernel = stride = s (no padding, dilation 1, floor mode); Conv2d's
weight [Dv, Dv, s, s] -> kernel [s*s*Dv, Dv] in (row, col, channel) order, the order of the space-to-depth in
front of it. HF's spatial_pool_out_channels must equal the vision width (the projector reads that width anyway).
"""

from __future__ import annotations

from typing import Any

from mmproj import projectors
from mmproj.convert.base import StateDict, activation, converter
from mmproj.convert.llava import llava_projector

converter('LlavaNextVideoMultiModalProjector', 'LlavaOnevisionMultiModalProjector')(llava_projector)


def _pair(value: Any) -> tuple[int, int]:
  return (int(value), int(value)) if isinstance(value, int) else tuple(int(v) for v in value)


def _mlp_params(sd: StateDict, prefix: str, module: Any, where: str) -> tuple[dict, dict]:
  """LLaVA's projector (linear_1, act, linear_2; biases or none) under `prefix` -> (cfg fields, params)."""
  bias = f'{prefix}linear_1.bias' in sd
  params = {'linear_1': sd.dense(f'{prefix}linear_1', bias), 'linear_2': sd.dense(f'{prefix}linear_2', bias)}
  act = activation(module.act, f'{where}.act (projector_hidden_act)')
  return dict(depth=2, act=act, use_bias=bias), params


def _pool_mode(pool: Any) -> tuple[str, int]:
  """The pooler's torch layer -> (pool_mode, stride s); ValueError unless kernel = stride = (s, s) without padding."""
  kind = type(pool).__name__
  modes = {'AvgPool2d': 'average', 'MaxPool2d': 'max', 'Conv2d': 'conv'}
  if kind not in modes:
    raise ValueError(f'LlavaNextVideoPooler.pool is a {kind}; expected one of {sorted(modes)}')
  kernel, stride, padding = _pair(pool.kernel_size), _pair(pool.stride), _pair(pool.padding)
  dilation = _pair(getattr(pool, 'dilation', 1))
  if kernel[0] != kernel[1] or kernel != stride or padding != (0, 0) or dilation != (1, 1) or \
      getattr(pool, 'ceil_mode', False):
    raise ValueError(f'LlavaNextVideoPooler.pool ({kind}): kernel {kernel}, stride {stride}, padding {padding}, '
                     f'dilation {dilation} are not a square kernel = stride (spatial_pool_stride) without padding')
  return modes[kind], kernel[0]


def llava_next_video_connector(pooler: Any, projector: Any, num_frames: int = 1):
  """LlavaNextVideoPooler (model.vision_resampler) + LlavaNextVideoMultiModalProjector (model.multi_modal_projector)
  -> (mmproj llava_next_video projector for `num_frames` frames, params)."""
  mode, s = _pool_mode(pooler.pool)
  params = {}
  if mode == 'conv':
    sd_pool = StateDict.of(pooler)
    w = sd_pool.take('pool.weight')                                        # [Dout, Dv, s, s]
    if w.shape[0] != w.shape[1]:
      raise ValueError(f'LlavaNextVideoPooler: conv pool maps width {w.shape[1]} to {w.shape[0]} '
                       '(spatial_pool_out_channels); the llava_next_video projector keeps the vision width')
    params['pool'] = {'kernel': w.transpose(2, 3, 1, 0).reshape(s * s * w.shape[1], w.shape[0]),  # [s*s*Dv, Dv]
                      'bias': sd_pool.take('pool.bias', (w.shape[0],))}
    sd_pool.finish()
  sd = StateDict.of(projector)
  fields, mlp = _mlp_params(sd, '', projector, type(projector).__name__)
  sd.finish()
  params.update(mlp)
  in_dim, out_dim = params['linear_1']['kernel'].shape
  if mode == 'conv' and params['pool']['kernel'].shape[1] != in_dim:
    raise ValueError(f'LlavaNextVideoPooler: conv pool width {params["pool"]["kernel"].shape[1]} != the projector '
                     f'input width {in_dim}')
  cfg = dict(name='llava_next_video', num_frames=num_frames, pool_mode=mode, spatial_pool_stride=s, **fields)
  return projectors.build(cfg, in_dim=in_dim, out_dim=out_dim), params


def llava_onevision_video_connector(model: Any, num_frames: int = 1):
  """LlavaOnevisionModel (or LlavaOnevisionForConditionalGeneration): its multi_modal_projector and image_newline
  -> (mmproj llava_onevision_video projector for `num_frames` frames, params). The vision tower and LM are not
  read: their weights are other converters' business."""
  model = getattr(model, 'model', model)      # ...ForConditionalGeneration wraps the LlavaOnevisionModel
  projector = model.multi_modal_projector
  sd = StateDict.of(projector)
  fields, params = _mlp_params(sd, '', projector, type(projector).__name__)
  sd.finish()
  in_dim, out_dim = params['linear_1']['kernel'].shape
  newline = StateDict({'image_newline': model.image_newline.detach().cpu().float().numpy()}, where=type(model).__name__)
  params['image_newline'] = newline.take('image_newline', (out_dim,))
  newline.finish()
  cfg = dict(name='llava_onevision_video', num_frames=num_frames, newline=True, **fields)
  return projectors.build(cfg, in_dim=in_dim, out_dim=out_dim), params
