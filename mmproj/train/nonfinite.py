"""train.on_nonfinite: what a step with a NaN/Inf loss or trained-parameter gradient does.

  'skip' (default)  the step applies no update and is counted (state.nonfinite_steps); the next log line warns.
  'stop'            the same, and state.halted_at records the step; every later step leaves the state as it is
                    (step counter included). The host looks at the state at each log and save point: it then saves
                    the last good state with the data position before the bad batch, and raises NonFiniteError.

`apply_if_finite` is the device side (inside the jitted step); `Guard` the host side (the loop's batches and its
log/save points): it remembers, in 'stop' mode, the data iterator's position before each recent batch, since the
host may be a few batches past the bad one when it looks.
"""
from __future__ import annotations

import collections
from typing import Any, Callable

import jax
import jax.numpy as jnp

from mmproj.train.state import NONFINITE_POLICIES, TrainState


class NonFiniteError(RuntimeError):
  """train.on_nonfinite='stop' met a NaN/Inf loss or gradient; the last good state is saved."""


def apply_if_finite(state: TrainState, params: Any, opt_state: Any, finite: jax.Array, trainable: Any,
                    policy: str) -> TrainState:
  """The next train state: the updated params and optimizer state when `finite` (and not halted), else the old
  ones, with the counters advanced. Frozen leaves keep the old array outright (no select over a frozen LM)."""
  halted = state.halted_at > 0
  apply = finite & ~halted
  params = jax.tree.map(lambda t, new, old: jnp.where(apply, new, old) if t else old, trainable, params,
                        state.params)
  opt_state = jax.tree.map(lambda new, old: jnp.where(apply, new, old), opt_state, state.opt_state)
  bad = (~finite & ~halted).astype(jnp.int32)
  if policy == 'stop':
    return TrainState(step=jnp.where(apply, state.step + 1, state.step), params=params, opt_state=opt_state,
                      nonfinite_steps=state.nonfinite_steps + bad,
                      halted_at=jnp.where(halted, state.halted_at, bad * (state.step + 1)))
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                    nonfinite_steps=state.nonfinite_steps + bad, halted_at=state.halted_at)


class Guard:
  """The host side of the policy for one run of the loop."""

  def __init__(self, policy: str, data_iter, state: TrainState, *, lookback: int, log: Callable[[str], None],
               name: str = ''):
    if policy not in NONFINITE_POLICIES:
      raise ValueError(f'train.on_nonfinite={policy!r} must be one of {NONFINITE_POLICIES}')
    self.stop = policy == 'stop'
    self.data_iter = data_iter
    self.seen = int(jax.device_get(state.nonfinite_steps))
    self.positions = collections.deque(maxlen=lookback)   # (step, iterator state before that step's batch)
    self.log = log
    self.name = name

  def next_batch(self, step: int) -> dict:
    if self.stop:
      self.positions.append((step, self.data_iter.get_state()))
    return next(self.data_iter)

  def warn(self, step: int, nonfinite_steps: int) -> None:
    """After a log line: say how many steps since the last one were skipped."""
    if nonfinite_steps > self.seen:
      self.log(f'WARNING: {nonfinite_steps - self.seen} step(s) up to step {step} had non-finite loss or '
               f'gradients; their updates were skipped (train.on_nonfinite=skip; {nonfinite_steps} so far)')
      self.seen = nonfinite_steps

  def stop_if_halted(self, state: TrainState, manager, save: Callable[[int, TrainState], None],
                     where: str) -> None:
    """'stop' mode, at a log or save point: when the state halted, saves the last good step (unless a checkpoint
    of it exists) with the data position before the bad batch and no pending metrics, then raises."""
    if not self.stop:
      return
    halted_at = int(jax.device_get(state.halted_at))
    if not halted_at:
      return
    good = halted_at - 1                               # state.step stayed here since
    manager.wait_until_finished()
    saved = good in manager.all_steps()
    if not saved and good > 0:
      self.data_iter.set_state(dict(self.positions)[halted_at])
      save(good, state)
      manager.wait_until_finished()
      saved = True
    at = f'{where}/{good}' if saved else 'nowhere (no step was good)'
    raise NonFiniteError(f'{self.name}non-finite loss or gradients at step {halted_at} (train.on_nonfinite=stop): '
                         f'no update applied from there; the last good state (step {good}) is saved in {at}')
