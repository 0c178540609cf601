"""What every converter shares: the converter registry, checked state-dict access (`StateDict`) and its
export-side twin (`ParamReader`), activation names, and stacking of scanned layers (mmproj/convert/__init__.py
tells how they fit together)."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

CONVERTERS: dict[str, Callable[[Any], tuple[Any, dict]]] = {}


def converter(*class_names: str) -> Callable:
  """Registers `fn(torch_module) -> (flax_module, params)` for the named transformers classes."""
  def decorator(fn: Callable) -> Callable:
    for name in class_names:
      if name in CONVERTERS:
        raise ValueError(f'a converter for {name} is already registered ({CONVERTERS[name].__name__})')
      CONVERTERS[name] = fn
    return fn
  return decorator


def from_transformers(module: Any) -> tuple[Any, dict]:
  """A transformers PyTorch module -> (flax module, params) computing the same function.

  Dispatches on the module's class (or the nearest base class with a converter); ValueError naming the class
  and the supported ones otherwise.
  """
  for cls in type(module).__mro__:
    if cls.__name__ in CONVERTERS:
      return CONVERTERS[cls.__name__](module)
  raise ValueError(f'no converter for {type(module).__name__}; supported transformers classes: '
                   f'{sorted(CONVERTERS)}')


class StateDict:
  """float32 numpy view of a state dict that checks every access.

  `take(key, shape)` returns the array and marks it used; a missing key or a wrong shape raises ValueError
  naming the key. `finish()` raises if any key was never taken, so a converter cannot silently drop weights.
  Linear weights come as torch (out, in): `kernel(prefix)` returns the flax (in, out) kernel.
  """

  def __init__(self, tensors: Mapping[str, Any], where: str = 'state dict'):
    self.where = where
    self._tensors = dict(tensors)
    self._used: set[str] = set()

  @classmethod
  def of(cls, module: Any) -> StateDict:
    """From a torch module's state_dict (tensors detached, cast to float32 numpy)."""
    return cls({k: v.detach().cpu().float().numpy() for k, v in module.state_dict().items()},
               where=type(module).__name__)

  def __contains__(self, key: str) -> bool:
    return key in self._tensors

  def keys(self) -> list[str]:
    return list(self._tensors)

  def take(self, key: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    if key not in self._tensors:
      raise ValueError(f'{self.where}: missing key {key!r}')
    value = np.asarray(self._tensors[key])
    if shape is not None and tuple(value.shape) != tuple(shape):
      raise ValueError(f'{self.where}: {key!r} has shape {tuple(value.shape)}, expected {tuple(shape)}')
    self._used.add(key)
    return value

  def kernel(self, prefix: str, in_dim: int | None = None, out_dim: int | None = None) -> np.ndarray:
    """`{prefix}.weight` (torch Linear, [out, in]) -> flax kernel [in, out]."""
    w = self.take(f'{prefix}.weight')
    if w.ndim != 2:
      raise ValueError(f'{self.where}: {prefix}.weight has shape {w.shape}, expected a 2-d Linear weight')
    expected = (out_dim if out_dim is not None else w.shape[0], in_dim if in_dim is not None else w.shape[1])
    if w.shape != expected:
      raise ValueError(f'{self.where}: {prefix}.weight has shape {w.shape}, expected {expected}')
    return w.T

  def dense(self, prefix: str, bias: bool = True) -> dict[str, np.ndarray]:
    """torch Linear at `prefix` -> {'kernel': [in, out], 'bias': [out]} (bias only when `bias`)."""
    out = {'kernel': self.kernel(prefix)}
    if bias:
      out['bias'] = self.take(f'{prefix}.bias', (out['kernel'].shape[1],))
    return out

  def norm(self, prefix: str, bias: bool = True) -> dict[str, np.ndarray]:
    """LayerNorm/RMSNorm at `prefix` -> {'scale', 'bias'} (bias only when `bias`)."""
    out = {'scale': self.take(f'{prefix}.weight')}
    if bias:
      out['bias'] = self.take(f'{prefix}.bias', out['scale'].shape)
    return out

  def unused(self) -> list[str]:
    return sorted(set(self._tensors) - self._used)

  def finish(self, ignore: tuple[str, ...] = ()) -> None:
    """ValueError naming the keys never taken (except those starting with a prefix in `ignore`)."""
    left = [k for k in self.unused() if not k.startswith(ignore)] if ignore else self.unused()
    if left:
      raise ValueError(f'{self.where}: {len(left)} unused key(s), first {left[0]!r}: {left[:8]}')


# HF activation (ACT2FN name or torch module class name) -> mmproj.layers.ACTIVATIONS key.
HF_ACTIVATIONS = {
    'gelu': 'gelu', 'GELUActivation': 'gelu',
    'gelu_pytorch_tanh': 'gelu_tanh', 'gelu_new': 'gelu_tanh', 'gelu_fast': 'gelu_tanh',
    'GELUTanh': 'gelu_tanh', 'NewGELUActivation': 'gelu_tanh', 'FastGELUActivation': 'gelu_tanh',
    'PytorchGELUTanh': 'gelu_tanh',
    'quick_gelu': 'quick_gelu', 'QuickGELUActivation': 'quick_gelu',
    'silu': 'silu', 'swish': 'silu', 'SiLUActivation': 'silu', 'SiLU': 'silu',
    'relu': 'relu', 'ReLU': 'relu',
}


def activation(act: Any, where: str = 'activation') -> str:
  """An HF activation (ACT2FN name string, or the module instance a transformers layer holds) -> mmproj
  activation name; ValueError naming `where` when mmproj has no exact equivalent."""
  if isinstance(act, str):
    name = act
  else:
    name = type(act).__name__
    if name == 'GELU':  # torch.nn.GELU
      name = 'gelu_pytorch_tanh' if getattr(act, 'approximate', 'none') == 'tanh' else 'gelu'
    elif name == 'GELUActivation' and getattr(act, 'act', None) is not None and 'python' in str(act.act):
      name = 'gelu'
  if name not in HF_ACTIVATIONS:
    raise ValueError(f'{where}: {name!r} has no mmproj equivalent; supported: {sorted(set(HF_ACTIVATIONS))}')
  return HF_ACTIVATIONS[name]


# mmproj activation -> the HF ACT2FN name an exporter writes (inverse of `activation` on the canonical names).
HF_ACTIVATION_NAMES = {'gelu': 'gelu', 'gelu_tanh': 'gelu_pytorch_tanh', 'quick_gelu': 'quick_gelu', 'silu': 'silu',
                       'relu': 'relu'}


def hf_activation(name: str, where: str = 'activation') -> str:
  """mmproj activation name -> HF ACT2FN name; ValueError naming `where` for a name HF does not have."""
  if name not in HF_ACTIVATION_NAMES:
    raise ValueError(f'{where}={name!r} has no HF equivalent; supported: {sorted(HF_ACTIVATION_NAMES)}')
  return HF_ACTIVATION_NAMES[name]


class ParamReader:
  """The export-side twin of `StateDict`: reads leaves of an mmproj params tree by '/'-joined path.

  `take(path, shape)` returns the leaf as float32 numpy and marks it used; a missing path or a wrong shape raises
  ValueError naming the path. `finish()` raises if a leaf was never taken, so an exporter cannot silently drop
  weights (e.g. gated cross-attention layers that the target format has no place for). Boxed leaves (flax
  logical-partitioning metadata) are unboxed; bf16 is widened to float32.
  """

  def __init__(self, tree: Mapping[str, Any], where: str = 'params'):
    self.where = where
    self._leaves: dict[str, Any] = {}
    self._used: set[str] = set()
    self._flatten(tree, '')

  def _flatten(self, tree: Any, path: str) -> None:
    if hasattr(tree, 'unbox'):
      tree = tree.unbox()
    if isinstance(tree, Mapping):
      for key, value in tree.items():
        self._flatten(value, f'{path}/{key}' if path else str(key))
    else:
      self._leaves[path] = tree

  def __contains__(self, path: str) -> bool:
    return path in self._leaves

  def take(self, path: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    if path not in self._leaves:
      raise ValueError(f'{self.where}: missing param {path!r}')
    value = np.asarray(self._leaves[path]).astype(np.float32)
    if shape is not None and tuple(value.shape) != tuple(shape):
      raise ValueError(f'{self.where}: {path!r} has shape {tuple(value.shape)}, expected {tuple(shape)}')
    self._used.add(path)
    return value

  def unused(self) -> list[str]:
    return sorted(set(self._leaves) - self._used)

  def finish(self) -> None:
    left = self.unused()
    if left:
      raise ValueError(f'{self.where}: {len(left)} param(s) with no place in the export, first {left[0]!r}: '
                       f'{left[:8]}')


def _unboxed(tree: Any) -> Any:
  """Drops flax logical-partitioning boxes (nn.Partitioned): their axis names would be stale after (un)stacking."""
  import jax
  return jax.tree.map(lambda x: x.unbox() if hasattr(x, 'unbox') else x, tree, is_leaf=lambda x: hasattr(x, 'unbox'))


def stack_layers(params: Mapping[str, Any], depth: int, prefix: str = 'layers_',
                 stacked_name: str = 'layers') -> dict:
  """Unscanned -> scanned layout of one subtree: {prefix0: t0, ..., prefix{depth-1}: t_{depth-1}, other: o} ->
  {stacked_name: tree of [depth, ...] leaves, other: o}.

  Every layer tree must have the same structure and shapes (ValueError naming the first differing layer), all of
  prefix0 .. prefix{depth-1} must be there and no other key may start with `prefix` (ValueError naming the key).
  Leaves are stacked with numpy (host arrays: jax arrays are fetched); boxes are dropped.
  """
  import jax

  params = dict(_unboxed(params))
  names = [f'{prefix}{i}' for i in range(depth)]
  missing = [n for n in names if n not in params]
  if depth < 1 or missing:
    raise ValueError(f'stack_layers: {missing[0] if missing else prefix + "0"!r} missing (depth={depth}); '
                     f'keys: {sorted(params)[:8]}')
  extra = sorted(k for k in params if k.startswith(prefix) and k not in names)
  if extra:
    raise ValueError(f'stack_layers: {extra[0]!r} is beyond depth={depth} (layers {prefix}0..{prefix}{depth - 1})')
  if stacked_name in params:
    raise ValueError(f'stack_layers: {stacked_name!r} is already in the params (already stacked?)')
  layers = [params.pop(n) for n in names]
  ref = jax.tree.structure(layers[0])
  ref_shapes = [np.shape(x) for x in jax.tree.leaves(layers[0])]
  for name, layer in zip(names, layers):
    if jax.tree.structure(layer) != ref or [np.shape(x) for x in jax.tree.leaves(layer)] != ref_shapes:
      raise ValueError(f'stack_layers: {name!r} differs in structure or shapes from {names[0]!r}')
  params[stacked_name] = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *layers)
  return params


def unstack_layers(params: Mapping[str, Any], prefix: str = 'layers_', stacked_name: str = 'layers') -> dict:
  """Scanned -> unscanned layout of one subtree (inverse of `stack_layers`): {stacked_name: [depth, ...] leaves,
  other: o} -> {prefix0: t0, ..., other: o}. Depth is read from the leading axis (all leaves must agree). Leaves
  keep their array type (numpy or jax); boxes are dropped. ValueError when `stacked_name` is absent."""
  import jax

  params = dict(_unboxed(params))
  if stacked_name not in params:
    raise ValueError(f'unstack_layers: no {stacked_name!r} in the params (keys: {sorted(params)[:8]})')
  stacked = params.pop(stacked_name)
  depths = {np.shape(x)[0] if np.ndim(x) else None for x in jax.tree.leaves(stacked)}
  if len(depths) != 1 or None in depths:
    raise ValueError(f'unstack_layers: leaves of {stacked_name!r} disagree on the leading (layer) axis: {depths}')
  depth = depths.pop()
  clash = sorted(k for k in params if k.startswith(prefix))
  if clash:
    raise ValueError(f'unstack_layers: {clash[0]!r} is already in the params next to {stacked_name!r}')
  for i in range(depth):
    params[f'{prefix}{i}'] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return params


def scanned_depths(cfg_model: Any) -> dict[str, int]:
  """{part: number of stacked blocks} for the parts of cfg.model that scan their layers: 'lm' (model.lm.depth)
  when model.lm.scan_layers, 'encoder' (the blocks the ViT builds, up to output_layer) when
  model.encoder.scan_layers and model.use_image."""
  from mmproj.encoders import encoder_fields
  from mmproj.lm import lm_fields
  out = {}
  lm = lm_fields(cfg_model['lm'])
  if lm['scan_layers']:
    out['lm'] = int(lm['depth'])
  if cfg_model['use_image']:
    enc = encoder_fields(cfg_model['encoder'])
    if enc['scan_layers']:
      out['encoder'] = int(enc['depth']) + int(enc['output_layer']) + 1
  return out


def stack_model_params(params: Mapping[str, Any], cfg_model: Any) -> dict:
  """A whole params tree ({'encoder', 'projector', 'lm'}, any subset) in the unscanned layout -> the layout cfg.model
  builds: `stack_layers` on each part that scans (see `scanned_depths`); other parts are returned as they are."""
  out = dict(params)
  for part, depth in scanned_depths(cfg_model).items():
    if part in out:
      out[part] = stack_layers(out[part], depth)
  return out


def unstack_model_params(params: Mapping[str, Any], cfg_model: Any) -> dict:
  """Inverse of `stack_model_params`: the unscanned `layers_{i}` layout that the exporters read."""
  out = dict(params)
  for part in scanned_depths(cfg_model):
    if part in out:
      out[part] = unstack_layers(out[part])
  return out
