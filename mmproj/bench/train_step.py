"""The LLaVA stage-1 train step vs transformers' LlavaForConditionalGeneration, same weights, tokens/s.

Model (full size; random init is fine for speed): a CLIP-B/16-shaped tower at 384 px (576 patches, 12 blocks of
width 768, LLaVA's penultimate layer so 11 run) frozen, a ~134M-parameter Llama-shaped LM (width 768, 12 layers,
12 heads, SwiGLU 2048, vocab 32064) frozen, LLaVA's 2-layer GELU MLP projector trained; batch 4 rows of
576 image + 128 text tokens (L = 704), loss on the 127 text targets.

  theirs  LlavaForConditionalGeneration built from an HF LlavaConfig (HF init, sdpa attention), tower and LM
          requires_grad=False, projector trained: zero_grad, forward with labels, backward, clip_grad_norm_(1.0),
          torch.optim.AdamW (lr 1e-3, betas (0.9, 0.999), no weight decay): the step HF's Trainer runs.
  ours    the same weights converted (mmproj.convert.llava: llava_model_config + llava_params_from_hf) into the
          configs/llava15_stage1.py experiment (config_lib.llava15_experiment with the model replaced and no
          pretrained paths), trainer.setup + trainer.make_train_step, state = those params + tx.init.
theirs runs in a process of its own (TorchWorker: built there from the same seed), ours in this one, from which
the HF model is deleted once converted, so that neither framework's heap, page state or thread pools are in the
other's way, as in real use (`python -m mmproj.bench.diagnose train-step` times ours alone, theirs alone, and
both in one process).
Before timing, both compute the loss of the same batch from the same weights; it must agree to LOSS_RTOL.
Timing interleaves ours / theirs (the diagnostic below is timed after them), two back-to-back steps per side and
round with the second timed: a training loop's steady state (the first step, right after the other framework's,
runs with its memory and caches; its times are reported too), warm-up excluded, median; tokens/s = B * L / time.

Diagnostic row 'ours, projector grads only': the same model, loss and optimizer, but value_and_grad taken w.r.t.
the projector's params only (zero gradients for the frozen rest, which the optimizer drops anyway): the least work
a stage-1 step needs. trainer.make_train_step differentiates every parameter; whether XLA then drops the frozen
LM's weight gradients depends on whether anything reads them (a logged norm of all grads would). The section
compares XLA's cost analysis of both compiled steps to tell, and counts the step's matmul FLOPs as executed: the
analytic all-param-grads count, or the trainable-only count when XLA dropped the frozen weight gradients
(mmproj.train.flops.step_flops; tests/test_flops.py checks it against traced programs). A traced count of the
step itself takes the larger branch of the loss's lax.cond, the vocabulary projection at all L positions, which
this batch never runs (its loss positions fit train.loss_positions); transformers runs that one.
"""

from __future__ import annotations

import gc
import math
import time
from typing import Any

import numpy as np

from mmproj.bench import Options, PeakProbe, Row, Section, format_profile, interleaved, median, profile_jax
from mmproj.bench import profile_torch
from mmproj.bench import flop_str, ratio, spread, xla_cost

LOSS_RTOL = 1e-3
GOAL_SPEEDUP = 1.5
BACK_TO_BACK = 2      # steps per side and round; the last is timed (see mmproj.bench.interleaved)
TEXT_TOKENS = 128


def sizes(quick: bool) -> dict[str, Any]:
  if quick:
    return dict(image=32, patch=8, vwidth=32, vdepth=3, vheads=2, vmlp=64, vocab=256, width=48, depth=2, heads=4,
                kv_heads=2, mlp=96, batch=2, text=16, image_token=250)
  return dict(image=384, patch=16, vwidth=768, vdepth=12, vheads=12, vmlp=3072, vocab=32064, width=768, depth=12,
              heads=12, kv_heads=12, mlp=2048, batch=4, text=TEXT_TOKENS, image_token=32000)


def build_hf(z: dict[str, Any]):
  """A random-init LlavaForConditionalGeneration at sizes `z` (HF's own init)."""
  import torch
  from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

  torch.manual_seed(0)
  vision = CLIPVisionConfig(hidden_size=z['vwidth'], intermediate_size=z['vmlp'], num_hidden_layers=z['vdepth'],
                            num_attention_heads=z['vheads'], image_size=z['image'], patch_size=z['patch'],
                            hidden_act='quick_gelu')
  text = LlamaConfig(vocab_size=z['vocab'], hidden_size=z['width'], intermediate_size=z['mlp'],
                     num_hidden_layers=z['depth'], num_attention_heads=z['heads'],
                     num_key_value_heads=z['kv_heads'], max_position_embeddings=2048, rms_norm_eps=1e-5)
  n = (z['image'] // z['patch']) ** 2
  cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=z['image_token'],
                    projector_hidden_act='gelu', vision_feature_layer=-2, vision_feature_select_strategy='default',
                    image_seq_length=n)
  cfg._attn_implementation = 'sdpa'
  return LlavaForConditionalGeneration(cfg)


def experiment_config(cfg_model: dict, z: dict[str, Any]):
  """configs/llava15_stage1.py's experiment with the converted model, no pretrained paths, f32, batch z['batch'],
  text_len z['text']."""
  import ml_collections

  from mmproj import config_lib

  missing = '/nonexistent/mmproj-bench'
  c = config_lib.llava15_experiment(f'vision={missing},lm={missing},tokenizer={missing},dtype=float32,'
                                    f'batch={z["batch"]},text_len={z["text"]},steps=1000',
                                    stage=1, name='bench_llava15_stage1')
  c.model = ml_collections.ConfigDict(dict(cfg_model, dtype='float32'))
  c.data.image_size = int(cfg_model['encoder']['image_size'])
  c.init = dict(encoder=None, lm=None, projector=None)
  return c


def make_batch(z: dict[str, Any], num_image_tokens: int, image_mean, image_std) -> tuple[dict, dict]:
  """(ours, theirs): B rows `<bos> <image>*M text...` with no padding, loss on every text target.
  ours: the trainer's batch dict (uint8 images); theirs: input_ids / pixel_values (normalised as the model does
  for ours) / attention_mask / labels (-100 where ours has loss_mask 0, shifted as HF shifts)."""
  rng = np.random.default_rng(0)
  b, m, t = z['batch'], num_image_tokens, z['text']
  length = 1 + m + (t - 1)
  tokens = np.empty((b, length), np.int32)
  tokens[:, 0] = 1
  tokens[:, 1:1 + m] = z['image_token']
  tokens[:, 1 + m:] = rng.integers(5, z['image_token'], size=(b, t - 1))
  targets = np.concatenate([tokens[:, 1:], np.zeros((b, 1), np.int32)], axis=1)
  loss_mask = np.zeros((b, length), np.float32)
  loss_mask[:, m:length - 1] = 1.0                                  # targets that are text tokens
  image = rng.integers(0, 256, size=(b, z['image'], z['image'], 3), dtype=np.uint8)
  ours = dict(image=image, tokens=tokens, positions=np.tile(np.arange(length, dtype=np.int32), (b, 1)),
              input_mask=np.ones((b, length), np.int32), targets=targets, loss_mask=loss_mask)
  labels = np.full((b, length), -100, np.int64)
  labels[:, 1:] = np.where(loss_mask[:, :-1] > 0, tokens[:, 1:], -100)
  pixels = (image.astype(np.float32) / 255.0 - np.asarray(image_mean, np.float32)) / np.asarray(image_std,
                                                                                                 np.float32)
  theirs = dict(input_ids=tokens.astype(np.int64), pixel_values=np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)),
                attention_mask=np.ones((b, length), np.int64), labels=labels)
  return ours, theirs


def projector_only_step(s):
  """A train step like trainer.make_train_step's (same loss, optimizer, shardings and donation), but
  differentiating the projector params only (see the module docstring)."""
  import jax
  import jax.numpy as jnp
  import optax
  from jax.sharding import NamedSharding, PartitionSpec as P

  from mmproj.train import trainer

  loss_sums = trainer.make_loss_sums(s)                     # the trainer's loss (train.loss_positions included)

  def loss_fn(projector, rest, batch, rng):
    nll, (correct, count) = loss_sums(dict(rest, projector=projector), batch, rng)
    denom = jnp.maximum(count, 1.0)
    return nll / denom, correct / denom

  def step(state, batch, base_rng):
    rng = jax.random.fold_in(base_rng, state.step)
    rest = {k: v for k, v in state.params.items() if k != 'projector'}
    (loss, accuracy), g = jax.value_and_grad(loss_fn, has_aux=True)(state.params['projector'], rest, batch, rng)
    grads = dict(jax.tree.map(jnp.zeros_like, rest), projector=g)
    updates, opt_state = s.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {'loss': loss, 'accuracy': accuracy, 'grad_norm': optax.tree.norm(g)}
    return trainer.TrainState.create(params, opt_state, state.step + 1), metrics

  replicated = NamedSharding(s.mesh, P())
  return jax.jit(step, in_shardings=(s.state_sharding, s.batch_sharding, replicated),
                 out_shardings=(s.state_sharding, replicated), donate_argnums=(0,))


def prepare(z: dict[str, Any]):
  """-> (cfg, setup, params, ours_batch, theirs_batch): ours' experiment on the weights of build_hf(z), converted;
  the HF model itself is dropped (theirs is rebuilt from the same seed where it runs)."""
  import jax
  import jax.numpy as jnp

  from mmproj.convert import StateDict
  from mmproj.convert import llava as llava_convert
  from mmproj.train import trainer

  hf = build_hf(z)
  cfg_model = llava_convert.llava_model_config(hf.config.to_dict())
  params = llava_convert.llava_params_from_hf(StateDict.of(hf), cfg_model)
  params = jax.tree.map(lambda a: jnp.array(np.array(a, np.float32, copy=True)), params)   # no aliasing of torch
  del hf
  gc.collect()
  cfg = experiment_config(cfg_model, z)
  s = trainer.setup(cfg)
  ours_batch, theirs_batch = make_batch(z, s.num_image_tokens, cfg_model['encoder']['image_mean'],
                                        cfg_model['encoder']['image_std'])
  assert ours_batch['tokens'].shape[1] == s.seq_len, (ours_batch['tokens'].shape, s.seq_len)
  return cfg, s, params, ours_batch, theirs_batch


def _torch_side(z: dict[str, Any], theirs_batch: dict[str, np.ndarray], threads: int):
  """theirs, built where this runs: (train step -> loss, eval loss of the batch). Frozen tower and LM, AdamW on
  the projector."""
  import torch

  torch.set_num_threads(threads)
  hf = build_hf(z)
  for p in hf.parameters():
    p.requires_grad_(False)
  proj_params = list(hf.model.multi_modal_projector.parameters())
  for p in proj_params:
    p.requires_grad_(True)
  opt = torch.optim.AdamW(proj_params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
  hf.train()
  tb = {k: torch.from_numpy(v) for k, v in theirs_batch.items()}

  def step() -> float:
    opt.zero_grad(set_to_none=True)
    loss = hf(**tb).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(proj_params, 1.0)
    opt.step()
    return float(loss.detach())

  def eval_loss() -> float:
    with torch.no_grad():
      hf.eval()
      loss = float(hf(**tb).loss)
      hf.train()
    return loss

  return step, eval_loss, hf.config._attn_implementation


def _torch_worker(conn, z, theirs_batch, threads) -> None:
  """Serves theirs in its own process: 'step' | 'loss' | 'profile' | 'attn' -> ('ok', value) or ('error', text)."""
  step, eval_loss, attn = _torch_side(z, theirs_batch, threads)
  commands = {'step': step, 'loss': eval_loss, 'profile': lambda: profile_torch(step, calls=1), 'attn': lambda: attn}
  while True:
    try:
      cmd = conn.recv()
    except EOFError:
      return
    if cmd == 'quit':
      return
    try:
      conn.send(('ok', commands[cmd]()))
    except Exception as e:  # pylint: disable=broad-except
      conn.send(('error', f'{type(e).__name__}: {e}'))


class TorchWorker:
  """transformers' side of the train step in a separate process (multiprocessing 'spawn': a fresh interpreter,
  same CPU affinity and environment), so that each framework runs in a process of its own, as it does in real use.
  call('step') runs one step there and returns its loss; the caller times the round trip (a pipe message each
  way, well under a millisecond next to a step of seconds)."""

  def __init__(self, z: dict[str, Any], theirs_batch: dict[str, np.ndarray], threads: int):
    import multiprocessing

    ctx = multiprocessing.get_context('spawn')
    self._conn, child = ctx.Pipe()
    self._proc = ctx.Process(target=_torch_worker, args=(child, z, theirs_batch, threads), daemon=True,
                             name='mmproj-bench-torch')
    self._proc.start()
    child.close()

  def call(self, cmd: str) -> Any:
    self._conn.send(cmd)
    try:
      status, value = self._conn.recv()
    except EOFError as e:
      raise RuntimeError(f'the torch worker process exited (status {self._proc.exitcode}) during {cmd!r}') from e
    if status != 'ok':
      raise RuntimeError(f'torch worker, {cmd!r}: {value}')
    return value

  def close(self) -> None:
    try:
      self._conn.send('quit')
    except OSError:
      pass
    self._proc.join(30)
    if self._proc.is_alive():
      self._proc.terminate()
      self._proc.join(5)


def run(opts: Options, peaks: dict[str, float], probe: PeakProbe | None = None) -> Section:
  """Builds both sides, checks the loss, times them -> the step row and the diagnostic row. probe: samples the
  matmul peak in every timed round (mmproj.bench.PeakProbe); the roofline reads against it."""
  section = Section('train_step', 'Full LLaVA stage-1 train step vs transformers (f32)',
                    ['step', 'model', 'batch x L', 'loss (ours / theirs)', 'ours (s)', 'theirs (s)',
                     'ours tok/s', 'theirs tok/s', 'ratio', 'ours matmul TFLOP', 'ours GFLOP/s', 'XLA peak GFLOP/s',
                     'roofline',
                     'spread (ours / theirs)'])
  if not opts.wants('train_step/llava_stage1'):
    return section
  z = sizes(opts.quick)
  t_start = time.perf_counter()
  cfg, s, params, ours_batch, theirs_batch = prepare(z)
  n_img = s.num_image_tokens
  seq = ours_batch['tokens'].shape[1]
  tokens_per_step = z['batch'] * seq
  # theirs: in its own process (TorchWorker), built from the same seed; this process keeps only ours.
  worker = TorchWorker(z, theirs_batch, opts.threads)
  try:
    return _measure(opts, peaks, probe, section, worker, z=z, cfg=cfg, s=s, params=params, ours_batch=ours_batch,
                    seq=seq, n_img=n_img, tokens_per_step=tokens_per_step, t_start=t_start)
  finally:
    worker.close()


def _measure(opts, peaks, probe, section, worker, *, z, cfg, s, params, ours_batch, seq, n_img, tokens_per_step,
             t_start) -> Section:
  """The timed part of run (theirs served by `worker`)."""
  import jax
  import jax.numpy as jnp

  from mmproj.train import flops as flops_lib
  from mmproj.train import trainer

  def theirs_step():
    return worker.call('step')

  # ours: trainer.setup + make_train_step on the converted params.
  with jax.set_mesh(s.mesh):
    def init(p):
      return trainer.TrainState.create(p, s.tx.init(p))

    init_jit = jax.jit(init, out_shardings=s.state_sharding)

    def fresh_state():
      return init_jit(jax.tree.map(jnp.copy, params))

    batch = trainer.global_batch(s, ours_batch)
    rng = jax.random.key(1)

    step_fn = trainer.make_train_step(s)
    proj_step_fn = projector_only_step(s)
    boxes = {'ours': [fresh_state()], 'proj': [fresh_state()]}

    def runner(fn, key):
      def go():
        boxes[key][0], metrics = fn(boxes[key][0], batch, rng)
        jax.block_until_ready((boxes[key][0], metrics))
        return metrics
      return go

    # Compiled ahead of time once: the executables are timed, profiled and cost-analysed.
    step_exec = step_fn.lower(boxes['ours'][0], batch, rng).compile()
    proj_exec = proj_step_fn.lower(boxes['proj'][0], batch, rng).compile()
    ours_step, proj_step = runner(step_exec, 'ours'), runner(proj_exec, 'proj')
    # Same weights, same batch: the loss our first train step reports (computed before its update) vs HF's.
    loss_ours = float(ours_step()['loss'])
    loss_theirs = float(worker.call('loss'))
    loss_err = abs(loss_ours - loss_theirs) / abs(loss_theirs)
    opts.log(f'  llava stage 1: loss ours {loss_ours:.6f} theirs {loss_theirs:.6f} (rel {loss_err:.1e}); '
             f'attention {worker.call("attn")}')
    proj_step()                                                      # one untimed call of each, warm-up or not
    flops_step = float(flops_lib.jaxpr_matmul_flops(step_fn, boxes['ours'][0], batch, rng))
    flops_proj = float(flops_lib.jaxpr_matmul_flops(proj_step_fn, boxes['proj'][0], batch, rng))
    analytic = flops_lib.step_flops(cfg, labels=s.labels)
    analytic_all = flops_lib.step_flops(cfg, labels=s.labels, all_param_grads=True)
    loss_positions = trainer.loss_positions(cfg) or seq
    xla_step, xla_proj = xla_cost(step_exec, 'flops'), xla_cost(proj_exec, 'flops')
    dropped = xla_step <= 1.1 * xla_proj             # XLA eliminated the frozen weight-gradient dots
    executed = float(analytic['total'] if dropped else analytic_all['total'])
    setup_s = time.perf_counter() - t_start
    row = Row('train_step/llava_stage1', {
        'step': 'stage 1 (projector trains)',
        'model': (f'ViT {z["vwidth"]}x{z["vdepth"]} @{z["image"]}px/{z["patch"]} + Llama {z["width"]}x{z["depth"]} '
                  f'(vocab {z["vocab"]}), {sum(int(np.size(a)) for a in jax.tree.leaves(params)) / 1e6:.0f}M params'),
        'batch x L': f'{z["batch"]} x {seq} ({n_img} image + {seq - n_img} text)',
        'loss (ours / theirs)': f'{loss_ours:.5f} / {loss_theirs:.5f}'})
    if not loss_err <= LOSS_RTOL:
      row.notes.append(f'LOSS MISMATCH: ours {loss_ours} vs theirs {loss_theirs}: not timed')
      row.goal('>= 1.5x tokens/s of transformers', math.nan, GOAL_SPEEDUP)
      section.rows.append(row)
      return section
    opts.log(f'  setup {setup_s:.0f} s; matmul FLOPs per step: trainer {flop_str(flops_step)}, projector-only '
             f'grads {flop_str(flops_proj)}, analytic {flop_str(analytic["total"])}')
    fns = [('ours', ours_step), ('theirs', theirs_step)]
    if probe is not None:
      probe.reset()
    times = interleaved(fns + ([('peak probe', probe)] if probe is not None else []), iters=opts.iters,
                        warmup=opts.warmup, log=opts.log, back_to_back=BACK_TO_BACK)
    # The diagnostic afterwards, on its own: interleaved with ours, it would make ours' process alternate between
    # two executables and their buffers, which no training loop does.
    times.update(interleaved([('ours, projector grads only', proj_step)], iters=opts.iters, warmup=0,
                             log=opts.log, back_to_back=BACK_TO_BACK))
  t_ours, t_theirs, t_proj = (median(times[k]) for k in ('ours', 'theirs', 'ours, projector grads only'))
  if probe is not None:
    peaks = dict(peaks, xla_f32=probe.xla(peaks['xla_f32']), torch_f32=probe.torch(peaks['torch_f32']))
  speedup = ratio(t_theirs, t_ours)
  gflops = executed / t_ours / 1e9
  row.values.update({'ours (s)': t_ours, 'theirs (s)': t_theirs, 'ours tok/s': tokens_per_step / t_ours,
                     'theirs tok/s': tokens_per_step / t_theirs, 'ratio': speedup,
                     'ours matmul TFLOP': executed / 1e12, 'ours GFLOP/s': gflops,
                     'XLA peak GFLOP/s': peaks['xla_f32'] / 1e9, 'roofline': gflops * 1e9 / peaks['xla_f32'],
                     'spread (ours / theirs)': f'{spread(times["ours"]):.0%} / {spread(times["theirs"]):.0%}'})
  row.goal('>= 1.5x tokens/s of transformers', speedup, GOAL_SPEEDUP)
  first_ours, first_theirs = median(times['ours [first]']), median(times['theirs [first]'])
  row.notes.append(f'each side is timed on the second of {BACK_TO_BACK} back-to-back steps (a training loop\'s '
                   f'steady state); the first, right after the other framework\'s step: ours {first_ours:.2f} s, '
                   f'theirs {first_theirs:.2f} s (ratio {ratio(first_theirs, first_ours):.2f})')
  section.rows.append(row)

  diag = Row('train_step/llava_stage1_projector_grads', {
      'step': 'diagnostic: ours, projector grads only', 'model': 'same', 'batch x L': row.values['batch x L'],
      'loss (ours / theirs)': 'same', 'ours (s)': t_proj, 'theirs (s)': t_theirs,
      'ours tok/s': tokens_per_step / t_proj, 'theirs tok/s': tokens_per_step / t_theirs,
      'ratio': ratio(t_theirs, t_proj), 'ours matmul TFLOP': analytic['total'] / 1e12,
      'ours GFLOP/s': analytic['total'] / t_proj / 1e9, 'XLA peak GFLOP/s': peaks['xla_f32'] / 1e9,
      'roofline': analytic['total'] / t_proj / peaks['xla_f32'],
      'spread (ours / theirs)': f'{spread(times["ours, projector grads only"]):.0%} / '
                                f'{spread(times["theirs"]):.0%}'})
  section.rows.append(diag)
  section.intro.append(
      'theirs = `LlavaForConditionalGeneration` (sdpa attention) with the vision tower and LM at requires_grad=False, '
      'AdamW + clip_grad_norm_(1.0) on the projector; ours = `trainer.setup` + `trainer.make_train_step` of '
      'configs/llava15_stage1.py (model replaced by the converted HF one, f32), same weights (converted with '
      '`mmproj.convert.llava`), same batch; the loss of both agrees before timing (column loss). '
      'ratio = theirs time / ours time = ours tokens/s / theirs tokens/s.')
  counts = (f'Matmul FLOPs per step of the traced programs (the loss\'s all-position branch): trainer step '
            f'{flop_str(flops_step)}, projector grads only {flop_str(flops_proj)}; analytic '
            f'(mmproj.train.flops.step_flops, the {loss_positions} loss positions per row this batch runs) '
            f'trainable-only {flop_str(analytic["total"])}, all-param-grads {flop_str(analytic_all["total"])}. XLA\'s '
            f'cost analysis of the compiled steps: trainer {flop_str(xla_step)}, projector grads only '
            f'{flop_str(xla_proj)}')
  if dropped:
    section.notes.append(counts + ': XLA eliminates the frozen LM\'s weight gradients that trainer.make_train_step\'s '
                         'traced program contains (nothing reads them), so the table counts the trainable-only '
                         f'{flop_str(executed)} as the executed matmul work.')
  else:
    section.notes.append(counts + f': trainer.make_train_step computes the frozen LM\'s weight gradients '
                         f'({flops_step / flops_proj - 1:.0%} more matmul work than the step needs; something reads '
                         'them, e.g. a logged norm of all grads).')
  if opts.profile and not all(g[3] for g in row.goals):
    try:
      hlo = step_exec.as_text()
      t_mm = executed / peaks['xla_f32']
      row.notes.append(f'bounds: the step\'s matmul FLOPs at the XLA peak take {t_mm:.2f} s ({t_mm / t_ours:.0%} '
                       f'of ours); theirs at the torch GEMM peak {flops_proj / peaks["torch_f32"]:.2f} s '
                       f'({flops_proj / peaks["torch_f32"] / t_theirs:.0%} of theirs; it runs the projector-only '
                       'FLOPs with the vocabulary projection at all positions)')
      with jax.set_mesh(s.mesh):
        row.notes.append(format_profile(profile_jax(ours_step, hlo, calls=1, flops=executed), 'ours'))
      row.notes.append(format_profile(worker.call('profile'), 'theirs'))
    except Exception as e:  # pylint: disable=broad-except
      row.notes.append(f'profile failed: {type(e).__name__}: {e}')
  section.seconds = time.perf_counter() - t_start
  return section
