"""Video through the image encoder and the video connectors.

ViT on [B, F, H, W, 3] (frames folded into the batch) and Qwen2-VL's temporal patches (parity with transformers'
PatchEmbed on the image processor's own flattening); the connectors llava_next_video, llava_onevision_video,
frame_concat and patch_merger on F frames (generic checks: shapes, exact param_count, logical axes, gradients,
no mixing across frames, named errors), parity against transformers at odd sizes (odd h, w, F, widths), and the
perceiver consuming ViT video tokens with per-frame time embeddings.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parity_utils import ATOL, assert_close, randomize_, seeded, to_torch

from mmproj import convert, projectors
from mmproj.encoders import ViT
from mmproj.layers import token_grid

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

DV, DT, B = 5, 7, 2

# (cfg, grid): every video connector at odd sizes, F = num_frames frames of grid (h, w).
CASES = {
    'llava_next_video_average': (dict(name='llava_next_video', num_frames=3, spatial_pool_stride=3), (3, 9)),
    'llava_next_video_max': (dict(name='llava_next_video', num_frames=1, pool_mode='max'), (4, 6)),
    'llava_next_video_conv': (dict(name='llava_next_video', num_frames=3, pool_mode='conv', spatial_pool_stride=3,
                                   use_bias=False, act='silu'), (9, 3)),
    'llava_onevision_video': (dict(name='llava_onevision_video', num_frames=3), (5, 7)),
    'llava_onevision_video_no_newline': (dict(name='llava_onevision_video', num_frames=1, newline=False,
                                              depth=1), (3, 3)),
    'frame_concat_mlp': (dict(name='frame_concat', num_frames=3, max_frames=5), (3, 5)),
    'frame_concat_avg_pool': (dict(name='frame_concat', num_frames=3, max_frames=3,
                                   frame_projector=dict(name='avg_pool', output_grid=(1, 2), adaptive=True)),
                              (3, 5)),
    'patch_merger_frames': (dict(name='patch_merger', num_frames=3, spatial_merge_size=3), (3, 9)),
}


def _init(cfg, grid, seed=0, batch=B):
  """(module, params, boxed abstract params, x): params N(0, 0.5) in init's shapes, x [B, F*h*w, Dv]."""
  module = projectors.build(cfg, in_dim=DV, out_dim=DT)
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(batch, cfg.get('num_frames', 1) * grid[0] * grid[1], DV)).astype(np.float32))
  boxed = jax.eval_shape(lambda x: module.init(jax.random.key(0), x, grid=grid), x)['params']
  params = jax.tree.map(lambda s: jnp.asarray(0.5 * rng.normal(size=s.shape), s.dtype), nn.unbox(boxed))
  return module, params, boxed, x


def _apply(module, params, x, grid):
  return jax.jit(lambda p, x: module.apply({'params': p}, x, grid=grid))(params, jnp.asarray(x))


def _check_port(module, params, x, grid):
  """The converted params have exactly the tree and shapes the module initialises (a trainable checkpoint)."""
  init = nn.unbox(jax.eval_shape(lambda x: module.init(jax.random.key(0), x, grid=grid), jnp.asarray(x))['params'])
  assert jax.tree.structure(init) == jax.tree.structure(params)
  assert jax.tree.map(np.shape, init) == jax.tree.map(np.shape, params)


def _frame_of_output_tokens(cfg, grid):
  """Frame index of every output token (-1: depends on no frame, the OneVision newline)."""
  f = cfg.get('num_frames', 1)
  per_frame = (projectors.num_output_tokens(dict(cfg, num_frames=1), grid)
               - (cfg['name'] == 'llava_onevision_video' and cfg.get('newline', True)))
  frames = np.repeat(np.arange(f), per_frame)
  return np.concatenate([frames, [-1]]) if len(frames) < projectors.num_output_tokens(cfg, grid) else frames


# ---------------------------------------------------------------------------------------------------- generic


@pytest.mark.parametrize('case', sorted(CASES))
def test_shape_params_axes(case):
  cfg, grid = CASES[case]
  module, params, boxed, x = _init(cfg, grid)
  y = _apply(module, params, x, grid)
  assert y.shape == (B, projectors.num_output_tokens(cfg, grid), DT) and y.dtype == jnp.float32
  assert sum(p.size for p in jax.tree.leaves(params)) == projectors.param_count(cfg, DV, DT)
  for leaf in jax.tree.leaves(boxed, is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned)):
    assert isinstance(leaf, nn.LogicallyPartitioned), 'every param carries logical axis names'
    assert len(leaf.names) == leaf.value.ndim and len(set(leaf.names)) == len(leaf.names), leaf.names


def test_param_count_formulas():
  """The docstring formulas written out (Dv=96, Dt=128, s=2)."""
  mlp = (96 * 128 + 128) + (128 * 128 + 128)
  assert projectors.param_count(dict(name='llava_next_video'), 96, 128) == mlp
  assert projectors.param_count(dict(name='llava_next_video', pool_mode='conv'), 96, 128) == 4 * 96 * 96 + 96 + mlp
  assert projectors.param_count(dict(name='llava_onevision_video'), 96, 128) == mlp + 128
  assert projectors.param_count(dict(name='frame_concat', max_frames=16), 96, 128) == mlp + 16 * 128
  assert projectors.num_output_tokens(dict(name='llava_next_video', num_frames=4), (24, 24)) == 4 * 144
  assert projectors.num_output_tokens(dict(name='llava_onevision_video', num_frames=3), (27, 27)) == 3 * 14 * 14 + 1
  assert projectors.num_output_tokens(dict(name='frame_concat', num_frames=5), (6, 6)) == 5 * 37
  assert projectors.num_output_tokens(dict(name='patch_merger', num_frames=3), (4, 6)) == 3 * 6


@pytest.mark.parametrize('case', sorted(CASES))
def test_gradients_and_no_mixing_across_frames(case):
  """Every param gets a finite, non-zero gradient; output tokens of frame f depend on frame f's tokens only (and
  on no other batch row); the OneVision newline depends on no input."""
  cfg, grid = CASES[case]
  module, params, _, x = _init(cfg, grid)
  loss = lambda p, x: jnp.mean(module.apply({'params': p}, x, grid=grid) ** 2)
  gp, gx = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(gp) + [gx])
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(gp)), 'every param gets a gradient'
  jac = jax.jit(jax.jacrev(lambda x: module.apply({'params': params}, x, grid=grid)[0]))(x)   # [M, Dt, B, N, Dv]
  touched = np.asarray(jnp.any(jac != 0, axis=(1, 4)))                                          # [M, B, N]
  assert not touched[:, 1].any(), 'no mixing across the batch'
  hw = grid[0] * grid[1]
  token_frame = np.arange(touched.shape[2]) // hw
  for k, f in enumerate(_frame_of_output_tokens(cfg, grid)):
    assert not touched[k, 0, token_frame != f].any(), f'output token {k} (frame {f}) reads another frame'
    assert f < 0 or touched[k, 0, token_frame == f].any() or cfg['name'] == 'frame_concat', k


@pytest.mark.parametrize('case', sorted(CASES))
def test_wrong_frame_count_names_num_frames(case):
  cfg, grid = CASES[case]
  module = projectors.build(cfg, in_dim=DV, out_dim=DT)
  f = cfg.get('num_frames', 1)
  x = jnp.zeros((1, (f + 1) * grid[0] * grid[1], DV))
  with pytest.raises(ValueError, match=rf'hold {f + 1} frames of grid {grid[0]}x{grid[1]}.*'
                                       rf'model\.projector\.num_frames={f}'):
    module.init(jax.random.key(0), x, grid=grid)


@pytest.mark.parametrize('cfg,field', [
    (dict(name='llava_next_video', pool_mode='min'), 'pool_mode'),
    (dict(name='llava_next_video', spatial_pool_stride=0), 'spatial_pool_stride'),
    (dict(name='llava_next_video', num_frames=0), 'num_frames'),
    (dict(name='llava_next_video', act='tanh'), 'act'),
    (dict(name='llava_onevision_video', depth=0), 'depth'),
    (dict(name='llava_onevision_video', num_frames=2.0), 'num_frames'),
    (dict(name='patch_merger', num_frames=-1), 'num_frames'),
    (dict(name='frame_concat', num_frames=9, max_frames=8), 'max_frames'),
    (dict(name='frame_concat', max_frames=0), 'max_frames'),
    (dict(name='frame_concat', frame_projector=dict(name='gated_xattn')), 'frame_projector'),
    (dict(name='frame_concat', frame_projector=dict(name='mlp', depth=0)), r'frame_projector: model\.projector\.depth'),
    (dict(name='frame_concat', frame_projector=dict(name='mlp', pool=2)), r'frame_projector: .*model\.projector\.pool'),
    (dict(name='frame_concat', frame_projector=dict(name='patch_merger', num_frames=2)),
     r'frame_projector\.num_frames'),
    (dict(name='frame_concat', frame_projector='mlp'), 'frame_projector'),
])
def test_bad_config_names_field(cfg, field):
  with pytest.raises(ValueError, match=rf'model\.projector\.{field}'):
    projectors.build(cfg, in_dim=DV, out_dim=DT)


def test_pool_stride_must_divide_the_grid():
  """torch's pools would drop the last rows / columns of a 5x7 grid: refused, naming the field and the grid."""
  cfg = dict(name='llava_next_video', num_frames=3)
  module = projectors.build(cfg, in_dim=DV, out_dim=DT)
  pattern = r'5x7.*model\.projector\.spatial_pool_stride=2'
  with pytest.raises(ValueError, match=pattern):
    module.init(jax.random.key(0), jnp.zeros((1, 3 * 35, DV)), grid=(5, 7))
  with pytest.raises(ValueError, match=pattern):
    projectors.num_output_tokens(cfg, (5, 7))


def test_frame_concat_layout():
  """Token f*(m+1) is time marker f exactly; the next m tokens are the frame projector on frame f alone."""
  cfg, grid = CASES['frame_concat_avg_pool']
  module, params, _, x = _init(cfg, grid)
  y = np.asarray(_apply(module, params, x, grid))
  inner = projectors.build(cfg['frame_projector'], in_dim=DV, out_dim=DT)
  m, hw = inner.num_output_tokens(grid), grid[0] * grid[1]
  for f in range(cfg['num_frames']):
    block = y[:, f * (m + 1):(f + 1) * (m + 1)]
    np.testing.assert_array_equal(block[:, 0], np.broadcast_to(params['time_markers'][f], (B, DT)))
    assert_close(block[:, 1:], _apply(inner, params['frame_projector'], x[:, f * hw:(f + 1) * hw], grid),
                 what=f'frame {f}')


def test_bilinear_resize_matches_torch_interpolate():
  """token_grid.bilinear_resize == torch interpolate(bilinear, align_corners=False) down and up, odd sizes."""
  rng = seeded(0)
  for grid, out_grid in [((5, 7), (3, 4)), ((9, 9), (5, 5)), ((6, 4), (3, 2)), ((1, 5), (1, 3)), ((3, 5), (7, 4)),
                         ((7, 3), (2, 3))]:
    x = rng.normal(size=(B, grid[0] * grid[1], DV)).astype(np.float32)
    with torch.no_grad():
      ref = torch.nn.functional.interpolate(to_torch(x).transpose(1, 2).reshape(B, DV, *grid), size=out_grid,
                                            mode='bilinear', align_corners=False)
    assert_close(token_grid.bilinear_resize(jnp.asarray(x), grid, out_grid), ref.flatten(2).transpose(1, 2),
                 what=f'{grid} -> {out_grid}')


# ---------------------------------------------------------------------------------------------------- ViT


def _vit(t=1, **kw):
  return ViT(image_size=9, patch_size=3, width=6, depth=1, num_heads=2, mlp_dim=10, temporal_patch_size=t, **kw)


def test_vit_video_is_frames_folded_into_the_batch():
  """t = 1: video tokens are each frame's image tokens, frames in time order; the params are an image tower's."""
  vit = _vit()
  video = jnp.asarray(seeded(1).integers(0, 256, size=(B, 3, 9, 9, 3)), jnp.uint8)
  params = nn.unbox(vit.init(jax.random.key(0), video[:, 0]))
  assert params['params']['patch_embedding']['kernel'].shape == (27, 6)   # [p*p*3, D], as before
  tokens, grid = jax.jit(vit.apply)(params, video)
  assert grid == (3, 3) and tokens.shape == (B, 3 * 9, 6)
  for f in range(3):
    image_tokens, _ = vit.apply(params, video[:, f])
    np.testing.assert_allclose(tokens[:, f * 9:(f + 1) * 9], image_tokens, atol=ATOL)


def test_vit_temporal_patches():
  """t = 2: kernel [t*p*p*3, D]; an image equals the still video of it repeated t times; groups are encoded on
  their own and come back in time order; F not divisible by t names the field and F."""
  vit = _vit(t=2)
  video = jnp.asarray(seeded(2).integers(0, 256, size=(B, 6, 9, 9, 3)), jnp.uint8)
  params = nn.unbox(vit.init(jax.random.key(0), video))
  assert params['params']['patch_embedding']['kernel'].shape == (54, 6)
  tokens, grid = jax.jit(vit.apply)(params, video)
  assert grid == (3, 3) and tokens.shape == (B, 3 * 9, 6)
  for g in range(3):
    group_tokens, _ = vit.apply(params, video[:, 2 * g:2 * g + 2])
    np.testing.assert_allclose(tokens[:, g * 9:(g + 1) * 9], group_tokens, atol=ATOL)
  image_tokens, _ = vit.apply(params, video[:, 0])
  still_tokens, _ = vit.apply(params, jnp.repeat(video[:, :1], 2, axis=1))
  np.testing.assert_allclose(image_tokens, still_tokens, atol=ATOL)
  with pytest.raises(ValueError, match=r'F=5 frames.*model\.encoder\.temporal_patch_size=2'):
    vit.apply(params, video[:, :5])
  assert vit.matmul_flops()['embed'] == 2 * 9 * (3 * 2 * 9) * 6


def test_temporal_vit_does_not_export_to_clip_or_siglip():
  cfg = dict(image_size=9, patch_size=3, width=6, depth=1, num_heads=2, mlp_dim=10, temporal_patch_size=2)
  with pytest.raises(ValueError, match=r'model\.encoder\.temporal_patch_size=2'):
    convert.vision.encoder_config_to_hf(cfg)


def _qwen_window_order(tokens, groups, grid, m):
  """Row-major tokens [B, F'*h*w, D] -> Qwen2-VL's sequence order (each group's merge windows), from transformers'
  get_vision_position_ids (the (row, col) of every token of the sequence, groups one after another)."""
  from transformers.vision_utils import get_vision_position_ids
  h, w = grid
  pos = get_vision_position_ids(torch.tensor([[groups, h, w]]), m).numpy()        # [F'*h*w, 2] (row, col)
  group = np.arange(groups * h * w) // (h * w)
  return np.asarray(tokens)[:, group * h * w + pos[:, 0] * w + pos[:, 1]]


def _qwen_video_patches(video, p, m, t):
  """Qwen2VLVideoProcessor.patchify's layout (that processor needs torchvision, absent here): video [B, F, C, H, W]
  -> [B, F/t * h*w, C*t*p*p], groups in time order, each in merge-window order, a patch flattened (c, t, p, p)."""
  b, f, c, hh, ww = video.shape
  x = video.reshape(b, f // t, t, c, hh // p // m, m, p, ww // p // m, m, p)
  x = x.transpose(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)          # (b, gt, gh, gw, mh, mw, c, t, p, q)
  return x.reshape(b, -1, c * t * p * p)


@pytest.mark.parametrize('t', [2, 3])
def test_qwen2_vl_patch_embed_parity(t):
  """Our ViT's patch embedding (uint8 pixels, CLIP mean/std) vs transformers PatchEmbed on the pixels as Qwen2-VL's
  image processor flattens them (an image repeated t times), and on video patches in the video processor's layout."""
  from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
  from transformers.models.qwen2_vl.modeling_qwen2_vl import PatchEmbed
  p, m, d = 3, 3, 7
  hh, ww, grid = 9, 27, (3, 9)
  hf = randomize_(PatchEmbed(patch_size=p, temporal_patch_size=t, in_channels=3, embed_dim=d))
  embed, params = convert.from_transformers(hf)
  assert embed.temporal_patch_size == t and params['kernel'].shape == (t * p * p * 3, d)
  processor = Qwen2VLImageProcessorPil(patch_size=p, merge_size=m, temporal_patch_size=t)
  rng = seeded(3)
  images = rng.integers(0, 256, size=(B, hh, ww, 3)).astype(np.uint8)
  pixel_values = processor(list(images), do_resize=False, return_tensors='np')['pixel_values']   # [B*h*w, 3*t*p*p]
  with torch.no_grad():
    ref = hf(to_torch(pixel_values.astype(np.float32))).numpy().reshape(B, -1, d)                # window order
  mean, std = tuple(processor.image_mean), tuple(processor.image_std)
  from mmproj.encoders.vit import to_float_image
  x = to_float_image(jnp.asarray(images), mean, std)
  ours, ours_grid = embed.apply({'params': params}, jnp.repeat(x[:, None], t, axis=1))          # [B, h*w, D]
  assert ours_grid == grid
  assert_close(_qwen_window_order(ours, 1, grid, m), ref, what='image')

  frames = 3 * t                                                                # F' = 3 temporal groups (odd)
  video = rng.normal(size=(B, frames, hh, ww, 3)).astype(np.float32)
  with torch.no_grad():
    patches = _qwen_video_patches(video.transpose(0, 1, 4, 2, 3), p, m, t)
    ref = hf(to_torch(patches.reshape(-1, 3 * t * p * p))).numpy().reshape(B, -1, d)
  # our layout helper agrees with the processor's own flattening on a still video (an image repeated t times)
  still = np.repeat(np.asarray(x)[:, None], t, axis=1).transpose(0, 1, 4, 2, 3)
  np.testing.assert_allclose(_qwen_video_patches(still, p, m, t).reshape(-1, 3 * t * p * p), pixel_values,
                             atol=ATOL)   # the same layout; normalised by us vs by the processor
  groups = video.reshape(B * 3, t, hh, ww, 3)
  ours, _ = embed.apply({'params': params}, jnp.asarray(groups))                               # [B*F', h*w, D]
  ours = np.asarray(ours).reshape(B, 3 * grid[0] * grid[1], d)                                  # groups in order
  assert_close(_qwen_window_order(ours, 3, grid, m), ref, what='video')


def test_qwen2_vl_patch_embed_bad_weights():
  from transformers.models.qwen2_vl.modeling_qwen2_vl import PatchEmbed
  hf = PatchEmbed(patch_size=3, temporal_patch_size=2, in_channels=3, embed_dim=4)
  hf.proj = torch.nn.Conv3d(3, 4, kernel_size=(2, 3, 3), stride=(1, 3, 3), bias=False)
  with pytest.raises(ValueError, match=r'PatchEmbed: proj kernel \(2, 3, 3\) / stride \(1, 3, 3\)'):
    convert.from_transformers(hf)


# ---------------------------------------------------------------------------------------------------- parity


def _llava_next_video_parts(pool_mode, stride, side, act='gelu', bias=True):
  from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextVideoConfig
  from transformers.models.llava_next_video.modeling_llava_next_video import (LlavaNextVideoMultiModalProjector,
                                                                              LlavaNextVideoPooler)
  cfg = LlavaNextVideoConfig(
      vision_config=CLIPVisionConfig(hidden_size=DV, num_attention_heads=1, image_size=2 * side, patch_size=2),
      text_config=LlamaConfig(hidden_size=DT, num_attention_heads=1, num_key_value_heads=1, head_dim=4),
      spatial_pool_mode=pool_mode, spatial_pool_stride=stride, projector_hidden_act=act,
      multimodal_projector_bias=bias)
  return (randomize_(LlavaNextVideoPooler(cfg), seed=1),
          randomize_(LlavaNextVideoMultiModalProjector(cfg), seed=2))


@pytest.mark.parametrize('pool_mode,stride,side,frames,act,bias', [
    ('average', 3, 9, 3, 'gelu', True),
    ('max', 3, 9, 1, 'gelu', True),
    ('conv', 3, 9, 3, 'silu', False),
    ('conv', 5, 5, 3, 'gelu', True),
])
def test_llava_next_video_parity(pool_mode, stride, side, frames, act, bias):
  """vision_resampler (the pooler) first, then multi_modal_projector, frames unflattened and concatenated
  (LlavaNextVideoModel.get_video_features); HF's pooler assumes a square grid."""
  pooler, projector = _llava_next_video_parts(pool_mode, stride, side, act, bias)
  module, params = convert.llava_video.llava_next_video_connector(pooler, projector, num_frames=frames)
  assert (module.pool_mode, module.spatial_pool_stride, module.num_frames) == (pool_mode, stride, frames)
  grid = (side, side)
  x = seeded(4).normal(size=(B, frames * side * side, DV)).astype(np.float32)
  _check_port(module, params, x, grid)
  with torch.no_grad():
    feats = to_torch(x).reshape(B * frames, side * side, DV)                 # the tower's B*F frames
    ref = projector(pooler(feats)).unflatten(0, (B, frames)).flatten(1, 2)
  assert_close(_apply(module, params, x, grid), ref)


@pytest.mark.parametrize('pool_mode', ['average', 'max', 'conv'])
def test_llava_next_video_parity_non_square(pool_mode):
  """A 9x3 grid: HF's pooler forward only reshapes square grids, so its own pool layer is run on the grid."""
  pooler, projector = _llava_next_video_parts(pool_mode, 3, 9)
  frames, (h, w) = 3, (9, 3)
  module, params = convert.llava_video.llava_next_video_connector(pooler, projector, num_frames=frames)
  x = seeded(5).normal(size=(B, frames * h * w, DV)).astype(np.float32)
  with torch.no_grad():
    spatial = to_torch(x).reshape(B * frames, h, w, DV).permute(0, 3, 1, 2)  # [B*F, Dv, h, w]
    pooled = pooler.pool(spatial).flatten(2).transpose(1, 2)                 # [B*F, h'*w', Dv]
    ref = projector(pooled).reshape(B, -1, DT)
  assert_close(_apply(module, params, x, (h, w)), ref)


def _onevision_model(side, act='gelu', bias=True):
  from transformers import LlavaOnevisionConfig
  from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel
  cfg = LlavaOnevisionConfig(
      vision_config=dict(model_type='siglip_vision_model', hidden_size=DV, num_attention_heads=1,
                         intermediate_size=6, num_hidden_layers=1, image_size=2 * side, patch_size=2),
      text_config=dict(model_type='qwen2', hidden_size=DT, num_attention_heads=1, num_key_value_heads=1,
                       intermediate_size=8, num_hidden_layers=1, vocab_size=16),
      projector_hidden_act=act, multimodal_projector_bias=bias)
  return randomize_(LlavaOnevisionModel(cfg), seed=3)


def _onevision_reference(model, feats, batch, frames):
  """LlavaOnevisionModel.get_video_features after the vision tower, line for line: projector, apply_pooling,
  frames concatenated per video, image_newline appended."""
  video = model.multi_modal_projector(feats)
  video = model.apply_pooling(video)
  video = video.reshape(batch, frames * video.shape[1], -1)
  newline = model.image_newline[None, None, :].repeat(batch, 1, 1)
  return torch.cat((video, newline), dim=1)


@pytest.mark.parametrize('side,frames,act,bias', [(9, 3, 'gelu', True), (5, 1, 'gelu_pytorch_tanh', False),
                                                  (6, 3, 'silu', True)])
def test_llava_onevision_video_parity(side, frames, act, bias):
  model = _onevision_model(side, act, bias)
  module, params = convert.llava_video.llava_onevision_video_connector(model, num_frames=frames)
  assert module.num_frames == frames and module.newline
  grid = (side, side)
  x = seeded(6).normal(size=(B, frames * side * side, DV)).astype(np.float32)
  _check_port(module, params, x, grid)
  with torch.no_grad():
    ref = _onevision_reference(model, to_torch(x).reshape(B * frames, side * side, DV), B, frames)
  assert ref.shape[1] == frames * ((side + 1) // 2) ** 2 + 1
  assert_close(_apply(module, params, x, grid), ref)


def test_llava_onevision_video_parity_non_square():
  """A 5x7 grid (apply_pooling reads a square grid off the config): torch interpolate on the projected grid."""
  model = _onevision_model(5)
  frames, (h, w) = 3, (5, 7)
  module, params = convert.llava_video.llava_onevision_video_connector(model, num_frames=frames)
  x = seeded(7).normal(size=(B, frames * h * w, DV)).astype(np.float32)
  with torch.no_grad():
    video = model.multi_modal_projector(to_torch(x).reshape(B * frames, h * w, DV))
    video = video.reshape(B * frames, h, w, DT).permute(0, 3, 1, 2)
    video = torch.nn.functional.interpolate(video, size=(3, 4), mode='bilinear').permute(0, 2, 3, 1)
    ref = torch.cat((video.reshape(B, frames * 12, DT), model.image_newline[None, None].repeat(B, 1, 1)), dim=1)
  assert_close(_apply(module, params, x, (h, w)), ref)


@pytest.mark.parametrize('cls_name', ['PatchMerger', 'Qwen2_5_VLPatchMerger'])
@pytest.mark.parametrize('dv,dt,m,grid,groups', [(5, 7, 3, (3, 9), 3), (6, 10, 2, (4, 6), 3)])
def test_qwen2_vl_patch_merger_on_temporal_groups(cls_name, dv, dt, m, grid, groups):
  """The merger on a video's grid_t temporal groups: the reference's sequence is the groups one after another,
  each in window order; ours takes that (windowed) or row-major groups, with num_frames = grid_t."""
  if cls_name == 'PatchMerger':
    from transformers.models.qwen2_vl.modeling_qwen2_vl import PatchMerger as Merger
  else:
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLPatchMerger as Merger
  hf = randomize_(Merger(dim=dt, context_dim=dv, spatial_merge_size=m))
  module, params = convert.from_transformers(hf)
  module = module.clone(num_frames=groups)
  n = groups * grid[0] * grid[1]
  x_row = seeded(8).normal(size=(B, n, dv)).astype(np.float32)
  x_win = _qwen_window_order(x_row, groups, grid, m)
  _check_port(module, params, x_win, grid)
  with torch.no_grad():
    ref = hf(to_torch(x_win.reshape(B * n, dv))).reshape(B, n // (m * m), dt)
  assert_close(_apply(module, params, x_win, grid), ref, what='windowed')
  assert_close(_apply(module.clone(input_order='row_major'), params, x_row, grid), ref, what='row_major')


def test_perceiver_on_vit_video_tokens():
  """ViT on [B, F, H, W, 3] -> perceiver with max_frames: the same as the perceiver without a time table on the
  per-frame image tokens with frame_embeddings[f] added to frame f's tokens by hand; without time embeddings the
  perceiver cannot tell the frames' order (reversing them changes nothing), with them it does."""
  vit = _vit()
  frames, hw, d = 3, 9, 6
  video = jnp.asarray(seeded(9).integers(0, 256, size=(B, frames, 9, 9, 3)), jnp.uint8)
  vit_params = nn.unbox(vit.init(jax.random.key(0), video))
  tokens, grid = vit.apply(vit_params, video)                                     # [B, F*h*w, D]
  per_frame = jnp.concatenate([vit.apply(vit_params, video[:, f])[0] for f in range(frames)], axis=1)
  np.testing.assert_allclose(tokens, per_frame, atol=ATOL)

  cfg = dict(name='perceiver', num_latents=4, depth=1, num_heads=2, head_dim=3, max_frames=5)
  timed = projectors.build(cfg, in_dim=d, out_dim=DT)
  untimed = projectors.build(dict(cfg, max_frames=0), in_dim=d, out_dim=DT)
  params = nn.unbox(timed.init(jax.random.key(1), tokens, grid=grid)['params'])
  params['frame_embeddings'] = 0.5 * jax.random.normal(jax.random.key(2), params['frame_embeddings'].shape)
  table = params.pop('frame_embeddings')
  y = timed.apply({'params': dict(params, frame_embeddings=table)}, tokens, grid=grid)
  by_hand = per_frame + jnp.repeat(table[:frames], hw, axis=0)[None]
  assert_close(y, untimed.apply({'params': params}, by_hand, grid=grid), atol=1e-5, what='time embeddings')

  reversed_frames = jnp.concatenate([tokens[:, f * hw:(f + 1) * hw] for f in reversed(range(frames))], axis=1)
  y_plain = untimed.apply({'params': params}, tokens, grid=grid)
  np.testing.assert_allclose(untimed.apply({'params': params}, reversed_frames, grid=grid), y_plain, atol=1e-5)
  y_rev = timed.apply({'params': dict(params, frame_embeddings=table)}, reversed_frames, grid=grid)
  assert float(jnp.abs(y_rev - y).max()) > 1e-3
