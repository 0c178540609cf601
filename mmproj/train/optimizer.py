"""AdamW with warmup + cosine decay, and which parameters train at all.

`cfg.train.trainable` / `cfg.train.frozen` are lists of regular expressions matched (re.fullmatch) against a
parameter's path, e.g. 'encoder/.*' or 'lm/block_0/.*'. A parameter trains when it matches a trainable pattern
and no frozen pattern. Frozen parameters go through `optax.set_to_zero()`, which keeps no state, so they cost no
optimizer memory.
"""
from __future__ import annotations

import re
from typing import Any

import jax
import optax


def path_str(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)


def trainable_labels(params: Any, train_cfg) -> Any:
  """'train' or 'freeze' per leaf, from the config's path patterns."""
  trainable = [re.compile(p) for p in train_cfg.trainable]
  frozen = [re.compile(p) for p in train_cfg.frozen]

  def label(path, _):
    name = path_str(path)
    keep = any(p.fullmatch(name) for p in trainable) and not any(p.fullmatch(name) for p in frozen)
    return 'train' if keep else 'freeze'

  return jax.tree_util.tree_map_with_path(label, params)


def is_frozen(labels: Any, prefix: str) -> bool:
  """True when every parameter under `prefix` (e.g. 'encoder') is frozen (False if there are none)."""
  found = [lab for path, lab in jax.tree_util.tree_flatten_with_path(labels)[0]
           if path_str(path).split('/')[0] == prefix]
  return bool(found) and all(lab == 'freeze' for lab in found)


def learning_rate_schedule(train_cfg) -> optax.Schedule:
  steps = int(train_cfg.steps)
  warmup = min(int(train_cfg.warmup_steps), max(steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=float(train_cfg.learning_rate), warmup_steps=warmup,
      decay_steps=max(steps, warmup + 1), end_value=float(train_cfg.learning_rate) * train_cfg.end_lr_frac)


def _decay_mask(params):
  # No weight decay on norms, biases and other vectors.
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(train_cfg, labels: Any) -> optax.GradientTransformation:
  adamw = optax.adamw(learning_rate_schedule(train_cfg), b1=train_cfg.b1, b2=train_cfg.b2,
                      weight_decay=train_cfg.weight_decay, mask=_decay_mask)
  chain = [optax.clip_by_global_norm(train_cfg.grad_clip)] if train_cfg.grad_clip else []
  trained = optax.chain(*chain, adamw)
  return optax.multi_transform({'train': trained, 'freeze': optax.set_to_zero()}, labels)
