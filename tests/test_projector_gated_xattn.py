"""gated_xattn (Flamingo GATED XATTN-DENSE, and the Llama 3.2 Vision variant): the projector, the media masks,
the gated block, the model wiring (one marker per image, cross-attention in the LM, KV cache), parity of one block
with transformers MllamaCrossAttentionDecoderLayer, and training through mmproj.train."""

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import make_tiny_model_cfg
from parity_utils import assert_close, randomize_, seeded, to_torch
from test_model import LOGICAL_NAMES, reference_greedy

from mmproj import convert, projectors
from mmproj import model as mm
from mmproj.eval.generate import generate_tokens
from mmproj.lm import build_lm
from mmproj.layers.gated_cross_attention import (GatedCrossAttentionBlock, media_attention_mask, media_ids,
                                                 media_index, xattn_layer_ids)
from mmproj.projectors.gated_xattn import GatedXAttnProjector

torch = pytest.importorskip('torch')
pytest.importorskip('transformers')

BOS, EOS, IMAGE = 1, 2, 3


def gx_cfg(**proj):
  cfg = make_tiny_model_cfg()
  cfg.projector = dict(name='gated_xattn', **proj)
  return cfg


def make_batch(cfg, layouts, num_images=1, seed=0):
  """Left-padded rows from layouts such as 'b i w w i w': b = <bos>, i = <image>, w = a random word (id >= 6).
  num_images > 1 -> image [B, num_images, H, W, 3], else [B, H, W, 3]."""
  rng = np.random.default_rng(seed)
  rows = [layout.split() for layout in layouts]
  length = max(len(r) for r in rows)
  tokens = np.zeros((len(rows), length), np.int32)
  mask = np.zeros_like(tokens)
  for r, row in enumerate(rows):
    ids = [{'b': BOS, 'i': IMAGE}.get(c, 0) or int(rng.integers(6, cfg.lm.vocab_size)) for c in row]
    tokens[r, length - len(ids):] = ids
    mask[r, length - len(ids):] = 1
  size = cfg.encoder.image_size
  shape = (len(rows),) + ((num_images,) if num_images > 1 else ()) + (size, size, 3)
  return {'image': rng.integers(0, 256, shape, dtype=np.uint8), 'tokens': tokens, 'input_mask': mask,
          'positions': np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)}


def open_gates(params, seed=0):
  """Sets every tanh gate (0 at init) to a random value with |gate| in [0.5, 1.5], so the media matter."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(nn.unbox(params))
  rng = np.random.default_rng(seed)
  out = []
  for path, leaf in leaves:
    if str(getattr(path[-1], 'key', '')).endswith('_gate'):
      leaf = jnp.asarray(rng.choice([-1, 1], leaf.shape) * rng.uniform(0.5, 1.5, leaf.shape), leaf.dtype)
    out.append(leaf)
  return jax.tree_util.tree_unflatten(treedef, out)


def path_str(path):
  return '/'.join(str(getattr(k, 'key', k)) for k in path)


def loss_fn(model, params, batch):
  logits = model.apply({'params': params}, batch)
  targets = jnp.roll(jnp.asarray(batch['tokens']), -1, axis=1)
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], axis=-1)[..., 0]
  return jnp.sum(nll * batch['input_mask']) / jnp.sum(batch['input_mask'])


# ----------------------------------------------------------------------------------------------- the projector


@pytest.mark.parametrize('resampler', ['linear', dict(name='mlp', depth=2)])
def test_projector_shapes_gradients_and_param_count(resampler):
  cfg = ml_collections.ConfigDict(dict(name='gated_xattn', resampler=resampler))
  grid, dv, dt = (3, 5), 12, 20
  proj = projectors.build(cfg, in_dim=dv, out_dim=dt)
  x = np.random.default_rng(0).normal(size=(2, grid[0] * grid[1], dv)).astype(np.float32)   # [B, N, Dv]
  params = nn.unbox(jax.jit(lambda k: proj.init(k, x, grid=grid))(jax.random.key(1))['params'])
  y = jax.jit(lambda p: proj.apply({'params': p}, x, grid=grid))(params)
  assert y.shape == (2, projectors.num_output_tokens(cfg, grid), dt) == (2, 15, dt)
  assert sum(p.size for p in jax.tree.leaves(params)) == projectors.param_count(cfg, dv, dt)
  assert set(params) == {'resampler'}
  gp, gx = jax.jit(jax.grad(lambda p, x: jnp.sum(proj.apply({'params': p}, x, grid=grid) ** 2),
                           argnums=(0, 1)))(params, x)
  assert all(np.all(np.isfinite(g)) and np.any(g != 0) for g in jax.tree.leaves(gp) + [gx])
  assert GatedXAttnProjector.injects_into_lm and not hasattr(projectors.get('mlp'), 'injects_into_lm')


@pytest.mark.parametrize('update, field', [
    (dict(every=0), 'model.projector.every'),
    (dict(every=3), 'model.projector.every'),              # > lm.depth = 2: no gated block at all
    (dict(heads=0), 'model.projector.heads'),
    (dict(heads=3), 'model.projector.heads'),              # does not divide the LM width 32
    (dict(heads=4, kv_heads=3), 'model.projector.kv_heads'),
    (dict(ff_mult=0), 'model.projector.ff_mult'),
    (dict(head_dim=0), 'model.projector.head_dim'),
    (dict(media_mask='first'), 'model.projector.media_mask'),
    (dict(variant='idefics'), 'model.projector.variant'),
    (dict(empty_rows='nan'), 'model.projector.empty_rows'),
    (dict(act='swish'), 'model.projector.act'),
    (dict(resampler='nope'), 'model.projector.resampler'),
    (dict(resampler='gated_xattn'), 'model.projector.resampler'),
    (dict(resampler=dict(name='mlp', depth=0)), 'model.projector.resampler'),
    (dict(bogus=1), 'model.projector.bogus'),
])
def test_bad_config_names_the_field(update, field):
  mm.validate(gx_cfg())
  with pytest.raises(ValueError, match=field.replace('.', r'\.')):
    mm.build_model(gx_cfg(**update))


# ----------------------------------------------------------------------------------------------- media masks


def test_media_index_and_masks():
  tokens = jnp.array([[1, 3, 5, 3, 5, 5], [0, 3, 1, 3, 5, 3]])
  mask = jnp.array([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])                    # row 1: a marker on padding
  index = media_index(tokens, IMAGE, mask)
  np.testing.assert_array_equal(index, [[0, 1, 1, 2, 2, 2], [0, 0, 0, 1, 1, 2]])
  ids = media_ids(2, 2)                                                          # 2 images x 2 media tokens
  np.testing.assert_array_equal(ids, [1, 1, 2, 2])
  none, first, second, both = [0, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1]
  np.testing.assert_array_equal(media_attention_mask(index, ids, 'latest'),
                                [[none, first, first, second, second, second],
                                 [none, none, none, first, first, second]])
  np.testing.assert_array_equal(media_attention_mask(index, ids, 'all'),
                                [[none, first, first, both, both, both],
                                 [none, none, none, first, first, both]])
  # Per-row ids: slot id 0 (a padding image) is never visible, whatever the mode.
  row_ids = jnp.array([[1, 1, 2, 2], [1, 1, 0, 0]])
  np.testing.assert_array_equal(media_attention_mask(index, row_ids, 'all')[1, -1], first)
  assert xattn_layer_ids(6, 1) == list(range(6)) and xattn_layer_ids(6, 2) == [1, 3, 5]
  assert xattn_layer_ids(7, 4) == [3]
  with pytest.raises(ValueError, match='media_mask'):
    media_attention_mask(index, ids, 'first')


@pytest.mark.parametrize('variant', ['flamingo', 'mllama'])
def test_block_masks_empty_rows_and_gradients(variant):
  """Block level: a token before any image gets a zero cross-attention update (no NaN, also in the gradients);
  'latest' hides earlier images, 'all' does not; Mllama's 'unmasked' empty rows attend to every media token."""
  d, per_img = 16, 3
  block = GatedCrossAttentionBlock(width=d, num_heads=4, num_kv_heads=2 if variant == 'mllama' else 4, head_dim=4,
                                   mlp_dim=24, variant=variant)
  tokens = jnp.array([[5, 5, 3, 5, 3, 5, 5], [5, 3, 5, 5, 5, 3, 5]])
  index = media_index(tokens, IMAGE)                                             # [B, T]
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 7, d)).astype(np.float32)                             # [B, T, D]
  media = rng.normal(size=(2, 2 * per_img, d)).astype(np.float32)               # [B, S, D], 2 images
  image1 = np.zeros_like(media)
  image1[:, :per_img] = 1.0                                                     # perturbation of image 1 only
  ids = media_ids(2, per_img)
  init = nn.unbox(jax.jit(lambda k: block.init(k, x, media=media, mask=media_attention_mask(index, ids)))(
      jax.random.key(2))['params'])

  @functools.partial(jax.jit, static_argnums=0)
  def outputs(block, p):
    """Per media mode: the block's output on media and on media with image 1 changed; grads ('all' mode)."""
    out = {}
    for mode in ('latest', 'all'):
      mask = media_attention_mask(index, ids, mode)

      def run(p, x, m):
        return block.apply({'params': p}, x, media=m, mask=mask)                # [B, T, D]
      out[mode] = (run(p, x, media), run(p, x, media + image1))
    out['grads'] = jax.grad(lambda p, x, m: jnp.sum(run(p, x, m) ** 2), argnums=(0, 1, 2))(p, x, media)
    return out

  np.testing.assert_array_equal(outputs(block, init)['latest'][0], x)          # gates 0: the identity
  res = outputs(block, open_gates(init))
  empty = np.asarray(index == 0)                                                # [B, T]: before any image
  after2 = np.asarray(index == 2)
  for mode in ('latest', 'all'):
    y, y1 = res[mode]
    assert np.all(np.isfinite(y))
    np.testing.assert_array_equal(y[empty], y1[empty])                           # empty rows ignore media
    if mode == 'latest':
      np.testing.assert_array_equal(y[after2], y1[after2])                       # image 1 hidden after image 2
    else:
      assert np.all(np.abs(y[after2] - y1[after2]).max(-1) > 1e-4)
    if variant == 'mllama':                                                      # FFW masked too: identity
      np.testing.assert_array_equal(y[empty], x[empty])
  grads = res['grads']
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  assert np.all(np.asarray(grads[0]['attn_gate']) != 0) and np.all(np.asarray(grads[0]['mlp_gate']) != 0)
  if variant == 'mllama':                                                        # transformers' behaviour
    y, y1 = outputs(block.clone(empty_rows='unmasked'), open_gates(init))['all']
    assert np.all(np.abs(y[empty] - y1[empty]).max(-1) > 1e-4)
    np.testing.assert_array_equal(y[~empty], res['all'][0][~empty])


# ----------------------------------------------------------------------------------------------- parity


def _hf_layer(width, heads, kv_heads, ff, seed):
  from transformers.models.mllama.configuration_mllama import MllamaTextConfig
  from transformers.models.mllama.modeling_mllama import MllamaCrossAttentionDecoderLayer
  cfg = MllamaTextConfig(hidden_size=width, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         intermediate_size=ff, num_hidden_layers=2, cross_attention_layers=[1], rms_norm_eps=1e-5,
                         vocab_size=32)
  cfg._attn_implementation = 'eager'
  return randomize_(MllamaCrossAttentionDecoderLayer(cfg, layer_idx=1), seed=seed)   # gates random too


@pytest.mark.parametrize('width, heads, kv_heads, ff, text_len, tiles, tokens_per_tile', [
    (24, 4, 2, 40, 7, 2, 3),      # GQA, odd text length
    (20, 2, 2, 33, 5, 1, 5),      # MHA, odd widths
    (24, 6, 1, 16, 6, 3, 1),      # MQA
])
def test_mllama_cross_attention_layer_parity(width, heads, kv_heads, ff, text_len, tiles, tokens_per_tile):
  from transformers.models.mllama.modeling_mllama import _prepare_cross_attention_mask
  rng = seeded(0)
  hf = _hf_layer(width, heads, kv_heads, ff, seed=1)
  b, n_img = 2, 2
  s = n_img * tiles * tokens_per_tile
  x = rng.normal(size=(b, text_len, width)).astype(np.float32)                   # HF hidden_states
  media = rng.normal(size=(b, s, width)).astype(np.float32)                      # HF cross_attention_states
  # [B, T, n_images, n_tiles], 1 = attend: token 0 of each row sees nothing (a full-row mask), later tokens see
  # image 1, then image 2 (with its last tile masked out in row 1), one row also sees both.
  hf_mask = np.zeros((b, text_len, n_img, tiles), np.int64)
  hf_mask[:, 1:3, 0] = 1
  hf_mask[:, 3:, 1] = 1
  hf_mask[1, 3:, 1, -1] = 0 if tiles > 1 else 1
  hf_mask[0, -1, :] = 1
  mask = np.repeat(hf_mask, tokens_per_tile, axis=3).reshape(b, text_len, s).astype(bool)   # ours [B, T, S]
  attn_mask, row_mask = _prepare_cross_attention_mask(to_torch(hf_mask), tokens_per_tile, torch.float32)
  with torch.no_grad():
    ref = hf(to_torch(x), cross_attention_states=to_torch(media), cross_attention_mask=attn_mask,
             attention_mask=None, full_text_row_masked_out_mask=row_mask)
  ref = ref[0] if isinstance(ref, tuple) else ref
  block, params = convert.from_transformers(hf)
  assert block.num_kv_heads == kv_heads and block.empty_rows == 'unmasked'
  y = jax.jit(lambda p: block.apply({'params': p}, x, grid=(1, s), media=media, mask=mask))(params)
  assert_close(y, ref)
  # The default (Meta's reference, Flamingo) zeroes the attention on the full-row-masked token 0 instead.
  zero = block.clone(empty_rows='zero')
  y0 = jax.jit(lambda p: zero.apply({'params': p}, x, grid=(1, s), media=media, mask=mask))(params)
  assert_close(y0[:, 1:], ref[:, 1:])
  np.testing.assert_allclose(y0[:, 0], x[:, 0], atol=1e-6)     # both gated updates are zero on that row


def test_mllama_converter_rejects_other_activations():
  hf = _hf_layer(16, 2, 2, 24, seed=0)
  hf.mlp.act_fn = torch.nn.GELU()
  with pytest.raises(ValueError, match='hidden_act'):
    convert.from_transformers(hf)


# ----------------------------------------------------------------------------------------------- the model


@pytest.fixture(scope='module')
def gx():
  """A gated_xattn model (flamingo, media_mask='all') on left-padded rows holding 2 images each (one marker per
  image): (cfg, model, boxed params, params, batch, jitted forward), shared by the read-only tests."""
  cfg = gx_cfg(media_mask='all')
  cfg.encoder.depth = 1
  model = mm.build_model(cfg)
  batch = make_batch(cfg, ['b w i w w i w w', 'b i w w w w i w', 'b w w i w i'], num_images=2)
  boxed = jax.jit(model.init)(jax.random.key(0), batch)['params']
  fwd = jax.jit(lambda p, b: model.apply({'params': p}, b))
  return cfg, model, boxed, nn.unbox(boxed), batch, fwd


def test_model_at_init_is_exactly_the_text_only_lm(gx):
  cfg, model, boxed, params, batch, fwd = gx
  assert mm.num_image_tokens(cfg) == 1 and mm.injects_into_lm(cfg)
  for path, leaf in jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)):
    assert isinstance(leaf, nn.Partitioned) and len(leaf.names) == leaf.value.ndim, path_str(path)
    assert set(leaf.names) <= LOGICAL_NAMES and len(set(leaf.names)) == len(leaf.names), path_str(path)
  assert set(params) == {'encoder', 'projector', 'lm'}
  assert {k for k in params['lm'] if k.startswith('xattn')} == {'xattn_layers_0', 'xattn_layers_1'}
  logits = fwd(params, batch)

  text_lm = build_lm(cfg.lm)                                      # the same LM, no cross-attention
  lm_params = {k: v for k, v in params['lm'].items() if not k.startswith('xattn')}

  def text_only(p, b):
    x = text_lm.apply({'params': p}, jnp.asarray(b['tokens']), method='embed')
    return text_lm.apply({'params': p}, x, jnp.asarray(b['positions']), jnp.asarray(b['input_mask']))[0]
  np.testing.assert_array_equal(logits, jax.jit(text_only)(lm_params, batch))
  # ... and once the gates open, the images matter.
  assert np.abs(np.asarray(fwd(open_gates(params), batch)) - np.asarray(logits)).max() > 1e-3


def test_gradients_reach_the_gates_then_everything(gx):
  _, model, _, params, batch, _ = gx
  grad = jax.jit(jax.grad(lambda p: loss_fn(model, p, batch)))
  at_init = grad(params)
  opened = grad(open_gates(params))
  for (path, g0), g1 in zip(jax.tree_util.tree_leaves_with_path(at_init), jax.tree.leaves(opened)):
    name = path_str(path)
    assert np.all(np.isfinite(g0)) and np.all(np.isfinite(g1)), name
    if name.endswith('_gate'):
      assert np.all(np.asarray(g0) != 0), f'zero gradient at init for {name}'   # the gates learn first
    assert np.any(np.asarray(g1) != 0), f'zero gradient for {name} with open gates'
  # At init (gates 0) nothing reaches the media side: projector and encoder get exactly zero gradient.
  assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(at_init['projector']))


@pytest.mark.parametrize('proj, lm_depth', [
    (dict(), 2),
    (dict(variant='mllama', every=2, heads=2, kv_heads=1, head_dim=6, ff_dim=40), 3),
    (dict(every=3, ff_mult=2, resampler=dict(name='mlp', depth=2)), 3),
])
def test_param_count(proj, lm_depth):
  cfg = gx_cfg(**proj)
  cfg.lm.depth = lm_depth
  model = mm.build_model(cfg)
  batch = make_batch(cfg, ['b i w w'])
  params = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), batch)['params'])

  def count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
  blocks = {k: v for k, v in params['lm'].items() if k.startswith('xattn_layers_')}
  every = cfg.projector.get('every', 1)
  assert sorted(blocks) == [f'xattn_layers_{i}' for i in xattn_layer_ids(lm_depth, every)]
  width, dv = cfg.lm.width, cfg.encoder.width
  assert count(params['projector']) == projectors.param_count(cfg.projector, dv, width)
  proj = projectors.build(cfg.projector, in_dim=dv, out_dim=width)
  for block in blocks.values():
    assert count(block) == proj.block_param_count()
  assert count(blocks) == proj.injected_param_count(lm_depth)
  assert mm.projector_param_count(cfg) == count(params['projector']) + count(blocks)


def test_marker_keeps_its_text_embedding_and_later_images_stay_unseen(gx):
  _, model, _, params, batch, fwd = gx
  params = open_gates(params)
  embeds = model.apply({'params': params}, batch, method='embed_inputs')
  text = model.apply({'params': params}, jnp.asarray(batch['tokens']), method=lambda m, t: m.lm.embed(t))
  np.testing.assert_array_equal(embeds, text)                     # nothing is merged into the sequence
  changed = dict(batch, image=batch['image'].copy())
  changed['image'][:, 1] = 255 - changed['image'][:, 1]            # image 2 of every row
  a, b = np.asarray(fwd(params, batch)), np.asarray(fwd(params, changed))
  second = np.asarray(media_index(jnp.asarray(batch['tokens']), IMAGE, batch['input_mask'])) == 2
  np.testing.assert_array_equal(a[~second], b[~second])           # tokens before image 2's marker ignore it
  assert np.all(np.abs(a[second] - b[second]).max(-1) > 1e-4)


def test_merging_projector_rejects_several_images_and_keeps_its_cache_format():
  cfg = make_tiny_model_cfg()
  model = mm.build_model(cfg)
  batch = make_batch(gx_cfg(), ['b i w'], num_images=2)
  with pytest.raises(ValueError, match='several images per row'):
    jax.eval_shape(model.init, jax.random.key(0), batch)
  m = mm.num_image_tokens(cfg)
  batch = make_batch(cfg, ['b ' + 'i ' * m + 'w w'])
  params = jax.eval_shape(model.init, jax.random.key(0), batch)['params']
  _, cache = jax.eval_shape(lambda p: model.apply({'params': p}, batch, 24, method='prefill'), params)
  assert set(cache) == {'k', 'v', 'mask', 'index'}


# ----------------------------------------------------------------------------------------------- generation


def test_kv_cache_generation_matches_full_forward(gx):
  """Greedy generation through prefill + decode_step (media k/v and media_index cached) equals re-running the
  full forward on prompt + generated tokens, for rows with two images each."""
  cfg, model, _, params, batch, fwd = gx
  params = open_gates(params, seed=1)
  cache_len = batch['tokens'].shape[1] + 5
  last, cache = jax.jit(lambda p, b: model.apply({'params': p}, b, cache_len, method='prefill'))(params, batch)
  np.testing.assert_allclose(last, fwd(params, batch)[:, -1], rtol=1e-4, atol=1e-5)
  s = 2 * projectors.num_output_tokens(cfg.projector, mm.encoder_grid(cfg))
  assert cache['xattn_k'].shape == (2, 3, s, 4, 8) and cache['media_ids'].shape == (3, s)
  np.testing.assert_array_equal(cache['media_index'], [2, 2, 2])
  got = generate_tokens(model, params, batch, max_new_tokens=6, eos_id=EOS)
  want = reference_greedy(fwd, params, batch, 6, EOS)
  assert len(np.unique(np.asarray(got))) > 2
  np.testing.assert_array_equal(got, want)


# ----------------------------------------------------------------------------------------------- training


def test_training_loss_falls_and_gates_open(shapes_data_dir, tmp_path):
  from experiment_utils import tiny_experiment
  from mmproj.train import trainer
  cfg = tiny_experiment(shapes_data_dir)
  cfg.model.projector = ml_collections.ConfigDict(dict(name='gated_xattn', heads=4, ff_mult=2))
  cfg.train.update(steps=20, warmup_steps=3, learning_rate=3e-3)
  cfg.checkpoint.every = 20
  cfg.log_every = 2
  result = trainer.train(cfg, str(tmp_path))
  assert result.setup.num_image_tokens == 1 and result.setup.seq_len == 1 + cfg.data.text_len
  losses = [json.loads(line)['loss'] for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()
            if 'loss' in json.loads(line)]
  assert len(losses) == 10 and all(np.isfinite(losses))
  assert np.mean(losses[-2:]) < 0.8 * np.mean(losses[:2]), losses
  gates = [np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(result.state.params['lm'])
           if path_str(k).endswith('_gate')]
  assert gates and all(np.all(g != 0) for g in gates)               # they opened
