"""The library reads top to bottom: every import of an mmproj module (at module level or inside a function) runs
down this order, never up it, and no modules import each other in a cycle.

  layers, config_lib -> encoders / projectors / output_projectors / lm / generators -> model -> data -> convert -> eval -> train
                     -> stage0 -> stage0_generator / qformer_stage1 -> experiment / inference -> main / the package root

A package may import its own modules; packages of one rank (encoders, projectors, output_projectors, lm, generators)
may not import each other.
Importing the library must not import torch or transformers (they are test and benchmark extras).
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys

from experiment_utils import REPO, python_env

ORDER = (
    ('layers', 'config_lib'),     # config_lib: cfg fields and the config loader, pure (imports no mmproj module)
    ('encoders', 'projectors', 'output_projectors', 'lm', 'generators'),
    ('model',),
    ('data',),
    ('convert',),
    ('eval',),
    ('train',),
    ('stage0',),              # the pretrained towers: trained with train, read by experiment through cfg.init
    ('qformer_stage1',        # BLIP-2's stage 1 on the stage-0 ViT (its data read as stage0 reads it)
     'stage0_generator'),     # the draw world's generator, a stage-0 artifact of the output side
    ('experiment', 'inference'),
    ('main', ''),             # '' = the package root, mmproj/__init__.py
)
RANK = {group: rank for rank, groups in enumerate(ORDER) for group in groups}
PACKAGE = os.path.join(REPO, 'mmproj')


def _modules() -> dict[str, str]:
  """{dotted module name: file} for every module of the package."""
  out = {}
  for folder, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith('.py'):
        path = os.path.join(folder, name)
        dotted = os.path.relpath(path, REPO)[:-3].replace(os.sep, '.')
        out[dotted.removesuffix('.__init__')] = path
  return out


def _imports(module: str, path: str, known: set[str]) -> set[str]:
  """The mmproj modules `module` imports anywhere in its file (`from mmproj import x` imports mmproj.x)."""
  is_package = path.endswith('__init__.py')
  out = set()
  for node in ast.walk(ast.parse(open(path).read(), path)):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names if a.name.split('.')[0] == 'mmproj')
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        parts = module.split('.')[:len(module.split('.')) - node.level + is_package]
        base = '.'.join(parts + ([node.module] if node.module else []))
      if base.split('.')[0] != 'mmproj':
        continue
      for alias in node.names:
        sub = f'{base}.{alias.name}'
        out.add(sub if sub in known else base)
  return out - {module}


def _group(module: str) -> str:
  parts = module.split('.')
  return parts[1] if len(parts) > 1 else ''


def _graph() -> dict[str, set[str]]:
  modules = _modules()
  return {m: _imports(m, p, set(modules)) for m, p in modules.items()}


def test_every_group_has_a_rank():
  unranked = sorted({_group(m) for m in _modules()} - set(RANK))
  assert not unranked, f'mmproj modules outside the import order (add them to ORDER): {unranked}'


def test_imports_run_down_the_order():
  upward = []
  for module, targets in sorted(_graph().items()):
    for target in sorted(targets):
      a, b = _group(module), _group(target)
      if a == b:
        continue
      if RANK[b] > RANK[a] or (RANK[b] == RANK[a]):
        upward.append(f'{module} imports {target} ({a or "mmproj"} rank {RANK[a]} -> {b or "mmproj"} '
                      f'rank {RANK[b]})')
  assert not upward, 'imports that run up the order:\n  ' + '\n  '.join(upward)


def test_no_import_cycles():
  graph = _graph()
  index, low, stack, on_stack, cycles = {}, {}, [], set(), []

  def visit(v):                                    # Tarjan's strongly connected components
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph.get(v, ()):
      if w not in graph:
        continue
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        cycles.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  assert not cycles, 'modules that import each other in a cycle:\n  ' + '\n  '.join(map(str, cycles))


def test_the_order_test_sees_a_violation(tmp_path):
  """The walker finds an upward import inside a function body (so the tests above can fail)."""
  path = tmp_path / 'llama.py'
  path.write_text('def f():\n  from mmproj.train import sharding\n  from mmproj import projectors\n')
  found = _imports('mmproj.lm.llama', str(path), {'mmproj.train.sharding', 'mmproj.projectors'})
  assert found == {'mmproj.train.sharding', 'mmproj.projectors'}


def test_library_imports_neither_torch_nor_transformers():
  code = ('import sys, mmproj, mmproj.train.trainer, mmproj.inference, mmproj.experiment, mmproj.convert; '
          'print(sorted(m for m in ("torch", "transformers") if m in sys.modules))')
  out = subprocess.run([sys.executable, '-c', code], env=python_env(), capture_output=True, text=True, check=True)
  assert out.stdout.strip() == '[]', out.stdout + out.stderr
