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
          pretrained paths), trainer.setup + trainer.make_train_step, state = those params + tx.init; once per
          kernel setting (benchmarks.SETTINGS: xla, the default, and cpu-tuned, which the goal is judged on).
theirs runs in a process of its own (TorchWorker: built there from the same seed), ours in this one, from which
the HF model is deleted once converted, so that neither framework's heap, page state or thread pools are in the
other's way, as in real use (`python -m benchmarks.diagnose train-step` times ours alone, theirs alone, and
both in one process).
Before timing, both compute the loss of the same batch from the same weights; it must agree to LOSS_RTOL.
Timing interleaves ours (each setting) / theirs, two back-to-back steps per side and round with the second timed: a
training loop's steady state (the first step, right after the other side's, runs with its memory and caches; its
times are reported too), warm-up excluded, median; tokens/s = B * L / time. FLOPs: mmproj.train.flops.step_flops,
what the step runs (tests/test_flops.py checks it against the traced gradient program and XLA's cost analysis).
"""

from __future__ import annotations

import gc
import math
import time
from typing import Any

import numpy as np

from benchmarks import GOAL_SETTING, SETTINGS, Options, PeakProbe, Row, Section, format_profile, interleaved
from benchmarks import flop_str, median, profile_jax, profile_torch, ratio, spread, xla_cost

LOSS_RTOL = 1e-3
GOAL_SPEEDUP = 1.5
BACK_TO_BACK = 2      # steps per side and round; the last is timed (see benchmarks.interleaved)
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


def experiment_config(cfg_model: dict, z: dict[str, Any], setting: str = GOAL_SETTING):
  """configs/llava15_stage1.py's experiment with the converted model, no pretrained paths, f32, batch z['batch'],
  text_len z['text'], model.kernels of the bench setting."""
  import ml_collections

  from mmproj import config_lib

  missing = '/nonexistent/mmproj-bench'
  c = config_lib.llava15_experiment(f'vision={missing},lm={missing},tokenizer={missing},dtype=float32,'
                                    f'batch={z["batch"]},text_len={z["text"]},steps=1000',
                                    stage=1, name='bench_llava15_stage1')
  c.model = ml_collections.ConfigDict(dict(cfg_model, dtype='float32', kernels=SETTINGS[setting]))
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


def prepare(z: dict[str, Any], settings: tuple[str, ...] = tuple(SETTINGS)):
  """-> ({setting: setup}, params, ours_batch, theirs_batch): ours' experiment on the weights of build_hf(z),
  converted, under each kernel setting of `settings`; the HF model itself is dropped (theirs is rebuilt from the
  same seed where it runs)."""
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
  setups = {k: trainer.setup(experiment_config(cfg_model, z, k)) for k in settings}
  s = next(iter(setups.values()))
  ours_batch, theirs_batch = make_batch(z, s.num_image_tokens, cfg_model['encoder']['image_mean'],
                                        cfg_model['encoder']['image_std'])
  assert ours_batch['tokens'].shape[1] == s.seq_len, (ours_batch['tokens'].shape, s.seq_len)
  return setups, params, ours_batch, theirs_batch


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
  """Builds both sides, checks the loss, times them -> one row per kernel setting of ours. probe: samples the
  matmul peak in every timed round (benchmarks.PeakProbe); the roofline reads against it."""
  section = Section('train_step', 'Full LLaVA stage-1 train step vs transformers (f32)',
                    ['step', 'model', 'batch x L', 'loss (ours / theirs)', 'ours (s)', 'theirs (s)',
                     'ours tok/s', 'theirs tok/s', 'ratio', 'ours matmul TFLOP', 'ours GFLOP/s', 'XLA peak GFLOP/s',
                     'roofline', 'spread (ours / theirs)'])
  if not opts.wants('train_step/llava_stage1'):
    return section
  z = sizes(opts.quick)
  t_start = time.perf_counter()
  setups, params, ours_batch, theirs_batch = prepare(z, opts.settings)
  # theirs: in its own process (TorchWorker), built from the same seed; this process keeps only ours.
  worker = TorchWorker(z, theirs_batch, opts.threads)
  try:
    return _measure(opts, peaks, probe, section, worker, z=z, setups=setups, params=params, ours_batch=ours_batch,
                    t_start=t_start)
  finally:
    worker.close()


def _measure(opts, peaks, probe, section, worker, *, z, setups, params, ours_batch, t_start) -> Section:
  """The timed part of run (theirs served by `worker`)."""
  import jax
  import jax.numpy as jnp

  from mmproj.train import flops as flops_lib
  from mmproj.train import trainer

  s = next(iter(setups.values()))
  seq, n_img = s.seq_len, s.num_image_tokens
  tokens_per_step = z['batch'] * seq
  # Per setting: query_blocks attention computes fewer score FLOPs than xla's.
  executed = {k: float(flops_lib.step_flops(sk.cfg, labels=sk.labels)['total']) for k, sk in setups.items()}
  steps, execs, losses = {}, {}, {}
  for k, sk in setups.items():
    with jax.set_mesh(sk.mesh):
      box = [jax.jit(lambda p, sk=sk: trainer.TrainState.create(p, sk.tx.init(p)),
                     out_shardings=sk.state_sharding)(jax.tree.map(jnp.copy, params))]
      batch = trainer.global_batch(sk, ours_batch)
      # Compiled ahead of time once: the executable is timed, profiled and cost-analysed.
      execs[k] = trainer.make_train_step(sk).lower(box[0], batch, jax.random.key(1)).compile()

      def go(box=box, batch=batch, fn=execs[k]):
        box[0], metrics = fn(box[0], batch, jax.random.key(1))
        jax.block_until_ready((box[0], metrics))
        return metrics
      steps[k] = go
      # Same weights, same batch: the loss our first train step reports (computed before its update).
      losses[k] = float(go()['loss'])
  loss_theirs = float(worker.call('loss'))
  errors = {k: abs(v - loss_theirs) / abs(loss_theirs) for k, v in losses.items()}
  opts.log(f'  llava stage 1: loss ' + ', '.join(f'{k} {v:.6f}' for k, v in losses.items()) +
           f', theirs {loss_theirs:.6f}; attention {worker.call("attn")}')
  model = (f'ViT {z["vwidth"]}x{z["vdepth"]} @{z["image"]}px/{z["patch"]} + Llama {z["width"]}x{z["depth"]} '
           f'(vocab {z["vocab"]}), {sum(int(np.size(a)) for a in jax.tree.leaves(params)) / 1e6:.0f}M params')
  rows = {k: Row(f'train_step/llava_stage1_{k}', {
      'step': f'stage 1 (projector trains), {k}', 'model': model,
      'batch x L': f'{z["batch"]} x {seq} ({n_img} image + {seq - n_img} text)',
      'loss (ours / theirs)': f'{losses[k]:.5f} / {loss_theirs:.5f}'}) for k in setups}
  if not all(e <= LOSS_RTOL for e in errors.values()):
    for k, row in rows.items():
      row.notes.append(f'LOSS MISMATCH: ours {losses[k]} vs theirs {loss_theirs}: not timed')
      row.goal('>= 1.5x tokens/s of transformers', math.nan, GOAL_SPEEDUP)
    section.rows.extend(rows.values())
    return section
  opts.log(f'  setup {time.perf_counter() - t_start:.0f} s; matmul FLOPs per step ' +
           ', '.join(f'{k} {flop_str(v)}' for k, v in executed.items()))
  fns = [(f'ours {k}', steps[k]) for k in setups] + [('theirs', lambda: worker.call('step'))]
  if probe is not None:
    probe.reset()
    fns.append(('peak probe', probe))
  times = interleaved(fns, iters=opts.iters, warmup=opts.warmup, log=opts.log, back_to_back=BACK_TO_BACK)
  t_theirs = median(times['theirs'])
  if probe is not None:
    peaks = dict(peaks, xla_f32=probe.xla(peaks['xla_f32']), torch_f32=probe.torch(peaks['torch_f32']))
  for k, row in rows.items():
    t_ours = median(times[f'ours {k}'])
    gflops = executed[k] / t_ours / 1e9
    row.values.update({'ours (s)': t_ours, 'theirs (s)': t_theirs, 'ours tok/s': tokens_per_step / t_ours,
                       'theirs tok/s': tokens_per_step / t_theirs, 'ratio': ratio(t_theirs, t_ours),
                       'ours matmul TFLOP': executed[k] / 1e12, 'ours GFLOP/s': gflops,
                       'XLA peak GFLOP/s': peaks['xla_f32'] / 1e9, 'roofline': gflops * 1e9 / peaks['xla_f32'],
                       'spread (ours / theirs)': f'{spread(times[f"ours {k}"]):.0%} / {spread(times["theirs"]):.0%}'})
    first_ours, first_theirs = median(times[f'ours {k} [first]']), median(times['theirs [first]'])
    row.notes.append(f'each side is timed on the second of {BACK_TO_BACK} back-to-back steps (a training loop\'s '
                     f'steady state); the first, right after the other side\'s step: ours {first_ours:.2f} s, '
                     f'theirs {first_theirs:.2f} s (ratio {ratio(first_theirs, first_ours):.2f})')
  if GOAL_SETTING in rows:
    rows[GOAL_SETTING].goal(f'>= 1.5x tokens/s of transformers ({GOAL_SETTING})',
                            rows[GOAL_SETTING].values['ratio'], GOAL_SPEEDUP)
  section.rows.extend(rows.values())
  section.intro.append(
      'theirs = `LlavaForConditionalGeneration` (sdpa attention) with the vision tower and LM at requires_grad=False, '
      'AdamW + clip_grad_norm_(1.0) on the projector; ours = `trainer.setup` + `trainer.make_train_step` of '
      'configs/llava15_stage1.py (model replaced by the converted HF one, f32; model.kernels per row: xla, the '
      'default, and cpu-tuned, in the full run each in its own process with theirs timed again beside it), same '
      'weights (converted with `mmproj.convert.llava`), same batch; the loss of both agrees before timing '
      '(column loss). ratio = theirs time / ours time = ours tokens/s / theirs tokens/s.')
  for k, e in execs.items():
    rows[k].notes.append(f'XLA\'s cost analysis of this compiled step: {flop_str(xla_cost(e, "flops"))}')
  section.notes.append(
      f'ours matmul TFLOP: mmproj.train.flops.step_flops at the {s.loss_positions or seq} loss positions per row '
      'this batch runs (query_blocks attention computes only the causal blocks of the scores: fewer FLOPs than '
      'xla\'s). XLA\'s cost analysis (in each row\'s notes) counts the loss\'s lax.cond at its larger, '
      'all-position branch, and elementwise work; the frozen LM\'s weight gradients, which the step never reads, '
      'are not in the compiled program.')
  goal_row = rows.get(GOAL_SETTING)
  if goal_row is not None and opts.profile and not all(g[3] for g in goal_row.goals):
    try:
      t_ours = goal_row.values['ours (s)']
      t_mm = executed[GOAL_SETTING] / peaks['xla_f32']
      goal_row.notes.append(f'bounds: the step\'s matmul FLOPs at the XLA peak take {t_mm:.2f} s '
                            f'({t_mm / t_ours:.0%} of ours)')
      with jax.set_mesh(s.mesh):
        goal_row.notes.append(format_profile(profile_jax(steps[GOAL_SETTING], execs[GOAL_SETTING].as_text(),
                                                         calls=1, flops=executed[GOAL_SETTING]), 'ours'))
      goal_row.notes.append(format_profile(worker.call('profile'), 'theirs'))
    except Exception as e:  # pylint: disable=broad-except
      goal_row.notes.append(f'profile failed: {type(e).__name__}: {e}')
  section.seconds = time.perf_counter() - t_start
  return section
