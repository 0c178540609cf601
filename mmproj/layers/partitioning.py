"""Activation sharding by logical axis names, usable from model code without a mesh.

Params name their axes logically through `nn.with_logical_partitioning` (flax); activations are pinned with
`constrain(x, 'act_batch', 'act_seq', 'act_embed')`. The rules that map those names to mesh axes belong to the
trainer (mmproj/train/sharding.py), which traces its step inside `activation_rules(rules)`; outside that context
(inference, tests, a single device) `constrain` does nothing.
"""
from __future__ import annotations

import contextlib
import contextvars

import flax.linen as nn

_ACTIVATION_RULES: contextvars.ContextVar = contextvars.ContextVar('mmproj_activation_rules', default=None)


@contextlib.contextmanager
def activation_rules(rules):
  """Within this context (a step being traced), `constrain` pins activations with `rules`.

  Not flax's own `nn.logical_axis_rules`: under that, flax's parameter shape check re-runs DenseGeneral's
  initializer, whose flattened kernel would be constrained with the unflattened kernel's axis names."""
  token = _ACTIVATION_RULES.set(tuple(rules))
  try:
    yield
  finally:
    _ACTIVATION_RULES.reset(token)


def constrain(x, *logical_axes: str | None):
  """Pins activation x to the mesh by logical axis names, with the rules of the enclosing `activation_rules`;
  a no-op outside that context."""
  rules = _ACTIVATION_RULES.get()
  if rules is None:
    return x
  return nn.with_logical_constraint(x, logical_axes, rules=rules)
