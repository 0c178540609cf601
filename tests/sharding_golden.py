"""Golden shardings of the train step for simulated topologies: compiled ahead of time on 8 CPU devices.

  python tests/sharding_golden.py --update      # rewrites tests/golden/sharding_*.json (review the diff!)

`snapshot(topology)` builds the tiny experiment (tests/experiment_utils.tiny_experiment) on a mesh of
data x fsdp x tensor = topology, lowers and compiles the train step for the abstract train state and batch, and
records the PartitionSpec of every parameter, optimizer-state leaf and batch input that the *compiled* step
takes, plus the compiled step's output shardings of the params. tests/test_sharding.py compares them with the
stored files, so a change of the sharding rules, of a parameter's logical axes or of what XLA accepts shows up as
a reviewed diff.
"""
from __future__ import annotations

import json
import os
import sys

TOPOLOGIES = {'2x2x2': dict(data=2, fsdp=2, tensor=2), '8x1x1': dict(data=8, fsdp=1, tensor=1),
              '1x4x2': dict(data=1, fsdp=4, tensor=2)}
GOLDEN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'golden')


def _spec(sharding) -> str:
  return str(tuple(sharding.spec))


def snapshot(name: str) -> dict:
  import jax
  import jax.numpy as jnp

  from experiment_utils import tiny_experiment
  from mmproj.train import memory, optimizer, trainer

  cfg = tiny_experiment('/nonexistent')            # compiling needs no data
  cfg.mesh = TOPOLOGIES[name]
  s = trainer.setup(cfg)
  step = trainer.make_train_step(s)
  batch = dict(trainer.dummy_batch(cfg, int(cfg.train.batch_size)))
  b, length = batch['tokens'].shape
  batch.update(targets=jax.ShapeDtypeStruct((b, length), jnp.int32),
               loss_mask=jax.ShapeDtypeStruct((b, length), jnp.float32),
               segment_ids=jax.ShapeDtypeStruct((b, length), jnp.int32))
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s.batch_sharding) for k, v in batch.items()}
  with jax.set_mesh(s.mesh):
    compiled = step.lower(s.abstract_state, batch, jax.random.key(0)).compile()
  state_in, batch_in, _ = compiled.input_shardings[0]
  state_out, _ = compiled.output_shardings

  def specs(tree):
    return {optimizer.path_str(p): _spec(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}

  return {'mesh': TOPOLOGIES[name],
          'params': specs(state_in.params),
          'opt_state': specs(state_in.opt_state),
          'batch': specs(batch_in),
          'params_out': specs(state_out.params),
          'memory': memory.format_compiled_memory(compiled)}


def golden_path(name: str) -> str:
  return os.path.join(GOLDEN_DIR, f'sharding_{name}.json')


if __name__ == '__main__':
  os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  names = [a for a in sys.argv[1:] if not a.startswith('--')] or list(TOPOLOGIES)
  result = {n: snapshot(n) for n in names}
  if '--update' in sys.argv:
    os.makedirs(GOLDEN_DIR, exist_ok=True)
    for n, snap in result.items():
      snap = {k: v for k, v in snap.items() if k != 'memory'}
      with open(golden_path(n), 'w') as f:
        json.dump(snap, f, indent=1, sort_keys=True)
        f.write('\n')
      print(f'wrote {golden_path(n)}')
  else:
    print(json.dumps(result))
