"""model.kernels (mmproj/layers/kernels.py): every implementation a config can select computes the reference
attention and dense layers, outputs and gradients, and 'auto' picks plain XLA except cuDNN attention on a GPU."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import make_tiny_model_cfg
from mmproj import model as model_lib
from mmproj.layers import causal_padding_mask, causal_query_blocks, dot_product_attention, kernels


def reference_attention(q, k, v, mask):
  """Grouped-query softmax attention written out: query head h reads kv head h // G; fully masked rows -> 0."""
  g = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)                  # [B, S, H, Dh]
  logits = jnp.einsum('bthd,bshd->bhts', q, k) / np.sqrt(q.shape[-1])
  logits = jnp.where(mask[:, None], logits, -1e30)
  probs = jax.nn.softmax(logits, axis=-1) * jnp.any(mask, -1)[:, None, :, None]
  return jnp.einsum('bhts,bshd->bthd', probs, v)


def attention_case(t: int = 360):
  """GQA (4 query heads on 2 kv heads) under a causal mask with left padding (row 1: 17 padded keys, so its first
  17 queries see nothing), a sliding window of 200 and shared-prefix segments."""
  b, h, hkv, dh = 2, 4, 2, 8
  kq, kk, kv, kw = jax.random.split(jax.random.key(0), 4)
  q, k, v = (jax.random.normal(key, (b, t, n, dh)) for key, n in ((kq, h), (kk, hkv), (kv, hkv)))
  w = jax.random.normal(kw, (b, t, h, dh))
  slots = jnp.arange(t)
  mask = causal_padding_mask(slots, slots, jnp.ones((b, t), jnp.int32).at[1, :17].set(0))
  mask &= (slots[None, :] > slots[:, None] - 200)[None]
  segments = jnp.where(slots < 40, 0, 1 + (slots - 40) // 100)[None]
  mask &= (segments[:, None, :] == 0) | (segments[:, None, :] == segments[:, :, None])
  return q, k, v, w, mask


@pytest.mark.parametrize('kernel', ['xla', 'query_blocks', 'cudnn'])   # 'cudnn' with f32 inputs: its 'xla' path
@pytest.mark.parametrize('causal', [True, False])
def test_attention_kernels_equal_the_reference(kernel, causal):
  assert causal_query_blocks(360) == [(0, 180), (180, 360)]               # 'query_blocks' runs 2 blocks here
  q, k, v, w, mask = attention_case()

  def loss(q, k, v, attend):
    return jnp.sum(attend(q, k, v) * w)

  with kernels.use(kernels.Kernels(attention=kernel)):
    got = jax.value_and_grad(loss, argnums=(0, 1, 2))(
        q, k, v, lambda q, k, v: dot_product_attention(q, k, v, mask, causal=causal))
  ref = jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v, lambda q, k, v: reference_attention(q, k, v, mask))
  np.testing.assert_allclose(got[0], ref[0], rtol=1e-5)
  for a, b in zip(got[1], ref[1]):
    np.testing.assert_allclose(a, b, atol=2e-5)
  with kernels.use(kernels.Kernels(attention=kernel)):
    out = dot_product_attention(q, k, v, mask, causal=causal)
  assert float(jnp.abs(out[1, :17]).max()) == 0.0                        # queries that see no key: zero output
  with pytest.raises(ValueError, match='causal attention needs as many keys as queries'):
    dot_product_attention(q, k[:, :10], v[:, :10], causal=True)


def test_probabilities_come_from_the_einsum_path_under_every_kernel():
  q, k, v, _, mask = attention_case(64)
  for kernel in ('xla', 'query_blocks'):
    with kernels.use(kernels.Kernels(attention=kernel)):
      out, probs = dot_product_attention(q, k, v, mask, return_probs=True)
    np.testing.assert_allclose(out, reference_attention(q, k, v, mask), atol=1e-5)
    np.testing.assert_allclose(probs.sum(-1)[1, :, 17:], 1.0, atol=1e-5)


@pytest.mark.skipif(jax.default_backend() == 'gpu', reason='cuDNN runs here; the GPU check covers it')
def test_cudnn_attention_needs_a_gpu():
  """'cudnn' does not run on a CPU: jax refuses it there (benchmarks/accelerator.sh checks it on a GPU)."""
  q, k, v, _, mask = attention_case(16)
  with kernels.use(kernels.Kernels(attention='cudnn')), pytest.raises(Exception):
    jax.block_until_ready(dot_product_attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16),
                                                v.astype(jnp.bfloat16), mask))


def test_cudnn_takes_only_the_shapes_cudnn_runs():
  """The 'cudnn' kernel hands cuDNN bf16/fp16 calls with a head dim that is a multiple of 8 up to 128 (and even
  lengths under a mask); anything else goes to the 'xla' path instead of failing on the GPU."""
  from mmproj.layers.attention import cudnn_takes
  bf16 = jnp.bfloat16

  def case(t, s, dh, dtype=bf16):
    return jnp.zeros((1, t, 4, dh), dtype), jnp.zeros((1, s, 2, dh), dtype)
  assert cudnn_takes(*case(16, 16, 64), masked=True)
  assert cudnn_takes(*case(15, 17, 128), masked=False)
  assert not cudnn_takes(*case(15, 16, 64), masked=True)           # odd length with a mask (bias)
  assert not cudnn_takes(*case(16, 16, 12), masked=False)          # head dim not a multiple of 8
  assert not cudnn_takes(*case(16, 16, 256), masked=False)         # above 128
  assert not cudnn_takes(*case(16, 16, 64, jnp.float32), masked=False)
  q, k, v, _, mask = attention_case(16)                            # dh 8, f32: runs as 'xla' under 'cudnn'
  with kernels.use(kernels.Kernels(attention='cudnn')):
    np.testing.assert_allclose(dot_product_attention(q, k, v, mask), reference_attention(q, k, v, mask), atol=1e-5)


def _model_loss_and_grads(cfg_model, chosen: kernels.Kernels, batch):
  model = model_lib.MultimodalLM(config=ml_collections.FrozenConfigDict(cfg_model), kernels=chosen)
  params = model.init(jax.random.key(0), batch)['params']

  def loss(params):
    return jnp.mean(model.apply({'params': params}, batch) ** 2)
  return jax.jit(jax.value_and_grad(loss))(params)


def test_model_kernels_give_the_same_loss_and_gradients():
  """The tiny MultimodalLM at L = 16 + 352 (query blocks: 2): the CPU-tuned kernels against plain XLA."""
  cfg = make_tiny_model_cfg()
  cfg.lm.max_len = 512
  length = 16 + 352
  rng = np.random.default_rng(0)
  mask = np.ones((2, length), np.int32)
  mask[1, :5] = 0
  tokens = rng.integers(4, 32, (2, length)).astype(np.int32)
  tokens[:, 5:21] = cfg.image_token_id
  batch = dict(image=rng.integers(0, 256, (2, 16, 16, 3)).astype(np.uint8), tokens=tokens, input_mask=mask,
               positions=np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32))
  ref_loss, ref_grads = _model_loss_and_grads(cfg, kernels.Kernels(), batch)
  loss, grads = _model_loss_and_grads(cfg, kernels.Kernels('cpu_transpose_copy', 'query_blocks'), batch)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), grads, ref_grads)


@pytest.mark.parametrize('platform,dtype,expected', [
    ('cpu', 'float32', kernels.Kernels('xla', 'xla')),
    ('cpu', 'bfloat16', kernels.Kernels('xla', 'xla')),
    ('tpu', 'bfloat16', kernels.Kernels('xla', 'xla')),
    ('gpu', 'float32', kernels.Kernels('xla', 'xla')),
    ('gpu', 'bfloat16', kernels.Kernels('xla', 'cudnn')),
])
def test_auto_is_plain_xla_but_cudnn_attention_on_a_gpu(platform, dtype, expected):
  assert kernels.resolve({'dense': 'auto', 'attention': 'auto'}, platform, dtype) == expected


def test_explicit_choices_win_and_unknown_names_are_errors():
  assert kernels.resolve({'dense': 'cpu_transpose_copy', 'attention': 'query_blocks'}, 'gpu', 'bfloat16') == \
      kernels.Kernels('cpu_transpose_copy', 'query_blocks')
  with pytest.raises(ValueError, match='model.kernels.attention=.flash.'):
    kernels.resolve({'dense': 'auto', 'attention': 'flash'}, 'cpu', 'float32')
  cfg = make_tiny_model_cfg()
  cfg.kernels.dense = 'fast'
  with pytest.raises(ValueError, match='model.kernels.dense'):
    model_lib.build_model(cfg)
  assert model_lib.build_model(make_tiny_model_cfg(), platform='gpu').kernels == kernels.Kernels('xla', 'xla')
