"""Text -> image evaluation of a model with an output side (mmproj/model.py, model.output): for each test caption
the LM is asked `<bos> draw <caption> <sep>`, and

  signal_first  the fraction of prompts whose greedy first token is [IMG0]
  signal_exact  ... whose greedy first K tokens are [IMG0]..[IMGk-1]
  pipeline      the recogniser's match rates (mmproj/eval/recognise.py: shape, color, size, cell, object, count,
                image) of the images the generator draws from the output projector's conditioning, computed
                from the LM's hidden states at [IMG0]..[IMGk-1] appended to the prompt (GILL appends the rest
                of the signal tokens once the first is emitted; here all K are appended, so `pipeline` measures
                the output side and `signal_*` the LM's choice to draw)
  reference     the same rates for the generator driven by its own text encoder on the caption: the upper
                reference the output side is aiming at
  condition_mse the mean squared difference between the two conditionings

The two images of a caption start from the same noise (eval.draw_seed), so `pipeline - reference` is a paired
difference. Sampling: eval.draw_steps Euler steps at classifier-free guidance eval.draw_guidance.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmproj import generators
from mmproj import model as model_lib
from mmproj.eval.generate import generate_tokens
from mmproj.eval.vqa import fetch


def signal_rows(batch: dict, signal_ids: np.ndarray) -> dict[str, np.ndarray]:
  """Left-padded prompts [B, L] -> the same rows with the K signal tokens appended: tokens / positions /
  input_mask [B, L + K]."""
  b, k = batch['tokens'].shape[0], len(signal_ids)
  last = batch['positions'][:, -1:]                                                   # [B, 1]
  return dict(tokens=np.concatenate([batch['tokens'], np.broadcast_to(signal_ids, (b, k))], 1).astype(np.int32),
              positions=np.concatenate([batch['positions'], last + 1 + np.arange(k)], 1).astype(np.int32),
              input_mask=np.concatenate([batch['input_mask'], np.ones((b, k), np.int32)], 1).astype(np.int32))


def draw_accuracy(setup, params, tokenizer, *, split: str = 'test', batch_size: int = 64,
                  max_examples: int | None = None, steps: int = 25, guidance: float = 3.0,
                  seed: int = 0) -> dict[str, Any]:
  """The module docstring's figures on `split` (the first max_examples records)."""
  from mmproj.data import draw, shapes
  from mmproj.eval import recognise

  cfg, model = setup.cfg, setup.model
  out = cfg.model.output
  k, first = int(out.num_signal_tokens), int(out.signal_token_id)
  signal_ids = np.arange(first, first + k, dtype=np.int32)
  generator = model_lib.output_modules(cfg.model, model_lib.DTYPES[cfg.model.dtype])[1]
  sample = functools.partial(generators.sample, generator, steps=int(steps), guidance=float(guidance))

  @jax.jit
  def conditions(params, rows, gen_text):
    hidden = model.apply({'params': params}, rows, return_hidden=True)             # [B, L + K, Dt]
    cond, _ = model.apply({'params': params}, hidden, rows['tokens'], method='signal_condition')
    ref = model.apply({'params': params}, gen_text, method='text_condition')       # [B, Lc, Dc]
    return cond, ref

  @jax.jit
  def images(gen_params, cond, ref, rng):
    return sample(gen_params, cond, rng), sample(gen_params, ref, rng)               # the same noise for both

  drawn, reference, objects, captions = [], [], [], []
  first_hits = exact_hits = 0
  sq_err = 0.0
  eos_id = tokenizer.token_to_id('<eos>')
  rng = jax.random.key(int(seed))
  with jax.set_mesh(setup.mesh):
    for i, batch in enumerate(draw.eval_batches(cfg.data, tokenizer, batch_size=batch_size, split=split,
                                                max_examples=max_examples)):
      valid = np.asarray(batch['valid'], bool)
      prompt = {key: batch[key] for key in ('tokens', 'positions', 'input_mask')}
      ids = fetch(generate_tokens(model, params, prompt, max_new_tokens=k, eos_id=eos_id))     # [B, K]
      first_hits += int(np.sum((ids[:, 0] == first) & valid))
      exact_hits += int(np.sum(np.all(ids == signal_ids, axis=1) & valid))
      cond, ref = conditions(params, signal_rows(batch, signal_ids), jnp.asarray(batch['gen_text']))
      sq_err += float(fetch(jnp.sum(jnp.mean(jnp.square(cond - ref), axis=(1, 2)) * valid)))
      a, b = map(fetch, images(params['generator'], cond, ref, jax.random.fold_in(rng, i)))
      drawn.append(a[valid])
      reference.append(b[valid])
      objects += [o for o, v in zip(batch['objects'], valid) if v]
      captions += [str(c) for c, v in zip(batch['caption'], valid) if v]
  n = len(objects)
  if not n:
    raise ValueError(f'the {split} split gave no draw examples (eval.max_examples={max_examples})')
  grid = int(shapes.config_from(cfg.data).grid)
  drawn, reference = np.concatenate(drawn), np.concatenate(reference)
  return {'pipeline': recognise.match_rates(drawn, objects, grid=grid),
          'reference': recognise.match_rates(reference, objects, grid=grid),
          'signal_first': first_hits / n, 'signal_exact': exact_hits / n, 'condition_mse': sq_err / n,
          'examples': n, 'samples': {'drawn': drawn[:SAMPLES], 'reference': reference[:SAMPLES],
                                     'captions': captions[:SAMPLES]}}


SAMPLES = 8   # pictures kept for the sample grid


def samples_png(samples: dict, scale: int = 4) -> bytes:
  """A PNG grid (PIL, nearest-neighbour upscaled by `scale`): per caption a column, the pipeline's picture over
  the reference's, 2 px apart on white. The captions, in column order, are samples['captions']."""
  import io

  from PIL import Image

  drawn, reference = np.asarray(samples['drawn']), np.asarray(samples['reference'])
  n, s, gap = len(drawn), drawn.shape[1] * scale, 2
  canvas = np.full((2 * s + 3 * gap, n * (s + gap) + gap, 3), 255, np.uint8)
  for j in range(n):
    for i, image in enumerate((drawn[j], reference[j])):
      y, x = gap + i * (s + gap), gap + j * (s + gap)
      canvas[y:y + s, x:x + s] = np.repeat(np.repeat(image, scale, 0), scale, 1)
  buf = io.BytesIO()
  Image.fromarray(canvas).save(buf, format='PNG')
  return buf.getvalue()
