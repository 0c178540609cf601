"""The prepared accelerator check: LLaVA-1.5 train steps at a realistic shape and every projector's forward +
backward, in bf16, on one GPU (or TPU chip), written to one markdown report.

  benchmarks/accelerator.sh [--out BENCHMARKS-gpu.md]      # on the accelerator machine: set-up + this module
  python -m benchmarks.accelerator --dry-run               # the rows, shapes and commands; runs nothing
  python -m benchmarks.accelerator --tiny --out /tmp/a.md  # the same code at toy shapes, on any backend

Train steps (one child process each, so that each row's peak memory is its own; synthetic batches, random
weights, nothing read from disk): configs/llava15_stage{1,2}.py with CLIP ViT-L/14-336 (576 visual tokens) and a
1.1B Llama-shaped LM (TinyLlama-1.1B's shape: width 2048, 22 layers, 32 heads on 4 kv heads), bf16 compute,
layers scanned, sequences of 576 + text_len tokens. Rows: each stage with the kernels 'auto' picks on the
platform (cuDNN attention on a GPU), with plain XLA attention, and stage 1 with its frozen towers stored in f32
(the step as it was before model.param_dtype). Each row: step time (median of the timed steps), tokens/s, the
matmul FLOPs per step (mmproj.train.flops, the trainer's count) as TFLOP/s and MFU against the device's dense
bf16 peak, and the device's peak memory in use.

Projectors: every registry family at its paper's size between CLIP-L/14-336 (24 x 24 patches of width 1024) and
the 2048-wide LM, batch 32, bf16: forward + backward (gradients of the params and of the input), the traced
program's matmul FLOPs and the achieved TFLOP/s.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from typing import Any

LM_1B = dict(vocab_size=32064, width=2048, depth=22, num_heads=32, num_kv_heads=4, head_dim=64, mlp_dim=5632,
             rope_theta=10_000.0, norm_eps=1e-5, tie_embeddings=False, max_len=4096, qkv_bias=False,
             rope_scaling=None, sliding_window=None)          # TinyLlama-1.1B's shape, LLaVA's vocabulary
TINY_LM = dict(LM_1B, vocab_size=32064, width=64, depth=2, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128)
TINY_ENCODER = dict(image_size=28, patch_size=14, width=32, depth=2, num_heads=2, mlp_dim=64)


@dataclasses.dataclass(frozen=True)
class TrainRow:
  name: str
  stage: int
  frozen_dtype: str = 'bfloat16'
  attention: str = 'auto'


TRAIN_ROWS = (
    TrainRow('stage 1', 1),
    TrainRow('stage 1, attention xla', 1, attention='xla'),
    TrainRow('stage 1, frozen towers stored f32 (before)', 1, frozen_dtype='float32'),
    TrainRow('stage 2', 2),
    TrainRow('stage 2, attention xla', 2, attention='xla'),
)

# Each family at its paper's size on a 24 x 24 grid (M = visual tokens out).
PROJECTORS = {
    'linear': dict(name='linear'),                                                                    # M = 576
    'mlp': dict(name='mlp', depth=2),                                                                 # LLaVA-1.5
    'avg_pool': dict(name='avg_pool', output_grid=12),                                                # M = 144
    'c_abstractor': dict(name='c_abstractor', num_queries=144, depth=3, pos_emb_grid=(24, 24)),       # Honeybee
    'd_abstractor': dict(name='d_abstractor', num_queries=144, depth=3, num_heads=16, num_points=4,
                         pos_emb_grid=(24, 24)),
    'cross_attention': dict(name='cross_attention', num_queries=144, depth=1, num_heads=16, num_kv_heads=16),
    'ldp': dict(name='ldp'),                                                                          # MobileVLM
    'ldpv2': dict(name='ldpv2'),
    'patch_merger': dict(name='patch_merger', spatial_merge_size=2),                                  # Qwen2-VL
    'perceiver': dict(name='perceiver', num_latents=64, depth=6, num_heads=16, head_dim=64),          # Flamingo
    'perceiver_idefics2': dict(name='perceiver', variant='idefics2', num_latents=64, depth=3, num_heads=16,
                               num_kv_heads=4, head_dim=128),                                         # Idefics2
    'pixel_shuffle': dict(name='pixel_shuffle', scale_factor=2, norm='layernorm', depth=2, use_bias=True),  # InternVL
    'qformer': dict(name='qformer', num_query_tokens=32, hidden_dim=768, num_layers=12, num_heads=12, mlp_dim=3072,
                    cross_attention_frequency=2),                                                     # BLIP-2
    'qwen_vl_resampler': dict(name='qwen_vl_resampler', num_queries=256, num_heads=16),               # Qwen-VL
    'tokenpacker': dict(name='tokenpacker', scale=2, num_heads=16),                                   # TokenPacker
}
# --tiny: the largest value of each size field (the grids are set to the toy grid).
TINY_CAPS = dict(num_queries=4, num_latents=4, num_query_tokens=4, num_heads=2, num_kv_heads=2, depth=2,
                 num_layers=2, num_points=2, head_dim=16, hidden_dim=32, mlp_dim=32)
NOT_BENCHED = {'gated_xattn': 'its blocks run inside the LM (Flamingo): their cost is part of an LM step'}


def shapes(tiny: bool) -> dict[str, Any]:
  if tiny:
    return dict(batch1=2, batch2=2, text_len=16, iters=2, warmup=1, proj_batch=2, grid=4, in_dim=32, out_dim=64)
  return dict(batch1=32, batch2=16, text_len=448, iters=5, warmup=2, proj_batch=32, grid=24, in_dim=1024,
              out_dim=2048)


def train_config(row: TrainRow, tiny: bool):
  """configs/llava15_stage{1,2}.py at the benchmark's shape: random weights (no cfg.init), layers scanned."""
  from mmproj import config_lib
  z = shapes(tiny)
  batch = z['batch1'] if row.stage == 1 else z['batch2']
  cfg = config_lib.llava15_experiment(f'frozen_dtype={row.frozen_dtype},batch={batch},text_len={z["text_len"]}',
                                      stage=row.stage, name=f'llava15_stage{row.stage}', scan=True)
  cfg.model.lm.update(TINY_LM if tiny else LM_1B)
  if tiny:
    cfg.model.encoder.update(TINY_ENCODER)
  cfg.model.kernels.attention = row.attention
  cfg.init = dict(encoder=None, lm=None, projector=None)
  cfg.mesh = dict(data=1, fsdp=1, tensor=1)
  return cfg


def synthetic_batch(s, batch: int):
  import numpy as np
  cfg = s.cfg
  rng = np.random.default_rng(0)
  length, m, size = s.seq_len, s.num_image_tokens, int(cfg.data.image_size)
  tokens = rng.integers(3, 32000, (batch, length)).astype(np.int32)
  tokens[:, 1:1 + m] = int(cfg.model.image_token_id)
  loss_mask = np.zeros((batch, length), np.float32)
  loss_mask[:, 1 + m:] = 1.0
  ones = np.ones((batch, length), np.int32)
  return dict(image=rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8), tokens=tokens,
              positions=np.cumsum(ones, 1).astype(np.int32) - 1, input_mask=ones, targets=np.roll(tokens, -1, 1),
              loss_mask=loss_mask, segment_ids=np.zeros((batch, length), np.int32))


def peak_memory(device) -> int | None:
  stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
  return int(stats['peak_bytes_in_use']) if stats and 'peak_bytes_in_use' in stats else None


def run_train_row(row: TrainRow, tiny: bool) -> dict[str, Any]:
  import jax
  import numpy as np

  from mmproj.train import flops as flops_lib
  from mmproj.train import memory as memory_lib
  from mmproj.train import trainer
  z = shapes(tiny)
  cfg = train_config(row, tiny)
  s = trainer.setup(cfg, jax.devices()[:1])
  batch = int(cfg.train.batch_size)
  state = trainer.init_state(s, 0)
  data = {k: jax.device_put(v, s.batch_sharding) for k, v in synthetic_batch(s, batch).items()}
  rng = jax.random.key(1)
  t0 = time.perf_counter()
  with jax.set_mesh(s.mesh):
    step = trainer.make_train_step(s).lower(state, data, rng).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(z['warmup']):
      state, metrics = step(state, data, rng)
    jax.block_until_ready(state)
    times = []
    for _ in range(z['iters']):
      t = time.perf_counter()
      state, metrics = step(state, data, rng)
      jax.block_until_ready(state)
      times.append(time.perf_counter() - t)
  step_s = float(np.median(times))
  flops = flops_lib.step_flops(cfg, labels=s.labels)
  device = s.mesh.devices.flat[0]
  peak, _ = flops_lib.device_peak_flops(device, 'bfloat16')
  chosen = s.model.kernels
  return dict(name=row.name, stage=row.stage, batch=batch, seq_len=s.seq_len,
              kernels=f'dense {chosen.dense}, attention {chosen.attention}',
              compile_s=compile_s, step_s=step_s, tokens_per_s=batch * s.seq_len / step_s,
              tflops=flops['total'] / step_s / 1e12, mfu=None if peak is None else flops['total'] / step_s / peak,
              peak_memory=peak_memory(device), loss=float(metrics['loss']),
              compiled_memory=memory_lib.format_compiled_memory(step))


def run_projector(name: str, tiny: bool) -> dict[str, Any]:
  import flax
  import jax
  import jax.numpy as jnp
  import numpy as np

  from mmproj import projectors
  from mmproj.train import flops as flops_lib
  z = shapes(tiny)
  cfg = dict(PROJECTORS[name])
  if tiny:   # toy sizes: the same families and options, narrower
    cfg = {k: min(v, TINY_CAPS[k]) if k in TINY_CAPS else v for k, v in cfg.items()}
    cfg.update({k: v for k, v in (('output_grid', 2), ('pos_emb_grid', (z['grid'], z['grid']))) if k in cfg})
  grid = (z['grid'], z['grid'])
  proj = projectors.build(cfg, in_dim=z['in_dim'], out_dim=z['out_dim'], dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.key(0), (z['proj_batch'], grid[0] * grid[1], z['in_dim']), jnp.bfloat16)
  params = jax.jit(lambda x: flax.linen.unbox(proj.init(jax.random.key(1), x, grid=grid)['params']))(x)

  def loss(params, x):
    out = proj.apply({'params': params}, x, grid=grid, deterministic=True)
    return jnp.mean(out.astype(jnp.float32) ** 2)

  step = jax.jit(jax.grad(loss, argnums=(0, 1)))
  flops = flops_lib.jaxpr_matmul_flops(jax.grad(loss, argnums=(0, 1)), params, x)
  jax.block_until_ready(step(params, x))
  for _ in range(z['warmup']):
    jax.block_until_ready(step(params, x))
  times = []
  for _ in range(z['iters'] * 4):
    t = time.perf_counter()
    jax.block_until_ready(step(params, x))
    times.append(time.perf_counter() - t)
  t = float(np.median(times))
  return dict(name=name, tokens_out=projectors.num_output_tokens(cfg, grid), ms=1000 * t, flops=flops,
              tflops=flops / t / 1e12, params=sum(p.size for p in jax.tree.leaves(params)))


def _child(kind: str, name: str, tiny: bool) -> dict[str, Any]:
  """Runs one row in a fresh process (its own compile, heap and peak-memory counter) -> its JSON."""
  cmd = [sys.executable, '-m', 'benchmarks.accelerator', '--child', kind, name] + (['--tiny'] if tiny else [])
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
  if out.returncode:
    return dict(name=name, error=(out.stderr.strip().splitlines() or ['exit status %d' % out.returncode])[-1][:300])
  return json.loads(out.stdout.strip().splitlines()[-1])


def report(device: str, train: list[dict], projs: list[dict], tiny: bool, command: str, seconds: float) -> str:
  from benchmarks import markdown_table
  z = shapes(tiny)

  def gib(n):
    return '' if n is None else f'{n / 2**30:.1f} GiB'
  lines = ['# Accelerator benchmark' + (' (--tiny: toy shapes, numbers meaningless)' if tiny else ''), '',
           f'Device: {device}  ', f'Command: `{command}` ({seconds:.0f} s in all)  ',
           f'Software: {software()}', '',
           '## LLaVA-1.5 train steps', '',
           f'CLIP ViT-L/14-336 + a 1.1B Llama-shaped LM (TinyLlama-1.1B: width 2048, 22 layers, GQA 32/4), bf16 '
           f'compute, layers scanned, {next((r["seq_len"] for r in train if "seq_len" in r), "?")} tokens per row '
           f'({z["text_len"]} of text), random weights, synthetic batches; '
           'stage 1 trains the projector, stage 2 the projector and the LM. MFU: the trainer\'s matmul FLOP count '
           'per step over the dense bf16 peak.', '']
  rows = []
  for r in train:
    if 'error' in r:
      rows.append([r['name'], '', '', '', '', '', '', '', f'error: {r["error"]}'])
      continue
    rows.append([r['name'], r['batch'], f'{1000 * r["step_s"]:.0f}', f'{r["tokens_per_s"]:,.0f}',
                 f'{r["tflops"]:.1f}', '' if r['mfu'] is None else f'{100 * r["mfu"]:.1f}%', gib(r['peak_memory']),
                 f'{r["compile_s"]:.0f}', r['kernels']])
  lines.append(markdown_table(['row', 'batch', 'step ms', 'tokens/s', 'TFLOP/s', 'MFU', 'peak memory',
                               'compile s', 'kernels'], rows))
  lines += ['', '## Projectors: forward + backward, bf16', '',
            f'Batch {z["proj_batch"]}, {z["grid"]} x {z["grid"]} patches of width {z["in_dim"]} in, width '
            f'{z["out_dim"]} out; gradients of the params and of the input. ' +
            '; '.join(f'{k}: not here ({v})' for k, v in NOT_BENCHED.items()) + '.', '']
  rows = []
  for r in projs:
    if 'error' in r:
      rows.append([r['name'], '', '', '', '', f'error: {r["error"]}'])
      continue
    rows.append([r['name'], r['tokens_out'], f'{r["params"] / 1e6:.1f}M', f'{r["ms"]:.2f}',
                 f'{r["flops"] / 1e9:.1f}', f'{r["tflops"]:.1f}'])
  lines.append(markdown_table(['projector', 'M', 'params', 'ms', 'GFLOP', 'TFLOP/s'], rows))
  return '\n'.join(lines) + '\n'


def software() -> str:
  import flax
  import jax
  import jaxlib
  return f'python {sys.version.split()[0]}, jax {jax.__version__}, jaxlib {jaxlib.__version__}, flax {flax.__version__}'


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog='python -m benchmarks.accelerator', description=__doc__.split('\n\n')[0])
  p.add_argument('--out', default='BENCHMARKS-gpu.md')
  p.add_argument('--tiny', action='store_true', help='toy shapes: runs anywhere in seconds (numbers meaningless)')
  p.add_argument('--dry-run', action='store_true', help='print the rows and their commands; run nothing')
  p.add_argument('--only', default='', help='rows whose name contains this')
  p.add_argument('--child', nargs=2, metavar=('KIND', 'NAME'), help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child:
    kind, name = args.child
    row = run_train_row(next(r for r in TRAIN_ROWS if r.name == name), args.tiny) if kind == 'train' else \
        run_projector(name, args.tiny)
    print(json.dumps(row))
    return 0

  train_rows = [r for r in TRAIN_ROWS if args.only in r.name]
  proj_rows = [n for n in PROJECTORS if args.only in n]
  if args.dry_run:   # every row's config is built and validated (abstractly: nothing is allocated or compiled)
    from mmproj import projectors
    from mmproj.train import memory
    z = shapes(args.tiny)
    tiny = ' --tiny' if args.tiny else ''
    for r in train_rows:
      cfg = train_config(r, args.tiny)
      mem = memory.state_memory(cfg, 1, dict(cfg.mesh))
      state = sum(mem['params'].values()) + sum(mem['opt_state'].values())
      print(f'train {r.name!r}: configs/llava15_stage{r.stage}.py, batch {cfg.train.batch_size}, sequence '
            f'{cfg.model.encoder.image_size // cfg.model.encoder.patch_size}^2 + {z["text_len"]}, model.param_dtype '
            f'{dict(cfg.model.param_dtype)}, model.kernels.attention {r.attention!r}, trains '
            f'{list(cfg.train.trainable)}; train state {state / 2**30:.2f} GiB')
      print(f'  $ python -m benchmarks.accelerator --child train {r.name!r}{tiny}')
    for n in proj_rows:
      cfg = PROJECTORS[n]
      projectors.validate(cfg, in_dim=z['in_dim'], out_dim=z['out_dim'])
      print(f'projector {n}: {cfg}, M = {projectors.num_output_tokens(cfg, (z["grid"], z["grid"]))}, '
            f'{projectors.param_count(cfg, z["in_dim"], z["out_dim"]) / 1e6:.1f}M params; {z["grid"]}x{z["grid"]}'
            f'x{z["in_dim"]} -> {z["out_dim"]}, batch {z["proj_batch"]}, bf16 forward + backward')
      print(f'  $ python -m benchmarks.accelerator --child projector {n}{tiny}')
    print(f'report -> {args.out}')
    return 0

  import jax
  device = jax.devices()[0]
  if device.platform == 'cpu' and not args.tiny:
    print('benchmarks.accelerator: no accelerator here (jax sees only the CPU); --tiny runs the toy shapes',
          file=sys.stderr)
    return 2
  start = time.time()
  train, projs = [], []
  for r in train_rows:
    train.append(_child('train', r.name, args.tiny))
    print(json.dumps(train[-1]), flush=True)
  for n in proj_rows:
    projs.append(_child('projector', n, args.tiny))
    print(json.dumps(projs[-1]), flush=True)
  name = f'{device.device_kind} ({device.platform}), {jax.device_count()} device(s) seen, 1 used'
  command = 'python -m benchmarks.accelerator ' + ' '.join(argv if argv is not None else sys.argv[1:])
  text = report(name, train, projs, args.tiny, command.strip(), time.time() - start)
  with open(args.out, 'w') as f:
    f.write(text)
  print(text)
  return 1 if any('error' in r for r in train + projs) else 0


if __name__ == '__main__':
  sys.exit(main())
