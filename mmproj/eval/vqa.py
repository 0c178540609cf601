"""Evaluation in a procedural world (mmproj/data/worlds.py): greedy-decoded answers scored by exact match per question family, and the
teacher-forced caption loss (mean NLL per caption token)."""
from __future__ import annotations

import collections
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmproj.eval.generate import generate_tokens

MODEL_INPUTS = ('image', 'audio', 'video', 'tokens', 'positions', 'input_mask')


def fetch(x) -> np.ndarray:
  """A (possibly multi-process, batch-sharded) jax array -> the whole value as numpy on every process."""
  if jax.process_count() > 1 and not x.is_fully_addressable:
    if x.sharding.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def _to_device(batch: dict, sharding) -> dict[str, jax.Array]:
  return {k: jax.device_put(np.asarray(batch[k]), sharding) for k in MODEL_INPUTS if k in batch}


def vqa_accuracy(setup, params, tokenizer, *, split: str = 'test', batch_size: int = 250,
                 max_new_tokens: int = 6, max_examples: int | None = None) -> dict[str, Any]:
  """Exact-match accuracy overall and per family, as fractions in [0, 1]."""
  from mmproj.data import pipeline, worlds

  cfg = setup.cfg
  eos_id = tokenizer.token_to_id('<eos>')
  correct, total = collections.Counter(), collections.Counter()
  with jax.set_mesh(setup.mesh):
    for batch in pipeline.qa_eval_batches(cfg.data, tokenizer, num_image_tokens=setup.num_image_tokens,
                                          batch_size=batch_size, split=split, max_examples=max_examples):
      ids = fetch(generate_tokens(setup.model, params, _to_device(batch, setup.batch_sharding),
                                  max_new_tokens=max_new_tokens, eos_id=eos_id))
      for row, valid in enumerate(batch['valid']):
        if not valid:
          continue
        family = str(batch['family'][row])
        hit = pipeline.decode(tokenizer, ids[row]) == str(batch['answer'][row])
        correct[family] += hit
        total[family] += 1
  result = {'overall': sum(correct.values()) / max(sum(total.values()), 1)}
  for family in worlds.world(cfg.data).families(cfg.data):
    result[family] = correct[family] / total[family] if total[family] else float('nan')
  return result


def caption_loss(setup, params, tokenizer, *, split: str = 'test', batch_size: int = 250,
                 max_examples: int | None = None) -> float:
  from mmproj.data import pipeline

  @jax.jit
  def summed_nll(params, batch, targets, mask):
    logits = setup.model.apply({'params': params}, batch, deterministic=True)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return (nll * mask).sum(), mask.sum()

  nll_sum, count = 0.0, 0.0
  with jax.set_mesh(setup.mesh):
    for batch in pipeline.caption_eval_batches(setup.cfg.data, tokenizer, num_image_tokens=setup.num_image_tokens,
                                               batch_size=batch_size, split=split, max_examples=max_examples):
      mask = np.asarray(batch['loss_mask'], np.float32) * np.asarray(batch['valid'], np.float32)[:, None]
      s, n = map(fetch, summed_nll(params, _to_device(batch, setup.batch_sharding),
                                       jax.device_put(np.asarray(batch['targets']), setup.batch_sharding),
                                       jax.device_put(mask, setup.batch_sharding)))
      nll_sum, count = nll_sum + float(s), count + float(n)
  return nll_sum / max(count, 1.0)
