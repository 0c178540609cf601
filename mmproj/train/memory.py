"""How much memory a run needs per device: the train state from the sharding rules, and XLA's own analysis of the
compiled step.

  python -m mmproj.train.memory configs/llava15_stage2.py --mesh fsdp=64 [--batch 128]     # no devices needed

prints, for that topology, each part's (encoder / projector / lm) parameter and optimizer-state bytes per device,
from the abstract train state (jax.eval_shape: nothing is materialised) and the config's logical sharding rules
placed on a `jax.sharding.AbstractMesh` of the requested shape. Activation memory depends on the compiled
program; the trainer prints `format_compiled_memory` of the real step at start-up.
"""
from __future__ import annotations

import argparse
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmproj import model as model_lib
from mmproj.train import sharding as shard_lib
from mmproj.train import state as state_lib


def abstract_mesh(mesh_cfg: Any, num_devices: int) -> jax.sharding.AbstractMesh:
  """An AbstractMesh with the config's axes resolved against `num_devices` (no devices needed)."""
  return jax.sharding.AbstractMesh(shard_lib.mesh_shape(mesh_cfg, num_devices), shard_lib.MESH_AXES)


def _bytes_per_device(tree: Any) -> dict[str, int]:
  """{top-level key: bytes of its leaves' per-device shards} for a tree of ShapeDtypeStructs with shardings."""
  out: dict[str, int] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    keys = [str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path]
    part = next((k for k in keys if k in ('encoder', 'projector', 'lm')), 'other')
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    out[part] = out.get(part, 0) + math.prod(shape) * np.dtype(leaf.dtype).itemsize
  return out


def state_memory(cfg, num_devices: int, mesh_cfg: Any = None) -> dict[str, dict[str, int]]:
  """Per-device bytes of params and optimizer state by part, for cfg on `num_devices` devices laid out as
  `mesh_cfg` (default cfg.mesh). -> {'params': {part: bytes}, 'opt_state': {part: bytes}}."""
  mesh = abstract_mesh(mesh_cfg if mesh_cfg is not None else cfg.mesh, num_devices)
  s = state_lib.setup(cfg, mesh=mesh)
  return {'params': _bytes_per_device(s.abstract_state.params),
          'opt_state': _bytes_per_device(s.abstract_state.opt_state)}


def _gib(n: float) -> str:
  return f'{n / 2**30:8.2f} GiB'


def format_state_memory(mem: dict[str, dict[str, int]]) -> str:
  parts = [p for p in ('encoder', 'projector', 'lm', 'other')
           if mem['params'].get(p, 0) or mem['opt_state'].get(p, 0)]
  lines = [f'{"part":<10} {"params":>12} {"opt state":>12}']
  for p in parts:
    lines.append(f'{p:<10} {_gib(mem["params"].get(p, 0)):>12} {_gib(mem["opt_state"].get(p, 0)):>12}')
  total_p, total_o = sum(mem['params'].values()), sum(mem['opt_state'].values())
  lines.append(f'{"total":<10} {_gib(total_p):>12} {_gib(total_o):>12}   (params + opt state: '
               f'{_gib(total_p + total_o).strip()} per device)')
  return '\n'.join(lines)


def format_compiled_memory(compiled) -> str:
  """One line from XLA's memory analysis of a compiled step (per device): arguments, outputs, temporaries,
  generated code, and the peak estimate arguments + outputs - aliased + temporaries."""
  m = compiled.memory_analysis()
  if m is None:
    return 'compiled step memory: not reported by this backend'
  args, out, temp = m.argument_size_in_bytes, m.output_size_in_bytes, m.temp_size_in_bytes
  alias = getattr(m, 'alias_size_in_bytes', 0)
  code = getattr(m, 'generated_code_size_in_bytes', 0)
  peak = args + out - alias + temp
  return (f'compiled step memory per device: arguments {_gib(args).strip()}, outputs {_gib(out).strip()} '
          f'(aliased {_gib(alias).strip()}), temporaries {_gib(temp).strip()}, code {_gib(code).strip()}; '
          f'peak ~{_gib(peak).strip()}')


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('config', help='config file, optionally with :ARG')
  parser.add_argument('--mesh', default='', help='e.g. data=2,fsdp=64,tensor=2 (one axis may be -1); '
                      'default: the config\'s mesh')
  parser.add_argument('--devices', type=int, default=None,
                      help='number of devices (default: the product of --mesh, which must then have no -1)')
  parser.add_argument('--batch', type=int, default=None, help='override train.batch_size')
  args = parser.parse_args(argv)

  from mmproj.config_lib import load_config_file
  cfg = load_config_file(args.config)
  mesh_cfg = dict(cfg.mesh)
  if args.mesh:
    mesh_cfg = {'data': 1, 'fsdp': 1, 'tensor': 1}
    for item in args.mesh.split(','):
      key, _, value = item.partition('=')
      if key not in shard_lib.MESH_AXES or not value.lstrip('-').isdigit():
        raise SystemExit(f'--mesh: bad entry {item!r}; expected axis=size with axis in {shard_lib.MESH_AXES}')
      mesh_cfg[key] = int(value)
  devices = args.devices
  if devices is None:
    if any(v == -1 for v in mesh_cfg.values()):
      raise SystemExit('--devices is needed when the mesh has a -1 axis')
    devices = math.prod(mesh_cfg.values())
  if args.batch is not None:
    cfg.train.batch_size = args.batch
  mem = state_memory(cfg, devices, mesh_cfg)
  shape = dict(zip(shard_lib.MESH_AXES, shard_lib.mesh_shape(mesh_cfg, devices)))
  stored = ', '.join(f'{tower} {jnp.dtype(dtype).name}' for tower, dtype in model_lib.param_dtypes(cfg.model).items())
  print(f'{args.config}: {devices} devices, mesh {shape}, batch {cfg.train.batch_size}, model.dtype '
        f'{cfg.model.dtype}, params stored as: {stored} (model.param_dtype)')
  print(format_state_memory(mem))


if __name__ == '__main__':
  main()
