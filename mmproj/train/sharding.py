"""Device mesh and the logical-axis rules that place every parameter and batch on it.

Params name their axes logically ('embed', 'mlp', 'heads', ...; see mmproj/layers). The rules below map those
names onto the three mesh axes:
  data   — pure data parallelism (params replicated)
  fsdp   — data parallelism that also shards params and optimizer state along 'embed'
  tensor — Megatron-style tensor parallelism over heads, MLP hidden and vocab
The rules live in the config (`cfg.sharding_rules`) so an experiment can change them; these are the defaults.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')

DEFAULT_RULES = (
    ('batch', ('data', 'fsdp')),
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('vocab', 'tensor'),
    ('head_dim', None),
    ('norm', None),
    ('pos', None),
    ('patch', None),
    ('layers', None),
    # Activations: batch over the data-parallel axes, hidden units / heads / vocab over 'tensor', sequence and
    # model width unsharded (no sequence parallelism).
    ('act_batch', ('data', 'fsdp')),
    ('act_seq', None),
    ('act_embed', None),
    ('act_mlp', 'tensor'),
    ('act_heads', 'tensor'),
    ('act_vocab', 'tensor'),
)


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, ...]:
  """Resolves `cfg.mesh` ({data, fsdp, tensor}; one of them may be -1 = the rest) against the device count."""
  unknown = set(mesh_cfg.keys()) - set(MESH_AXES)
  if unknown:
    raise ValueError(f'mesh: unknown axis {sorted(unknown)}; the mesh axes are {MESH_AXES}')
  missing = [a for a in MESH_AXES if a not in mesh_cfg]
  if missing:
    raise ValueError(f'mesh: no size for axis {missing} (give each of {MESH_AXES}, 1 for unused)')
  sizes = {axis: int(mesh_cfg[axis]) for axis in MESH_AXES}
  free = [a for a, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise ValueError(f'mesh: only one axis may be -1, got {free}')
  for axis, size in sizes.items():
    if size == 0 or size < -1:
      raise ValueError(f'mesh.{axis}={size}: sizes must be positive (or -1 for "the remaining devices")')
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if num_devices % fixed:
      raise ValueError(f'mesh: the fixed axes ({fixed} devices) do not divide the {num_devices} devices')
    sizes[free[0]] = num_devices // fixed
  if math.prod(sizes.values()) != num_devices:
    shown = ' x '.join(f'{a}={s}' for a, s in sizes.items())
    raise ValueError(f'mesh: {shown} needs {math.prod(sizes.values())} devices but {num_devices} are present')
  return tuple(sizes[a] for a in MESH_AXES)


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(mesh_cfg, len(devices))
  axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if devices == list(jax.devices()):
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=axis_types)


def rules_from_config(cfg) -> tuple:
  rules = cfg.sharding_rules
  if rules is None:
    return DEFAULT_RULES
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
  """Leading (batch) dimension split over the data-parallel axes; the rest replicated."""
  return NamedSharding(mesh, nn.logical_to_mesh_axes(('batch',), rules))


def check_batch_divisible(global_batch: int, mesh: Mesh, rules, field: str = 'train.batch_size') -> None:
  spec = nn.logical_to_mesh_axes(('batch',), rules)[0]
  axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
  ways = math.prod(mesh.shape[a] for a in axes)
  if global_batch % ways:
    raise ValueError(f'{field}={global_batch} is not divisible by the {ways}-way batch sharding '
                     f'(mesh axes {axes} = {[mesh.shape[a] for a in axes]})')
  if global_batch % jax.process_count():
    raise ValueError(f'{field}={global_batch} is not divisible by the {jax.process_count()} processes')


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
  """Drops mesh axes from dims they do not divide (tiny test models): those dims are replicated instead."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    ways = math.prod(mesh.shape[a] for a in names)
    fitted.append(axes if names and dim % ways == 0 else None)
  return P(*fitted)


def logical_to_shardings(boxed_abstract: Any, mesh: Mesh, rules) -> Any:
  """NamedSharding for every leaf of a tree of (possibly) logically-boxed abstract values."""
  logical = nn.get_partition_spec(boxed_abstract)
  unboxed = nn.unbox(boxed_abstract)

  def to_sharding(spec, leaf):
    mesh_spec = nn.logical_to_mesh_axes(tuple(spec), rules) if spec else P()
    return NamedSharding(mesh, _fit(mesh_spec, tuple(leaf.shape), mesh))

  return jax.tree.map(to_sharding, logical, unboxed, is_leaf=lambda x: isinstance(x, P))
