"""Perceiver resamplers vs transformers: Idefics2PerceiverResampler, Idefics2Connector (GQA, context mask) and
Idefics v1's IdeficsPerceiverResampler (Flamingo-style, with and without qk layer norms)."""

import jax
import numpy as np
import pytest

from parity_utils import assert_close, randomize_, seeded, to_torch

from mmproj import convert, projectors

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')


def _perceiver_config(hidden, latents=5, depth=2, heads=4, kv_heads=2, head_dim=6, eps=1e-6):
  from transformers.models.idefics2.configuration_idefics2 import Idefics2PerceiverConfig
  cfg = Idefics2PerceiverConfig(hidden_size=hidden, resampler_n_latents=latents, resampler_depth=depth,
                                resampler_n_heads=heads, num_key_value_heads=kv_heads, resampler_head_dim=head_dim,
                                rms_norm_eps=eps, hidden_act='silu')
  cfg._attn_implementation = 'eager'
  return cfg


def _mask(rng, b, n):
  """[B, N] int mask with a few padded (0) tokens per row, never all of them."""
  mask = (rng.random((b, n)) > 0.3).astype(np.int64)
  mask[:, 0] = 1
  return mask


@pytest.mark.parametrize('heads,kv_heads,depth', [(4, 2, 2), (3, 1, 1), (2, 2, 3)])
def test_idefics2_perceiver_resampler_parity(heads, kv_heads, depth):
  from transformers.models.idefics2.modeling_idefics2 import Idefics2PerceiverResampler
  rng = seeded(0)
  hf = randomize_(Idefics2PerceiverResampler(_perceiver_config(22, latents=5, depth=depth, heads=heads,
                                                               kv_heads=kv_heads, head_dim=6)))
  x = rng.normal(size=(2, 15, 22)).astype(np.float32)   # odd grid 3x5, odd width
  mask = _mask(rng, 2, 15)
  module, params = convert.from_transformers(hf)
  y = module.apply({'params': params}, x, grid=(3, 5), mask=mask)
  with torch.no_grad():
    ref = hf(context=to_torch(x), attention_mask=to_torch(mask))
  assert y.shape == (2, 5, 22)
  assert_close(y, ref)
  # The mask matters: dropping it changes the output (so the parity above exercises it).
  y_unmasked = module.apply({'params': params}, x, grid=(3, 5))
  assert float(np.max(np.abs(np.asarray(y_unmasked) - np.asarray(y)))) > 1e-3


def test_idefics2_connector_parity():
  from transformers import Idefics2Config
  from transformers.models.idefics2.modeling_idefics2 import Idefics2Connector
  rng = seeded(1)
  cfg = Idefics2Config(
      vision_config=dict(hidden_size=20, num_attention_heads=2, intermediate_size=40),
      text_config=dict(model_type='mistral', hidden_size=26, intermediate_size=54, num_attention_heads=2, head_dim=8,
                       num_key_value_heads=1, hidden_act='silu', rms_norm_eps=1e-5),
      perceiver_config=dict(hidden_size=26, resampler_n_latents=7, resampler_depth=2, resampler_n_heads=4,
                            num_key_value_heads=2, resampler_head_dim=5, rms_norm_eps=1e-5, hidden_act='silu'))
  cfg.perceiver_config._attn_implementation = 'eager'
  hf = randomize_(Idefics2Connector(cfg), std=0.3)
  x = rng.normal(size=(3, 9, 20)).astype(np.float32)   # grid 3x3
  mask = _mask(rng, 3, 9)
  module, params = convert.from_transformers(hf)
  assert module.proj == 'swiglu' and module.proj_hidden == 54 and module.norm_eps == 1e-5
  y = module.apply({'params': params}, x, grid=(3, 3), mask=mask)
  with torch.no_grad():
    ref = hf(to_torch(x), attention_mask=to_torch(mask))
  assert y.shape == (3, 7, 26)
  assert_close(y, ref)


def _idefics_v1_resampler(embed_dim, depth, heads, head_dim, latents, qk_norms):
  from transformers import IdeficsConfig
  from transformers.models.idefics.perceiver import IdeficsPerceiverResampler
  cfg = IdeficsConfig(vision_config=dict(embed_dim=embed_dim, num_attention_heads=2, image_size=8, patch_size=4),
                      perceiver_config=dict(use_resampler=True, qk_layer_norms_perceiver=qk_norms))
  return randomize_(IdeficsPerceiverResampler(cfg, embed_dim, depth, heads, head_dim, latents), std=0.3)


@pytest.mark.parametrize('qk_norms', [False, True])
def test_idefics_v1_perceiver_resampler_parity(qk_norms):
  rng = seeded(2)
  hf = _idefics_v1_resampler(embed_dim=18, depth=2, heads=3, head_dim=7, latents=4, qk_norms=qk_norms)
  x = rng.normal(size=(2, 7, 18)).astype(np.float32)   # odd token count: grid (1, 7)
  module, params = convert.from_transformers(hf)
  assert module.variant == 'flamingo' and module.act == 'relu' and module.qk_norm == qk_norms
  y = module.apply({'params': params}, x, grid=(1, 7))
  with torch.no_grad():
    ref = hf(to_torch(x))
  assert y.shape == (2, 4, 18)
  assert_close(y, ref)


def test_converted_param_count_matches_formula():
  from transformers.models.idefics2.modeling_idefics2 import Idefics2PerceiverResampler
  hf = Idefics2PerceiverResampler(_perceiver_config(16, latents=3, depth=1, heads=4, kv_heads=1, head_dim=4))
  module, params = convert.from_transformers(hf)
  n = sum(int(np.size(a)) for a in jax.tree.leaves(params))
  assert n == sum(p.numel() for p in hf.parameters())
  cfg = {f: getattr(module, f) for f in ('variant', 'num_latents', 'depth', 'num_heads', 'num_kv_heads',
                                         'head_dim', 'ff_mult', 'proj')}
  assert projectors.param_count(dict(cfg, name='perceiver'), 16, 16) == n
