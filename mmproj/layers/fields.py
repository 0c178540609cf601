"""Checks of config fields that modules share: each returns the value, or raises ValueError naming the field (its
full dotted path, e.g. 'model.projector.depth') and what it must be. The registries wrap them with their prefix."""
import numbers
from typing import Any


def check_int(field: str, value: Any, minimum: int = 1, *, optional: bool = False) -> int | None:
  """value, an int >= minimum (bool is not; None only when optional)."""
  if value is None and optional:
    return None
  if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
    allowed = 'None or an int' if optional else 'an int'
    raise ValueError(f'{field} must be {allowed} >= {minimum}, got {value!r}')
  return value


def check_choice(field: str, value: Any, choices: Any, *, optional: bool = False) -> Any:
  """value, one of choices (None only when optional); the error lists the choices."""
  if value is None and optional:
    return None
  if value not in choices:
    shown = list(choices) if isinstance(choices, (tuple, list)) else sorted(choices)
    raise ValueError(f'{field}={value!r} is not one of {shown}')
  return value


def check_positive(field: str, value: Any, *, optional: bool = False) -> float | None:
  """value, a number > 0 (bool is not; None only when optional)."""
  if value is None and optional:
    return None
  if not isinstance(value, numbers.Real) or isinstance(value, bool) or not value > 0:
    allowed = 'None or a number' if optional else 'a number'
    raise ValueError(f'{field} must be {allowed} > 0, got {value!r}')
  return value


def check_rate(field: str, value: Any) -> float:
  """value, a dropout rate: a number in [0, 1) (bool is not)."""
  if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0.0 <= value < 1.0:
    raise ValueError(f'{field} must be a number in [0, 1), got {value!r}')
  return value
