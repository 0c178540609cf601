"""LLaVA-1.5 recipe end to end at tiny scale: HF CLIP + Llama directories and a LLaVA-format fixture (JSON + PNGs)
-> configs/llava15_stage1.py (projector only) -> configs/llava15_stage2.py (projector + LM, from stage 1) ->
mmproj.load + mmproj.generate on the stage-2 workdir."""
from __future__ import annotations

import os

import jax
import numpy as np
import pytest
from parity_utils import randomize_, seeded

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

import llava_fixture  # noqa: E402
import mmproj  # noqa: E402
from experiment_utils import llava_config, load_config  # noqa: E402
from mmproj.convert import vision  # noqa: E402
from mmproj.convert.llama import load_lm  # noqa: E402
from mmproj.train import pretrained, trainer  # noqa: E402


@pytest.fixture(scope='module')
def parts(tmp_path_factory):
  """Tiny HF directories (CLIPVisionModel, LlamaForCausalLM), the fixture's tokenizer and data."""
  root = tmp_path_factory.mktemp('llava15')
  tok = llava_fixture.make_tokenizer(root / 'tokenizer')
  seeded(0)
  clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
      image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2))
  randomize_(clip, seed=1, std=0.1).save_pretrained(root / 'clip')
  lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=llava_fixture.vocab_size(tok) - 6, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256))
  randomize_(lm, seed=2, std=0.1).save_pretrained(root / 'llama')
  json_path, image_dir = llava_fixture.make_llava_json(root / 'data', n=12)
  return dict(vision=str(root / 'clip'), lm=str(root / 'llama'), tokenizer=tok, json=json_path, images=image_dir,
              data_dir=str(root / 'tfds'), root=root)


def _config(path, parts, **extra):
  return llava_config(path, parts['vision'], parts['lm'], parts['tokenizer'], json=parts['json'],
                      images=parts['images'], data_dir=parts['data_dir'], text_len=96, dtype='float32', steps=2,
                      batch=4, save_every=2, log_every=1, **extra)


def _flat(tree):
  return {'/'.join(str(getattr(k, 'key', k)) for k in p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]}


def _assert_same(a, b):
  fa, fb = _flat(a), _flat(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def _bf16(tree):
  return jax.tree.map(lambda x: np.asarray(x).astype(jax.numpy.bfloat16), tree)


def _changed(a, b):
  fa, fb = _flat(a), _flat(b)
  return {k for k in fa if not np.array_equal(fa[k], fb[k])}


def test_stage1_then_stage2(parts, tmp_path):
  cfg1 = _config('configs/llava15_stage1.py', parts)
  # The model's sizes describe the HF directories; the vocabulary grows to cover the tokenizer (as LLaVA's
  # <image> and <pad> extend Vicuna's), rounded up to a multiple of 64; the images follow the tower's size.
  assert cfg1.model.encoder.width == 32 and cfg1.model.encoder.output_layer == -2
  assert cfg1.model.lm.width == 48 and cfg1.model.lm.vocab_size == 256
  assert cfg1.model.image_token_id == llava_fixture.IMAGE_TOKEN_ID
  assert cfg1.data.image_size == 32
  s1 = tmp_path / 'stage1'
  r1 = trainer.train(cfg1, str(s1))
  p1 = r1.state.params

  # Stage 1: the CLIP tower and the LM are exactly the released weights, stored in bf16 (frozen_dtype); only the
  # projector trained, in f32.
  assert dict(cfg1.model.param_dtype) == {'encoder': 'bfloat16', 'projector': 'float32', 'lm': 'bfloat16'}
  _, clip_params = vision.load_vision_tower(parts['vision'], output_layer=-2)
  _assert_same(p1['encoder'], _bf16(clip_params))
  _, lm_params = load_lm(parts['lm'])
  lm_loaded = pretrained.load(cfg1)['lm']
  _assert_same({k: v for k, v in p1['lm'].items() if k not in ('embed_tokens', 'lm_head')},
               _bf16({k: v for k, v in lm_params.items() if k not in ('embed_tokens', 'lm_head')}))
  v0 = lm_params['embed_tokens']['embedding'].shape[0]
  assert v0 == 250
  for name, table, axis in (('embed_tokens', 'embedding', 0), ('lm_head', 'kernel', 1)):
    ours, theirs = np.asarray(p1['lm'][name][table]), lm_params[name][table]
    np.testing.assert_array_equal(np.take(ours, np.arange(v0), axis), _bf16(theirs))  # the checkpoint's rows
    new_rows = np.take(ours, np.arange(v0, 256), axis).astype(np.float32)             # rows added: their mean
    np.testing.assert_allclose(new_rows, np.broadcast_to(theirs.mean(axis, keepdims=True), new_rows.shape),
                               rtol=2 ** -8)
  _assert_same(p1['lm'], _bf16(lm_loaded))
  assert {x.dtype for x in jax.tree.leaves(p1['projector'])} == {np.dtype('float32')}
  fresh = trainer.init_state(trainer.setup(cfg1), 0).params
  assert _changed(fresh['projector'], p1['projector']) == set(_flat(p1['projector']))

  # Stage 2 starts from stage 1's projector and trains projector + LM; the tower stays frozen.
  cfg2 = _config('configs/llava15_stage2.py', parts, projector=str(s1))
  assert cfg2.data.template == 'vicuna_v1'
  _assert_same(pretrained.load(cfg2)['projector'], p1['projector'])
  s2 = tmp_path / 'stage2'
  p2 = trainer.train(cfg2, str(s2)).state.params
  _assert_same(p2['encoder'], _bf16(clip_params))
  assert {x.dtype for x in jax.tree.leaves(p2['lm'])} == {np.dtype('float32')}        # trained: stored in f32
  assert _changed(p1['projector'], p2['projector']) and _changed(p1['lm'], p2['lm'])
  losses = [line for line in (s2 / 'metrics.jsonl').read_text().splitlines()]
  assert len(losses) == 2 and all('"loss"' in line for line in losses)

  # The stage-2 run loads as a bundle and answers in the chat template it trained with.
  bundle = mmproj.load(str(s2))
  assert bundle.prompt_format == 'hf' and bundle.stop_ids == (llava_fixture.EOS_ID,)
  images = [np.full((40, 60, 3), 200, np.uint8), np.zeros((32, 32, 3), np.uint8)]
  prompts = ['USER: <image>\nWhat color is the circle? ASSISTANT:', 'USER: <image>\nHow many shapes are there? '
             'ASSISTANT:']
  texts, ids = mmproj.generate(bundle, images, prompts, max_new_tokens=5, return_ids=True)
  assert len(texts) == 2 and all(isinstance(t, str) for t in texts)

  # Exported to an HF directory, the trained model loads in transformers with every key used, gives the same
  # logits, and greedy-generates the same ids.
  from mmproj import inference
  out = inference.export_hf(bundle, str(tmp_path / 'hf'))
  hf, info = transformers.LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
  assert not any(info[k] for k in ('missing_keys', 'unexpected_keys', 'mismatched_keys')), info
  rows = [inference.encode_prompt(bundle, p) for p in prompts]
  length = max(len(r) for r in rows)
  tokens = np.zeros((2, length), np.int32)
  mask = np.zeros((2, length), np.int32)
  for b, r in enumerate(rows):
    tokens[b, length - len(r):], mask[b, length - len(r):] = r, 1
  positions = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)
  image = inference.prepare_images(bundle, images)                                 # uint8 [2, 32, 32, 3]
  ours = bundle.model.apply({'params': bundle.params}, {'image': image, 'tokens': tokens, 'positions': positions,
                                                        'input_mask': mask})
  reloaded = mmproj.load(out)
  pixels = reloaded.image_processor(list(image)).transpose(0, 3, 1, 2)          # HF normalises outside
  with torch.no_grad():
    theirs = hf(input_ids=torch.from_numpy(tokens.astype(np.int64)), attention_mask=torch.from_numpy(mask.astype(np.int64)),
                position_ids=torch.from_numpy(positions.astype(np.int64)), pixel_values=torch.from_numpy(pixels)).logits
  np.testing.assert_allclose(np.asarray(ours) * mask[..., None], theirs.numpy() * mask[..., None], atol=1e-4)
  np.testing.assert_array_equal(mmproj.generate(reloaded, [np.asarray(i) for i in image], prompts,
                                                max_new_tokens=5, return_ids=True)[1], ids)


def test_init_errors_name_the_field(parts, tmp_path):
  cfg = _config('configs/llava15_stage1.py', parts)
  cfg.model.lm.width = 64
  with pytest.raises(ValueError, match=r'model\.lm\.width=64 but init\.lm .* gives 48'):
    pretrained.check(cfg)
  cfg = _config('configs/llava15_stage1.py', parts)
  cfg.init.encoder = str(tmp_path / 'nowhere')
  with pytest.raises(FileNotFoundError, match='init.encoder'):
    pretrained.check(cfg)
  with pytest.raises(ValueError, match="bad argument 'colour=red'"):
    load_config('configs/llava15_stage1.py', 'colour=red')
  cfg = _config('configs/llava15_stage2.py', parts, projector=str(tmp_path))
  with pytest.raises(FileNotFoundError, match='not an mmproj workdir'):
    pretrained.check(cfg)
  os.makedirs(tmp_path / 'empty', exist_ok=True)
