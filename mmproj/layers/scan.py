"""Memory levers for deep stacks of identical blocks: rematerialisation (`model.remat`) and layer scanning
(`model.lm.scan_layers`, `model.encoder.scan_layers`).

Remat policies (`model.remat`, or `model.lm.remat` / `model.encoder.remat` for one tower, which take precedence;
each transformer block is wrapped in `nn.remat` with the policy; the ladder goes from most memory / least recompute
to least memory / most recompute):
  'none'     no rematerialisation: the backward pass reads every residual autodiff kept from the forward pass.
  'dots'     jax.checkpoint_policies.dots_saveable: keep the output of every matmul in the block (q/k/v/o and
             gate/up/down projections, and the attention scores [B, H, T, S] and weighted sums); recompute only
             elementwise work (norms, RoPE, activations, softmax).
  'minimal'  jax.checkpoint_policies.dots_with_no_batch_dims_saveable (MaxText's 'minimal'): keep only the outputs
             of the parameter matmuls (projections, MLP); also recompute the attention scores and their softmax,
             the O(T^2) tensors, so memory stays linear in T.
  'full'     jax.checkpoint_policies.nothing_saveable: keep only each block's input; the backward pass reruns the
             whole block forward (about one more forward pass of compute).
Remat changes neither the function nor its gradient (recomputation repeats the same ops; XLA may fuse them
differently, ~1e-6 relative in float32), only what is kept between the forward and the backward pass. The forward alone (inference, prefill, decode) is unaffected.

Scanned layers (`scan_blocks`): the `depth` blocks run as one `nn.scan` over a block whose params carry a leading
layer axis, so the compiled program holds one block body instead of `depth` copies (program size, and so compile
time, independent of depth). Params of the stack live under one name, e.g. `layers`:
  unscanned  layers_0/self_attn/q_proj/kernel [D, H, Dh] ... layers_{n-1}/...   (logical ('embed', 'heads', ...))
  scanned    layers/self_attn/q_proj/kernel   [n, D, H, Dh]                    (logical ('layers', 'embed', ...))
Layer i of the scanned tree is `leaf[i]` of every leaf; mmproj.convert.stack_layers / unstack_layers map between
the two layouts. The logical axis 'layers' maps to no mesh axis by default (mmproj/train/sharding.py), so every
device holds all layers of its shard. A sown 'intermediates' collection is stacked the same way.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

REMAT_POLICIES = {
    'none': None,
    'dots': jax.checkpoint_policies.dots_saveable,
    'minimal': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    'full': jax.checkpoint_policies.nothing_saveable,
}
LAYERS_AXIS = 'layers'    # logical name of the leading axis of scanned params


def check_remat(value: Any, field: str = 'model.remat') -> str:
  """The remat policy name, or ValueError naming `field` when it is not one of REMAT_POLICIES."""
  if not isinstance(value, str) or value not in REMAT_POLICIES:
    raise ValueError(f'{field}={value!r} is not one of {list(REMAT_POLICIES)}')
  return value


def check_scan(value: Any, field: str) -> bool:
  """`value` as a bool, or ValueError naming `field` when it is not a bool."""
  if not isinstance(value, bool):
    raise ValueError(f'{field}={value!r} must be True or False')
  return value


def remat_block(block_cls: type[nn.Module], remat: str, *, scanned: bool = False,
                field: str = 'model.remat') -> type[nn.Module]:
  """block_cls wrapped in nn.remat with the named policy ('none': block_cls itself).

  The wrapped block keeps its parameter names and call signature (pass array/None arguments positionally; none is
  static). Under nn.scan the loop already stops XLA from merging recomputation with the forward pass, so
  prevent_cse is switched off there (`scanned=True`).
  """
  if check_remat(remat, field) == 'none':
    return block_cls
  return nn.remat(block_cls, policy=REMAT_POLICIES[remat], prevent_cse=not scanned)


def scan_blocks(block_cls: type[nn.Module], length: int, *, in_axes: Any = (), remat: str = 'none',
                field: str = 'model.remat') -> type[nn.Module]:
  """A module class running `length` copies of block_cls as one nn.scan (params stacked on a leading 'layers' axis).

  block_cls.__call__(carry, *xs) must return (carry, y): carry (e.g. the residual stream [B, T, D]) goes from layer
  to layer, each argument of xs is sliced per layer (in_axes 0, e.g. this layer's KV cache from [layers, ...]) or
  broadcast to every layer (in_axes nn.broadcast, e.g. the mask), and the per-layer y come back stacked on axis 0
  ([layers, ...]). Instantiate the result with block_cls's fields, then call it like one block:
      stack = scan_blocks(Block, depth, in_axes=(nn.broadcast,))(width, name='layers')
      x, ys = stack(x, mask)
  Each layer's params get their own init key (split_rngs params), so a scanned init differs from an unscanned
  one in value (not in distribution).
  """
  if length < 1:
    raise ValueError(f'scan_blocks needs at least one block, got length={length}')
  body = remat_block(block_cls, remat, scanned=True, field=field)
  return nn.scan(body, variable_axes={'params': 0, 'intermediates': 0}, split_rngs={'params': True, 'dropout': True},
                 in_axes=in_axes, length=length, metadata_params={nn.PARTITION_NAME: LAYERS_AXIS})
