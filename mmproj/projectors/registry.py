"""The projector registry (name -> module class), building a projector from its config, and the checks its
fields share. mmproj/projectors/__init__.py describes the interface."""
import dataclasses
from typing import Any, Callable

import jax.numpy as jnp

from mmproj.layers import fields

REGISTRY: dict[str, type] = {}
# name -> the media the family was published for ('image' | 'audio' | 'video'); the zoo of that modality lists it
# (configs/scenes.py and configs/zoo.py, configs/audio_tones.py, configs/video_motion.py). Other media may still
# fit its math (mmproj/projectors/__init__.py says which families take 1-D audio grids).
MODALITY: dict[str, str] = {}

# cfg keys handled by the registry itself rather than passed to the projector class.
_RESERVED = ('name', 'in_dim', 'out_dim')


def check_int(key: str, value: Any, minimum: int = 1, *, optional: bool = False) -> int | None:
  """value, an int >= minimum (bool is not; None only when optional); ValueError naming model.projector.<key>."""
  return fields.check_int(f'model.projector.{key}', value, minimum, optional=optional)


def check_choice(key: str, value: Any, choices: Any, *, optional: bool = False) -> Any:
  """value, one of choices (None only when optional); ValueError naming model.projector.<key> and the choices."""
  return fields.check_choice(f'model.projector.{key}', value, choices, optional=optional)


def check_positive(key: str, value: Any, *, optional: bool = False) -> float | None:
  """value, a number > 0 (bool is not; None only when optional); ValueError naming model.projector.<key>."""
  return fields.check_positive(f'model.projector.{key}', value, optional=optional)


def register(name: str, modality: str = 'image') -> Callable[[type], type]:
  """Class decorator: `@register('mlp') class MLPProjector(nn.Module): ...`; `modality` as in MODALITY."""
  def decorator(cls: type) -> type:
    if name in REGISTRY:
      raise ValueError(f'projector {name!r} is already registered ({REGISTRY[name].__name__})')
    if modality not in ('image', 'audio', 'video'):
      raise ValueError(f'projector {name!r}: modality {modality!r} is not image, audio or video')
    REGISTRY[name] = cls
    MODALITY[name] = modality
    return cls
  return decorator


def get(name: str) -> type:
  """Projector class for `name`; ValueError naming model.projector.name and the known names otherwise."""
  if name not in REGISTRY:
    raise ValueError(f'unknown model.projector.name {name!r}; known projectors: {sorted(REGISTRY)}')
  return REGISTRY[name]


def instantiate(cfg: Any, in_dim: int | None = None, out_dim: int | None = None, dtype: Any = jnp.float32,
                **module_kwargs) -> Any:
  """The projector module cfg describes, its fields unchecked (`check()` checks them); unknown keys -> ValueError
  naming the first. cfg's reserved keys are dropped: the widths are the arguments (None where the caller has none:
  token counts need no widths). module_kwargs (name, parent) go to the module; parent=None for a module built only
  for its methods, so that it does not attach itself to a module under construction."""
  cls = get(cfg['name'])
  fields = {f.name for f in dataclasses.fields(cls)} - {'in_dim', 'out_dim', 'dtype', 'parent', 'name'}
  hparams = {k: v for k, v in dict(cfg).items() if k not in _RESERVED}
  unknown = sorted(set(hparams) - fields)
  if unknown:
    raise ValueError(f'unknown field(s) model.projector.{unknown[0]} for projector {cfg["name"]!r} '
                     f'(all unknown: {unknown}); it accepts: {sorted(fields)}')
  return cls(in_dim=in_dim, out_dim=out_dim, dtype=dtype, **hparams, **module_kwargs)


def validate(cfg: Any, in_dim: int, out_dim: int) -> None:
  """Checks name, optional in_dim/out_dim and the projector's own fields; ValueError naming the field."""
  get(cfg['name'])
  for key, actual in (('in_dim', in_dim), ('out_dim', out_dim)):
    given = cfg.get(key)
    if given is not None and given != actual:
      raise ValueError(f'model.projector.{key}={given} does not match the '
                       f'{"encoder" if key == "in_dim" else "LM"} width {actual}')
  instantiate(cfg, in_dim, out_dim, parent=None).check()


def build(cfg: Any, in_dim: int, out_dim: int, dtype: Any = jnp.float32):
  """cfg.model.projector -> projector module (params float32, compute in `dtype`)."""
  validate(cfg, in_dim, out_dim)
  return instantiate(cfg, in_dim, out_dim, dtype)


def num_output_tokens(cfg: Any, grid: tuple[int, ...]) -> int:
  """Number of tokens M the projector emits for an encoder grid (h, w), or (T,) for audio."""
  return instantiate(cfg, parent=None).num_output_tokens(tuple(grid))


def param_count(cfg: Any, in_dim: int, out_dim: int) -> int:
  """The projector's documented parameter-count formula."""
  return instantiate(cfg, in_dim, out_dim, parent=None).param_count()
