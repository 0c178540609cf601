"""Stage 0: the pretrained towers that connector experiments start from, built once per recipe and reused.

  python -m mmproj.stage0 configs/stage0/scenes.py          # builds (or finds) both towers and prints their report
  python -m mmproj.stage0 configs/stage0/scenes.py:smoke    # the same at toy sizes, in about a minute

Real MLLMs put the connector between a pretrained (usually frozen) vision encoder and a pretrained LM. Stage 0
makes both for the world a recipe names (config_lib.stage0_recipe), as the released ones are made:

  vision  a SigLIP-shaped ViT trained with SigLIP's sigmoid contrastive loss (Zhai et al. 2023) against a small
          causal text tower on the world's captions, which name every object's attributes and cell. Image
          embedding: the mean of the ViT's output tokens, projected; text embedding: the text tower's state at the
          caption's <eos>, projected. vision.hard_negatives: each image also meets its caption with one thing
          changed (an object's shape, colour, size or cell, two shapes swapped, a digit; shapes.
          hard_negative_caption) as an extra negative, so that shapes, cells and digits must be encoded; random
          captions can be told apart by colours alone. vision.caption_weight > 0 adds SigLIP 2's decoder loss
          (Tschannen et al. 2025, after CapPa and LocCa): a small decoder writes each image's caption while
          cross-attending to the ViT's tokens, which it sees without their positions, so a token must carry
          where it is in its content for the cells in the caption to be predictable (the mean pool does not ask
          for that: experiments/tower_probe.py --field token_position). In the world's reading order much of
          each cell is predictable from where its object comes in the caption; vision.caption_order='shuffled'
          writes the objects in a new order every time, so the cell after an object can only come from that
          object's tokens (LocCa's referring expressions, dense). Reported: zero-shot image -> text
          retrieval top-1 on the test split (the right caption among all num_test of them; chance
          1 / num_test), and per kind of change how often the image is closer to its own caption than to the
          changed one (chance 50%).
  lm      a Llama-shaped LM trained on text only, by the one trainer (mmproj/train/trainer.py) as a model with no
          image: rows are a caption followed by questions about it and their answers, so it learns the language
          and answers from a description, but has never seen an image. Reported: test caption perplexity.

Both are written as HF directories (mmproj/convert: a SiglipVisionModel dir with preprocessor_config.json, a
LlamaForCausalLM dir with tokenizer.json) under stage0.cache_dir/<key>/, key = a hash of the recipe, and read
back through cfg.init, the path a LLaVA run from released weights takes. `resolve_init(cfg)` builds what is
missing (training resumes from its checkpoints in <key>/work/ after an interruption; the towers' world is built
under the experiment's data.data_dir) and points cfg.init's 'stage0' entries at the directories. report.json
beside them holds the figures and each tower's weights digest: training on CPU is not bitwise reproducible across
machines and resumes, so one key can name different weights, and `provenance(cfg)` says which ones a run read.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from mmproj import config_lib
from mmproj.data import shapes
from mmproj.data.file_lock import file_lock
from mmproj.data import tokenizer as tokenizer_lib
from mmproj.encoders import build_encoder
from mmproj.layers.attention import causal_padding_mask
from mmproj.layers.cross_attention import CrossAttention
from mmproj.layers.norms import RMSNorm
from mmproj.lm import build_lm
from mmproj.lm.llama import DecoderBlock
from mmproj.train import optimizer as opt_lib


def _print(msg: str) -> None:
  print(msg, flush=True)


# vision.caption_order: the order the caption decoder writes the objects in (module docstring).
CAPTION_ORDERS = ('reading', 'shuffled')
STAGE0 = 'stage0'             # the cfg.init value that means "the stage-0 tower of cfg.stage0"
PARTS = {'encoder': 'vision', 'lm': 'lm'}   # cfg.init part -> stage-0 directory


# ----------------------------------------------------------------------------------------------- the recipe key


def key(recipe: Any) -> str:
  """12 hex digits naming the recipe's towers: every field but where things are stored."""
  r = recipe.to_dict() if hasattr(recipe, 'to_dict') else dict(recipe)
  r.pop('cache_dir', None)
  r['data'] = {k: v for k, v in r['data'].items() if k != 'data_dir'}
  r['lm'] = {**r['lm'], 'data': {k: v for k, v in r['lm']['data'].items() if k != 'data_dir'}}
  if r['vision'].get('caption_order') == 'reading':   # what recipes written before the field meant: same towers
    r['vision'] = {k: v for k, v in r['vision'].items() if k != 'caption_order'}
  if r['lm'].get('model', {}).get('modality') == 'image':   # likewise model.modality (added with audio and video)
    r['lm'] = {**r['lm'], 'model': {k: v for k, v in r['lm']['model'].items() if k != 'modality'}}
  return hashlib.sha256(json.dumps(r, sort_keys=True, default=str).encode()).hexdigest()[:12]


def directories(recipe: Any) -> dict[str, str]:
  root = os.path.join(shapes.local_dir('stage0.cache_dir', recipe.cache_dir), key(recipe))
  return {'root': root, 'vision': os.path.join(root, 'vision'), 'lm': os.path.join(root, 'lm'),
          'report': os.path.join(root, 'report.json'), 'work': os.path.join(root, 'work')}


# ----------------------------------------------------------------------------------------------- vision tower


class Captioner(nn.Module):
  """Caption decoder of the SigLIP 2 / LocCa kind: caption tokens [B, T] -> next-token logits [B, T, V].
  Before each causal Llama block the tokens cross-attend to the ViT's tokens memory [B, N, Dv] (projected to the
  decoder's width, no position added), so whatever the decoder learns of where things are comes from the ViT."""
  vocab_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int

  @nn.compact
  def __call__(self, memory, tokens, input_mask):
    dh = self.width // self.num_heads
    x = nn.Embed(self.vocab_size, self.width, embedding_init=nn.initializers.normal(0.02), name='embed')(tokens)
    memory = nn.Dense(self.width, name='memory_proj')(memory)                  # [B, N, D]
    positions = jnp.maximum(jnp.cumsum(input_mask, axis=1) - 1, 0)              # [B, T]
    slots = jnp.arange(tokens.shape[1])
    mask = causal_padding_mask(slots, slots, input_mask)                       # [B, T, T]
    for i in range(self.depth):
      h = RMSNorm(1e-6, name=f'xattn_norm_{i}')(x)
      x = x + CrossAttention(self.num_heads, dh, name=f'xattn_{i}')(h, memory)  # [B, T, D]
      x, _ = DecoderBlock(self.num_heads, self.num_heads, dh, self.mlp_dim, name=f'block_{i}')(x, mask, positions)
    return nn.Dense(self.vocab_size, name='head')(RMSNorm(1e-6, name='final_norm')(x))  # [B, T, V]


def caption_loss(logits, tokens, input_mask):
  """Next-token cross-entropy of logits [B, T, V] on tokens [B, T], averaged over the real target tokens."""
  target_mask = input_mask[:, 1:].astype(jnp.float32)                        # [B, T-1]
  xent = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])
  return (xent * target_mask).sum() / jnp.maximum(target_mask.sum(), 1.0)


class SigLIPPair(nn.Module):
  """ViT + causal text tower with SigLIP's learnable temperature t and bias b (+ an optional caption decoder).
    image [B, S, S, 3] uint8 -> ViT [B, N, Dv] -> mean over N -> Dense -> l2-normalised [B, E]
    caption tokens [B, T] -> text tower [B, T, Dt] -> the <eos> position -> RMSNorm -> Dense -> l2-normalised [B, E]
    captioner: ViT tokens [B, N, Dv] + the first B captions [B, T] -> the captions' next-token loss (a scalar)
  """
  encoder: Any
  text: Any
  embed_dim: int
  captioner: Any = None          # None, or Captioner's fields

  def setup(self):
    self.vit = build_encoder(self.encoder)
    self.caption_decoder = Captioner(**self.captioner) if self.captioner else None
    self.text_tower = build_lm(self.text)
    self.text_norm = RMSNorm(1e-6)
    self.image_proj = nn.Dense(self.embed_dim, name='image_proj')
    self.text_proj = nn.Dense(self.embed_dim, name='text_proj')
    self.log_t = self.param('log_t', lambda _: jnp.log(10.0))     # SigLIP's initialisation: t = 10, b = -10
    self.bias = self.param('bias', lambda _: jnp.full((), -10.0))

  def embed_images(self, image, return_tokens: bool = False):
    tokens, _ = self.vit(image)                                            # [B, N, Dv]
    z = self.image_proj(tokens.mean(axis=1))                               # [B, E]
    z = z / jnp.linalg.norm(z, axis=-1, keepdims=True)
    return (z, tokens) if return_tokens else z

  def embed_texts(self, tokens, input_mask):
    positions = jnp.maximum(jnp.cumsum(input_mask, axis=1) - 1, 0)
    hidden, _ = self.text_tower(self.text_tower.embed(tokens), positions, input_mask, return_hidden=True)  # [B, T, D]
    last = input_mask.sum(axis=1) - 1                                      # the <eos> of each caption
    pooled = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]  # [B, D]
    z = self.text_proj(self.text_norm(pooled))                             # [B, E]
    return z / jnp.linalg.norm(z, axis=-1, keepdims=True)

  def __call__(self, image, tokens, input_mask, decoder_tokens=None, decoder_mask=None):
    """-> (zimg [B, E], ztxt [B', E], t, b, the caption loss or 0); rows B.. of tokens are extra negatives.
    decoder_tokens/mask [B, T]: what the caption decoder writes (default: the first B captions)."""
    zimg, vit_tokens = self.embed_images(image, return_tokens=True)
    cap = jnp.zeros(())
    if self.caption_decoder is not None:
      b = image.shape[0]
      if decoder_tokens is None:
        decoder_tokens, decoder_mask = tokens[:b], input_mask[:b]
      cap = caption_loss(self.caption_decoder(vit_tokens, decoder_tokens, decoder_mask), decoder_tokens,
                         decoder_mask)
    return zimg, self.embed_texts(tokens, input_mask), jnp.exp(self.log_t), self.bias, cap


def sigmoid_loss(zimg, ztxt, t, b):
  """SigLIP: every (image, caption) pair of the batch is a binary problem, positive on the diagonal. ztxt may
  hold more captions than there are images (rows B.. are extra negatives: hard negatives)."""
  logits = zimg @ ztxt.T * t + b                                           # [B, B + extra]
  labels = 2 * jnp.eye(*logits.shape) - 1
  return -jax.nn.log_sigmoid(labels * logits).sum() / logits.shape[0]


def _caption_tokens(tok, captions: list[str], length: int, where: str) -> tuple[np.ndarray, np.ndarray]:
  ids = np.zeros((len(captions), length), np.int32)
  for i, text in enumerate(captions):
    row = [tokenizer_lib.BOS_ID] + tokenizer_lib.encode(tok, text) + [tokenizer_lib.EOS_ID]
    if len(row) > length:
      raise ValueError(f'stage0.vision.text_len={length}: a {where} caption needs {len(row)} tokens')
    ids[i, :len(row)] = row
  return ids, (ids != tokenizer_lib.PAD_ID).astype(np.int32)


class CaptionedSplit:
  """A split's images, caption tokens and scene contents, read once (a few hundred MB at most for the recipes
  here)."""

  def __init__(self, data_cfg, tok, split: str, text_len: int, limit: int | None = None):
    source = shapes.data_source(data_cfg, split)
    n = len(source) if limit is None else min(limit, len(source))
    records = [shapes.decode_record(source[i]) for i in range(n)]
    self.tok, self.split, self.text_len, self.grid = tok, split, text_len, int(data_cfg.grid)
    self.images = np.stack([r['image'] for r in records])
    self.tokens, self.mask = _caption_tokens(tok, [r['caption'] for r in records], text_len, split)
    self.objects = [r['objects'] for r in records]
    self.glyphs = [shapes.scene_glyphs(r['caption'], self.grid) for r in records]

  def batch(self, index: np.ndarray) -> tuple[np.ndarray, ...]:
    return self.images[index], self.tokens[index], self.mask[index]

  def shuffled_captions(self, index: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The captions of `index` with their objects (then their glyphs) in a random order -> (tokens, mask): what
    the decoder writes with vision.caption_order='shuffled'."""
    captions = []
    for i in index:
      objects, glyphs = self.objects[int(i)], self.glyphs[int(i)]
      o, g = rng.permutation(len(objects['shape'])), rng.permutation(len(glyphs['digit']))
      captions.append(shapes.scene_caption({k: v[o] for k, v in objects.items()},
                                           {k: v[g] for k, v in glyphs.items()}, self.grid))
    return _caption_tokens(self.tok, captions, self.text_len, f'{self.split} shuffled')

  def negative(self, i: int, kind: str, rng: np.random.Generator) -> str | None:
    return shapes.hard_negative_caption(self.objects[i], self.glyphs[i], self.grid, kind, rng)

  def hard_negatives(self, index: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One hard negative caption per image of `index`, of a kind drawn uniformly among those that apply to it ->
    (tokens, mask) [len(index), text_len]."""
    captions = []
    for i in index:
      kinds = list(shapes.HARD_NEGATIVE_KINDS)
      while True:
        kind = kinds.pop(int(rng.integers(len(kinds))))
        caption = self.negative(int(i), kind, rng)
        if caption is not None:
          break
      captions.append(caption)
    return _caption_tokens(self.tok, captions, self.text_len, f'{self.split} hard negative')


def _train_cfg(v) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(steps=v.steps, warmup_steps=v.warmup_steps, learning_rate=v.learning_rate,
                                        end_lr_frac=v.end_lr_frac, b1=v.b1, b2=v.b2, weight_decay=v.weight_decay,
                                        grad_clip=v.grad_clip))


def retrieval_accuracy(model, params, split: CaptionedSplit, batch_size: int = 250) -> dict[str, float]:
  """Zero-shot retrieval top-1 over the whole split: each image's own caption among all the split's captions
  (image -> text), and each caption's image among all images (text -> image)."""
  embed_i = jax.jit(lambda p, x: model.apply({'params': p}, x, method='embed_images'))
  embed_t = jax.jit(lambda p, t, m: model.apply({'params': p}, t, m, method='embed_texts'))
  n = len(split.images)
  zi = np.concatenate([embed_i(params, split.images[i:i + batch_size]) for i in range(0, n, batch_size)])
  zt = np.concatenate([embed_t(params, split.tokens[i:i + batch_size], split.mask[i:i + batch_size])
                       for i in range(0, n, batch_size)])
  sim = zi @ zt.T                                                          # [N, N]
  return {'image_to_text': float(np.mean(sim.argmax(1) == np.arange(n))),
          'text_to_image': float(np.mean(sim.argmax(0) == np.arange(n))), 'chance': 1.0 / n, 'candidates': n,
          'hard_negatives': hard_negative_accuracy(params, split, zi, zt, embed_t, batch_size)}


def hard_negative_accuracy(params, split: CaptionedSplit, zi: np.ndarray, zt: np.ndarray, embed_t, batch_size: int
                           ) -> dict[str, float]:
  """Per hard-negative kind (shapes.hard_negative_caption): how often an image is closer to its own caption than
  to that caption with one thing changed (chance 50%), over the split's images the kind applies to. The finer
  test: retrieval among random captions can succeed on colours alone."""
  own = (zi * zt).sum(-1)                            # [N] each image's similarity to its own caption
  out = {}
  for k, kind in enumerate(shapes.HARD_NEGATIVE_KINDS):
    rng = np.random.default_rng([k])
    pairs = [(i, c) for i in range(len(zi)) if (c := split.negative(i, kind, rng)) is not None]
    if not pairs:
      continue
    tokens, mask = _caption_tokens(split.tok, [c for _, c in pairs], split.text_len, f'{split.split} {kind}')
    zn = np.concatenate([embed_t(params, tokens[i:i + batch_size], mask[i:i + batch_size])
                         for i in range(0, len(tokens), batch_size)])                          # [P, E]
    rows = np.array([i for i, _ in pairs])
    out[kind] = float(np.mean(own[rows] > (zi[rows] * zn).sum(-1)))
  out['mean'] = float(np.mean(list(out.values()))) if out else float('nan')
  return out


def train_vision(recipe, workdir: str, tok, log=_print) -> tuple[dict, dict]:
  """Trains the SigLIP pair (resuming from workdir's newest checkpoint) -> (ViT params, report)."""
  v = recipe.vision
  caption_weight = float(v.get('caption_weight', 0.0))
  captioner = v.captioner.to_dict() if caption_weight > 0 else None
  caption_order = v.get('caption_order', 'reading')
  if caption_order not in CAPTION_ORDERS:
    raise ValueError(f'stage0.vision.caption_order={caption_order!r}: expected one of {CAPTION_ORDERS}')
  shuffled = caption_weight > 0 and caption_order == 'shuffled'
  model = SigLIPPair(encoder=v.encoder.to_dict(), text=v.text.to_dict(), embed_dim=int(v.embed_dim),
                     captioner=captioner)
  train = CaptionedSplit(recipe.data, tok, 'train', int(v.text_len))
  test = CaptionedSplit(recipe.data, tok, 'test', int(v.text_len))
  b = int(v.batch_size)
  hard = bool(v.get('hard_negatives', False))  # one hard negative caption per image, besides the batch's others
  sample = train.batch(np.arange(b))
  params = model.init(jax.random.key(int(v.seed)), *sample)['params']
  labels = jax.tree.map(lambda _: 'train', params)
  tx = opt_lib.make_optimizer(_train_cfg(v), labels)
  state = {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': tx.init(params)}

  @functools.partial(jax.jit, donate_argnums=0)
  def step_fn(state, image, tokens, mask, decoder_tokens, decoder_mask):
    def loss_fn(p):
      zimg, ztxt, t, b, cap = model.apply({'params': p}, image, tokens, mask, decoder_tokens, decoder_mask)
      return sigmoid_loss(zimg, ztxt, t, b) + caption_weight * cap
    loss, grads = jax.value_and_grad(loss_fn)(state['params'])
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    return {'step': state['step'] + 1, 'params': optax.apply_updates(state['params'], updates),
            'opt_state': opt_state}, loss

  manager = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'),
                                  options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
  # Training seconds up to each checkpoint, so that a resumed build reports the time of the whole training.
  seconds_file = os.path.join(workdir, 'train_seconds.json')
  seconds = json.load(open(seconds_file)) if os.path.isfile(seconds_file) else {}
  latest = manager.latest_step()
  if latest is not None:
    state = manager.restore(latest, args=ocp.args.StandardRestore(state))
    log(f'[stage0 vision] resuming from step {latest}')
  steps, every = int(v.steps), int(v.checkpoint_every)
  before = float(seconds.get(str(latest), 0.0))
  losses, t0 = [], time.time()
  try:             # on an error too: a pending save finishes, so the next run resumes from it
    for step in range(int(state['step']) + 1, steps + 1):
      # The batch is a pure function of (seed, step): a resumed run sees the batches it would have seen.
      rng = np.random.default_rng([int(v.seed), step])
      index = rng.choice(len(train.images), b, replace=False)
      image, tokens, mask = train.batch(index)
      decoder_tokens, decoder_mask = train.shuffled_captions(index, rng) if shuffled else (None, None)
      if hard:
        neg_tokens, neg_mask = train.hard_negatives(index, rng)
        tokens, mask = np.concatenate([tokens, neg_tokens]), np.concatenate([mask, neg_mask])
      state, loss = step_fn(state, image, tokens, mask, decoder_tokens, decoder_mask)
      losses.append(float(loss))
      if step % every == 0 or step == steps:
        manager.save(step, args=ocp.args.StandardSave(state))
        seconds[str(step)] = round(before + time.time() - t0, 1)
        with open(seconds_file + '.tmp', 'w') as f:
          json.dump(seconds, f)
        os.replace(seconds_file + '.tmp', seconds_file)
      if step % int(v.log_every) == 0 or step == steps:
        log(f'[stage0 vision] step {step}/{steps} loss {np.mean(losses):.4f} ({before + time.time() - t0:.0f}s)')
        losses = []
  finally:
    manager.wait_until_finished()
    manager.close()
  params = state['params']
  report = {'retrieval': retrieval_accuracy(model, params, test), 'steps': steps, 'batch_size': b,
            'train_seconds': float(seconds.get(str(steps), round(before + time.time() - t0, 1)))}
  return jax.device_get(params['vit']), report


# ----------------------------------------------------------------------------------------------- LM


def train_lm(recipe, workdir: str, log=_print) -> tuple[dict, dict, Any]:
  """Trains the text-only LM with the one trainer -> (LM params, report, tokenizer)."""
  from mmproj.eval import vqa
  from mmproj.train import trainer

  result = trainer.train(recipe.lm, workdir, name='[stage0 lm] ')
  loss = vqa.caption_loss(result.setup, result.state.params, result.tokenizer,
                          batch_size=int(recipe.lm.eval.batch_size))
  report = {'caption_loss': loss, 'caption_perplexity': math.exp(loss), 'steps': int(recipe.lm.train.steps),
            'train_seconds': round(result.train_seconds, 1),
            'uniform_perplexity': float(tokenizer_lib.vocab_size(result.tokenizer))}
  log(f'[stage0 lm] test caption perplexity {math.exp(loss):.3f}')
  return jax.device_get(result.state.params['lm']), report, result.tokenizer


# ----------------------------------------------------------------------------------------------- build / resolve


def is_built(recipe) -> bool:
  d = directories(recipe)
  if not (os.path.isfile(d['report']) and all(os.path.isfile(os.path.join(d[p], 'model.safetensors'))
                                               for p in ('vision', 'lm'))):
    return False
  with open(d['report']) as f:
    return {'vision', 'lm'} <= set(json.load(f))


def build(recipe, log=_print) -> dict[str, str]:
  """Builds whatever of the recipe's towers is missing (one process at a time) -> directories(recipe)."""
  from mmproj.convert import llama, vision

  d = directories(recipe)
  with file_lock(d['root'] + '.lock'):
    if is_built(recipe):
      return d
    _, tok = shapes.prepare(recipe.data)
    report = json.load(open(d['report'])) if os.path.isfile(d['report']) else {}
    report.update(key=key(recipe), recipe=recipe.to_dict())

    def save_report():  # after each tower: a build cut off in the LM keeps the vision figures
      with open(d['report'] + '.tmp', 'w') as f:
        json.dump(report, f, indent=2, default=str)
      os.replace(d['report'] + '.tmp', d['report'])

    if 'vision' not in report or not os.path.isfile(os.path.join(d['vision'], 'model.safetensors')):
      vit_params, report['vision'] = train_vision(recipe, os.path.join(d['work'], 'vision'), tok, log)
      if not os.path.isfile(os.path.join(d['vision'], 'model.safetensors')):
        vision.export_vision_tower(recipe.vision.encoder.to_dict(), vit_params, d['vision'])
      save_report()
    if 'lm' not in report or not os.path.isfile(os.path.join(d['lm'], 'model.safetensors')):
      lm_params, report['lm'], tok = train_lm(recipe, os.path.join(d['work'], 'lm'), log)
      tok_file = os.path.join(d['work'], 'lm', tokenizer_lib.FILENAME)
      tokenizer_lib.save(tok, tok_file)
      if not os.path.isfile(os.path.join(d['lm'], 'model.safetensors')):
        llama.export_lm(recipe.lm.model.lm.to_dict(), lm_params, d['lm'], tokenizer_file=tok_file,
                        bos_token_id=tokenizer_lib.BOS_ID, eos_token_id=tokenizer_lib.EOS_ID,
                        pad_token_id=tokenizer_lib.PAD_ID)
      save_report()
  digests(recipe)
  return d


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(functools.partial(f.read, 1 << 20), b''):
      h.update(block)
  return h.hexdigest()[:16]


def digests(recipe) -> dict[str, str]:
  """{'vision': ..., 'lm': ...}: 16 hex digits of each built tower's model.safetensors sha256, kept in report.json
  (computed once; towers built before the field get it on first use)."""
  d = directories(recipe)
  found = report(recipe)
  if all('sha256' in found.get(part, {}) for part in PARTS.values()):
    return {part: found[part]['sha256'] for part in PARTS.values()}
  with file_lock(d['root'] + '.lock'):
    found = report(recipe)
    for part in PARTS.values():
      found[part]['sha256'] = _sha256(os.path.join(d[part], 'model.safetensors'))
    with open(d['report'] + '.tmp', 'w') as f:
      json.dump(found, f, indent=2, default=str)
    os.replace(d['report'] + '.tmp', d['report'])
  return {part: found[part]['sha256'] for part in PARTS.values()}


def _parts_read(cfg) -> list[str]:
  """The cfg.init parts a run takes from stage 0; a blind run (the sweep's 'blind' cell) takes the LM only."""
  return [part for part in PARTS if cfg.init.get(part) == STAGE0 and (part != 'encoder' or cfg.model.use_image)]


def provenance(cfg) -> dict[str, str] | None:
  """The stage-0 towers a run reads (call it on the config before resolve_init, with the towers built): the
  recipe key and the weights digest of each tower its cfg.init takes from stage 0; None for a run that takes none."""
  wanted = _parts_read(cfg)
  if not wanted or cfg.get('stage0') is None:
    return None
  found = digests(cfg.stage0)
  return {'key': key(cfg.stage0), **{PARTS[part]: found[PARTS[part]] for part in wanted}}


def resolve_init(cfg, log=_print) -> ml_collections.ConfigDict:
  """cfg with each cfg.init entry equal to 'stage0' replaced by the directory of that stage-0 tower (built
  first when missing); cfg unchanged when none is."""
  wanted = _parts_read(cfg)
  if cfg.init.get('encoder') == STAGE0 and 'encoder' not in wanted:   # a blind run: no encoder to load
    cfg = cfg.copy_and_resolve_references()
    cfg.init.encoder = None
  if not wanted:
    return cfg
  if cfg.get('stage0') is None:
    raise ValueError(f"init.{wanted[0]}='stage0' but the config has no stage0 recipe (config_lib.stage0_recipe)")
  cfg = cfg.copy_and_resolve_references()
  # The towers' world is built where the experiment's is (the key leaves data_dir out).
  cfg.stage0.data.data_dir = cfg.stage0.lm.data.data_dir = cfg.data.data_dir
  dirs = build(cfg.stage0, log)
  for part in wanted:
    cfg.init[part] = dirs[PARTS[part]]
  return cfg


def report(recipe) -> dict:
  with open(directories(recipe)['report']) as f:
    return json.load(f)


def format_report(r: dict) -> str:
  ret, lm = r['vision']['retrieval'], r['lm']
  lines = [f"stage0 {r['key']}",
           f"  vision: zero-shot image->text top-1 {ret['image_to_text']:.1%} (text->image {ret['text_to_image']:.1%})"
           f" among {ret['candidates']} test captions, chance {ret['chance']:.2%}; {r['vision']['steps']} steps in "
           f"{r['vision']['train_seconds']:.0f}s"]
  if 'hard_negatives' in ret:
    lines.append('  vision: image closer to its caption than to it with one thing changed (chance 50%): '
                 + ', '.join(f'{k} {v:.1%}' for k, v in ret['hard_negatives'].items()))
  lines.append(f"  lm: test caption perplexity {lm['caption_perplexity']:.3f} (uniform over the vocabulary: "
               f"{lm['uniform_perplexity']:.0f}); {lm['steps']} steps in {lm['train_seconds']:.0f}s")
  if 'sha256' in r['vision'] and 'sha256' in lm:
    lines.append(f"  weights sha256: vision {r['vision']['sha256']}, lm {lm['sha256']}")
  return '\n'.join(lines)


def main(argv=None) -> int:
  recipe = config_lib.recipe_from_command_line('mmproj.stage0', __doc__.split('\n\n')[0],
                                                'configs/stage0/scenes.py', argv)
  d = build(recipe)
  print(format_report(report(recipe)))
  print(f"  vision: {d['vision']}\n  lm: {d['lm']}")
  return 0


if __name__ == '__main__':
  sys.exit(main())
