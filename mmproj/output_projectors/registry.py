"""The output-projector registry (name -> module class), building an output projector from its config, and the
checks its fields share. mmproj/output_projectors/__init__.py describes the interface.

It mirrors mmproj/projectors/registry.py (the input side) but is its own: packages of one import rank may not
import each other, and its errors name model.output.projector.<field>. The field checks are mmproj/layers/fields.py's.
"""
import dataclasses
from typing import Any, Callable

import jax.numpy as jnp

from mmproj.layers import fields

REGISTRY: dict[str, type] = {}

FIELD = 'model.output.projector'   # the config path every error names
# cfg keys handled by the registry itself rather than passed to the projector class: the sizes are build()'s
# arguments (the LM width, the number of signal tokens, the generator's conditioning length and width).
_SIZES = ('in_dim', 'num_signal_tokens', 'out_len', 'out_dim')
_RESERVED = ('name',) + _SIZES
_SIZE_SOURCES = {'in_dim': 'the LM width', 'num_signal_tokens': 'the number of signal tokens',
                 'out_len': "the generator's conditioning length", 'out_dim': "the generator's conditioning width"}


def check_int(key: str, value: Any, minimum: int = 1, *, optional: bool = False) -> int | None:
  """value, an int >= minimum (bool is not; None only when optional); ValueError naming model.output.projector.<key>."""
  return fields.check_int(f'{FIELD}.{key}', value, minimum, optional=optional)


def check_choice(key: str, value: Any, choices: Any) -> Any:
  """value, one of choices; ValueError naming model.output.projector.<key> and the choices."""
  return fields.check_choice(f'{FIELD}.{key}', value, choices)


def check_positive(key: str, value: Any) -> float:
  """value, a number > 0 (bool is not); ValueError naming model.output.projector.<key>."""
  return fields.check_positive(f'{FIELD}.{key}', value)


def check_rate(key: str, value: Any) -> float:
  """value, a dropout rate: a number in [0, 1) (bool is not); ValueError naming model.output.projector.<key>."""
  return fields.check_rate(f'{FIELD}.{key}', value)


def register(name: str) -> Callable[[type], type]:
  """Class decorator: `@register('mlp') class MLPOutputProjector(nn.Module): ...`."""
  def decorator(cls: type) -> type:
    if name in REGISTRY:
      raise ValueError(f'output projector {name!r} is already registered ({REGISTRY[name].__name__})')
    REGISTRY[name] = cls
    return cls
  return decorator


def get(name: str) -> type:
  """Output-projector class for `name`; ValueError naming model.output.projector.name and the known names."""
  if name not in REGISTRY:
    raise ValueError(f'unknown {FIELD}.name {name!r}; known output projectors: {sorted(REGISTRY)}')
  return REGISTRY[name]


def instantiate(cfg: Any, in_dim: int | None = None, num_signal_tokens: int | None = None,
                out_len: int | None = None, out_dim: int | None = None, dtype: Any = jnp.float32,
                **module_kwargs) -> Any:
  """The output-projector module cfg describes, its fields unchecked (`validate` checks them); unknown keys ->
  ValueError naming the first. cfg's reserved keys are dropped: the sizes are the arguments. module_kwargs (name,
  parent) go to the module; parent=None for a module built only for its methods."""
  cls = get(cfg['name'])
  fields = {f.name for f in dataclasses.fields(cls)} - set(_SIZES) - {'dtype', 'parent', 'name'}
  hparams = {k: v for k, v in dict(cfg).items() if k not in _RESERVED}
  unknown = sorted(set(hparams) - fields)
  if unknown:
    raise ValueError(f'unknown field(s) {FIELD}.{unknown[0]} for output projector {cfg["name"]!r} '
                     f'(all unknown: {unknown}); it accepts: {sorted(fields)}')
  return cls(in_dim=in_dim, num_signal_tokens=num_signal_tokens, out_len=out_len, out_dim=out_dim, dtype=dtype,
             **hparams, **module_kwargs)


def validate(cfg: Any, in_dim: int, num_signal_tokens: int, out_len: int, out_dim: int) -> None:
  """Checks name, the sizes (ints >= 1, matching any the cfg states) and the family's own fields; ValueError
  naming the field."""
  get(cfg['name'])
  for key, actual in zip(_SIZES, (in_dim, num_signal_tokens, out_len, out_dim)):
    check_int(key, actual)
    given = cfg.get(key)
    if given is not None and given != actual:
      raise ValueError(f'{FIELD}.{key}={given!r} does not match {_SIZE_SOURCES[key]} {actual}')
  instantiate(cfg, in_dim, num_signal_tokens, out_len, out_dim, parent=None).check()


def build(cfg: Any, in_dim: int, num_signal_tokens: int, out_len: int, out_dim: int, dtype: Any = jnp.float32):
  """cfg.model.output.projector -> output-projector module (params float32, compute in `dtype`)."""
  validate(cfg, in_dim, num_signal_tokens, out_len, out_dim)
  return instantiate(cfg, in_dim, num_signal_tokens, out_len, out_dim, dtype)


def param_count(cfg: Any, in_dim: int, num_signal_tokens: int, out_len: int, out_dim: int) -> int:
  """The output projector's documented parameter-count formula."""
  return instantiate(cfg, in_dim, num_signal_tokens, out_len, out_dim, parent=None).param_count()
