"""mmproj.load on an HF LLaVA directory + mmproj.generate: the same greedy token ids as transformers' generate on
a tiny random LlavaForConditionalGeneration (CLIP + Llama), with images of different sizes and left padding."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from parity_utils import randomize_, seeded, to_torch

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

import llava_fixture  # noqa: E402
import mmproj  # noqa: E402
from mmproj import inference  # noqa: E402
from mmproj.data.preprocess import ImageProcessor  # noqa: E402

IMAGE_SIZE, PATCH = 32, 8          # 4 x 4 = 16 visual tokens per image


@pytest.fixture(scope='module')
def llava_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('tiny_llava')
  tok_file = llava_fixture.make_tokenizer(root)
  vocab = llava_fixture.vocab_size(tok_file)
  seeded(0)
  vision = transformers.CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH, hidden_size=32,
                                         intermediate_size=64, num_hidden_layers=3, num_attention_heads=2)
  text = transformers.LlamaConfig(vocab_size=vocab, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                  bos_token_id=llava_fixture.BOS_ID, eos_token_id=llava_fixture.EOS_ID,
                                  pad_token_id=llava_fixture.PAD_ID)
  config = transformers.LlavaConfig(vision_config=vision, text_config=text,
                                    image_token_index=llava_fixture.IMAGE_TOKEN_ID,
                                    image_seq_length=(IMAGE_SIZE // PATCH) ** 2, vision_feature_layer=-2,
                                    vision_feature_select_strategy='default', projector_hidden_act='gelu')
  config._attn_implementation = 'eager'
  model = randomize_(transformers.LlavaForConditionalGeneration(config).float(), seed=1, std=0.15)
  out = root / 'hf'
  model.save_pretrained(out)
  os.replace(tok_file, out / 'tokenizer.json')
  processor = ImageProcessor.clip(size=IMAGE_SIZE, crop_size=(IMAGE_SIZE, IMAGE_SIZE))
  (out / 'preprocessor_config.json').write_text(json.dumps(processor.to_hf_config()))
  return str(out), model


def _images(seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((40, 52), (32, 32), (61, 33))]


PROMPTS = ['USER: <image>\nWhat color is the circle? ASSISTANT:',
           'USER: <image>\nDescribe the image briefly. ASSISTANT:',
           'USER: How many shapes are there? <image> ASSISTANT: There are']


def test_greedy_generation_matches_transformers(llava_dir):
  path, hf_model = llava_dir
  bundle = mmproj.load(path)
  assert bundle.prompt_format == 'hf' and bundle.stop_ids == (llava_fixture.EOS_ID,)
  images = _images()
  texts, ids = mmproj.generate(bundle, images, PROMPTS, max_new_tokens=10, return_ids=True)

  # transformers: the same left-padded prompt ids and the processor's pixel values (ours equal HF's bit for bit).
  rows = [inference.encode_prompt(bundle, p) for p in PROMPTS]
  length = max(len(r) for r in rows)
  input_ids = np.full((len(rows), length), llava_fixture.PAD_ID, np.int64)
  mask = np.zeros_like(input_ids)
  for b, r in enumerate(rows):
    input_ids[b, length - len(r):], mask[b, length - len(r):] = r, 1
  assert all(r.count(llava_fixture.IMAGE_TOKEN_ID) == (IMAGE_SIZE // PATCH) ** 2 for r in rows)
  pixels = bundle.image_processor(images).transpose(0, 3, 1, 2)                     # [B, 3, H, W]
  with torch.no_grad():
    out = hf_model.generate(input_ids=to_torch(input_ids), attention_mask=to_torch(mask),
                            pixel_values=to_torch(pixels), max_new_tokens=10, do_sample=False,
                            eos_token_id=llava_fixture.EOS_ID, pad_token_id=llava_fixture.PAD_ID,
                            suppress_tokens=[llava_fixture.IMAGE_TOKEN_ID])
  want = out[:, length:].numpy()
  np.testing.assert_array_equal(ids[:, :want.shape[1]], want)
  tok = bundle.tokenizer
  for text, row in zip(texts, want):
    cut = list(row)
    if llava_fixture.EOS_ID in cut:
      cut = cut[:cut.index(llava_fixture.EOS_ID)]
    assert text == tok.decode([int(i) for i in cut], skip_special_tokens=True)


def test_sampled_generation_is_seeded(llava_dir):
  bundle = mmproj.load(llava_dir[0])
  images = _images(1)
  a = mmproj.generate(bundle, images, PROMPTS, max_new_tokens=6, temperature=1.0, seed=3, return_ids=True)[1]
  b = mmproj.generate(bundle, images, PROMPTS, max_new_tokens=6, temperature=1.0, seed=3, return_ids=True)[1]
  np.testing.assert_array_equal(a, b)
  assert (a != llava_fixture.IMAGE_TOKEN_ID).all()
