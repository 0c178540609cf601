"""A tiny LLaVA-format data set and a tiny Llama-like tokenizer for tests (no downloads).

`make_tokenizer(dir)` writes `dir/tokenizer.json`: a `tokenizers` BPE model (unk '<unk>', no byte fallback: the
256 byte tokens alone would exceed the size budget) trained on a fixed corpus of the fixture's vocabulary, with a
Metaspace pre-tokenizer/decoder (prepend_scheme 'first', as non-legacy Llama tokenizers), a post-processor that
prepends <s> when special tokens are requested (as Llama's), and the special tokens

    <unk>=0  <s>=1  </s>=2  <image>=3  <pad>=4

so `<image>` has the id the tiny test models use (`model.image_token_id = 3`). At most MAX_VOCAB_SIZE ids.

`make_llava_json(root, n)` writes `root/images/...` (PNG files of coloured shapes, varied sizes and aspect ratios,
RGB plus one grayscale and one RGBA image, in two sub-folders) and `root/llava.json`: a list of n LLaVA records
mixing stage-1 single-caption records, multi-turn stage-2 records (the `<image>` tag before or after the first
question) and one text-only record (no "image" key).
"""

from __future__ import annotations

import json
import os

import numpy as np
import tokenizers
from PIL import Image
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

UNK, BOS, EOS, IMAGE_TOKEN, PAD = '<unk>', '<s>', '</s>', '<image>', '<pad>'
SPECIAL_TOKENS = (UNK, BOS, EOS, IMAGE_TOKEN, PAD)
UNK_ID, BOS_ID, EOS_ID, IMAGE_TOKEN_ID, PAD_ID = range(len(SPECIAL_TOKENS))
MAX_VOCAB_SIZE = 256

SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the human's questions.")
COLORS = {'red': (220, 40, 40), 'green': (40, 200, 60), 'blue': (40, 70, 220), 'yellow': (230, 210, 30),
          'white': (245, 245, 245), 'purple': (150, 50, 190)}
SHAPES = ('circle', 'square')
NUMBERS = ('zero', 'one', 'two', 'three')
CAPTION_PROMPTS = ('Describe the image briefly.', 'Give a short caption for the picture.',
                   'What is in the picture?')
# (width, height) of the images, cycled over the records.
IMAGE_SIZES = ((64, 48), (40, 72), (50, 50), (96, 30), (33, 61))
TEXT_ONLY = {'question': 'What is two plus two?', 'answer': 'Four.'}


def _corpus() -> list[str]:
  """A fixed training corpus: every word and punctuation the fixture and the templates produce."""
  lines = [SYSTEM, 'USER: ASSISTANT: USER: ASSISTANT:', TEXT_ONLY['question'], TEXT_ONLY['answer'],
           'Yes. No. It is the only shape. There are shapes. a an and the of is in on at left right top bottom',
           *CAPTION_PROMPTS]
  for c in COLORS:
    for s in SHAPES:
      lines += [f'A {c} {s} on a black background.', f'What color is the {s}? It is {c}.',
                f'Where is the {c} {s}? The {c} {s} is on the left.', f'Is there a {c} {s}? Yes.']
  for k in NUMBERS:
    lines.append(f'How many shapes are there? There are {k} shapes. {k.capitalize()}.')
  return lines


def make_tokenizer(path_dir: str | os.PathLike) -> str:
  """Writes `path_dir/tokenizer.json` (see module docstring) and returns the file path. Deterministic."""
  os.makedirs(path_dir, exist_ok=True)
  tok = tokenizers.Tokenizer(models.BPE(unk_token=UNK, fuse_unk=True))
  tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement='▁', prepend_scheme='first', split=True)
  tok.decoder = decoders.Metaspace(replacement='▁', prepend_scheme='first', split=True)
  alphabet = sorted(set(''.join(_corpus())) | set('\n▁0123456789') - {' '})
  trainer = trainers.BpeTrainer(vocab_size=MAX_VOCAB_SIZE, special_tokens=list(SPECIAL_TOKENS),
                                initial_alphabet=alphabet, show_progress=False)
  tok.train_from_iterator(_corpus(), trainer=trainer)
  # As Llama's tokenizer.json: encode(..., add_special_tokens=True) prepends <s> (training rows add it by id).
  tok.post_processor = processors.TemplateProcessing(single=f'{BOS} $A', pair=f'{BOS} $A {BOS} $B',
                                                     special_tokens=[(BOS, BOS_ID)])
  for i, t in enumerate(SPECIAL_TOKENS):
    assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
  assert tok.get_vocab_size(with_added_tokens=True) <= MAX_VOCAB_SIZE
  path = os.path.join(os.fspath(path_dir), 'tokenizer.json')
  tok.save(path)
  return path


def load(tok_path: str | os.PathLike) -> tokenizers.Tokenizer:
  return tokenizers.Tokenizer.from_file(os.fspath(tok_path))


def vocab_size(tok_path: str | os.PathLike) -> int:
  """Number of ids of the tokenizer written by make_tokenizer (<= MAX_VOCAB_SIZE)."""
  return load(tok_path).get_vocab_size(with_added_tokens=True)


def image_token_id(tok_path: str | os.PathLike) -> int:
  """Id of '<image>' (IMAGE_TOKEN_ID)."""
  return load(tok_path).token_to_id(IMAGE_TOKEN)


def _draw(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, list[tuple[str, str]]]:
  """A black uint8 [height, width, 3] image with 1-2 shapes -> (image, [(colour, shape), ...])."""
  img = np.zeros((height, width, 3), np.uint8)
  yy, xx = np.mgrid[:height, :width]
  objects = []
  for _ in range(int(rng.integers(1, 3))):
    color = list(COLORS)[rng.integers(len(COLORS))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    r = max(3, min(width, height) // 5)
    cx, cy = int(rng.integers(r, width - r)), int(rng.integers(r, height - r))
    mask = ((xx - cx) ** 2 + (yy - cy) ** 2 <= r * r) if shape == 'circle' else (
        (abs(xx - cx) <= r) & (abs(yy - cy) <= r))
    img[mask] = COLORS[color]
    objects.append((color, shape))
  return img, objects


def make_llava_json(root: str | os.PathLike, n: int = 16, seed: int = 0,
                    image_sizes: tuple[tuple[int, int], ...] = IMAGE_SIZES) -> tuple[str, str]:
  """Writes n records (n >= 3) to root/llava.json and their images under root/images -> (json path, image dir).

  Record i (deterministic in (n, seed)): i == n // 2 is text-only; otherwise even i are stage-1 captions
  (`<image>\\n{prompt}` -> caption) and odd i are multi-turn (2-3 rounds; the tag after the first question on
  every other one). Image i has size image_sizes[i % len(image_sizes)] (width, height); image 1 is saved
  grayscale ('L') and image 3 as RGBA.
  """
  if n < 3:
    raise ValueError(f'n={n}: need >= 3 records')
  root = os.fspath(root)
  image_dir = os.path.join(root, 'images')
  rng = np.random.default_rng(seed)
  records = []
  for i in range(n):
    rid = f'{i:06d}'
    if i == n // 2:
      records.append({'id': f'text-{rid}', 'conversations': [
          {'from': 'human', 'value': TEXT_ONLY['question']}, {'from': 'gpt', 'value': TEXT_ONLY['answer']}]})
      continue
    w, h = image_sizes[i % len(image_sizes)]
    img, objects = _draw(rng, w, h)
    rel = os.path.join('coco' if i % 2 else 'cc3m', f'{rid}.png')
    os.makedirs(os.path.join(image_dir, os.path.dirname(rel)), exist_ok=True)
    pil = Image.fromarray(img)
    pil = pil.convert('L') if i == 1 else pil.convert('RGBA') if i == 3 else pil
    pil.save(os.path.join(image_dir, rel))
    color, shape = objects[0]
    caption = ' and '.join(f'a {c} {s}' for c, s in objects).capitalize() + ' on a black background.'
    if i % 2 == 0:
      prompt = CAPTION_PROMPTS[i % len(CAPTION_PROMPTS)]
      conv = [('human', f'<image>\n{prompt}' if i % 4 == 0 else f'{prompt}\n<image>'), ('gpt', caption)]
    else:
      first = f'What color is the {shape}?'
      conv = [('human', f'<image>\n{first}' if i % 4 == 1 else f'{first}\n<image>'), ('gpt', f'It is {color}.'),
              ('human', 'How many shapes are there?'), ('gpt', f'There are {NUMBERS[len(objects)]} shapes.')]
      if i % 3 == 0:
        conv += [('human', f'Is there a {color} {shape}?'), ('gpt', 'Yes.')]
    records.append({'id': rid, 'image': rel, 'conversations': [{'from': f, 'value': v} for f, v in conv]})
  json_path = os.path.join(root, 'llava.json')
  with open(json_path, 'w') as f:
    json.dump(records, f, indent=1)
  return json_path, image_dir
