"""Stage 0 of the output side: the draw world's "given" generator, trained once per recipe and reused.

  python -m mmproj.stage0_generator configs/stage0/generator.py          # builds (or finds) it and prints the report
  python -m mmproj.stage0_generator configs/stage0/generator.py:smoke    # toy sizes, in seconds

The generator (mmproj/generators: a causal text encoder and a rectified-flow DiT conditioned on all its states)
plays Stable Diffusion's role in issue 22: output projectors map an LLM's signal-token states to its conditioning
and it, frozen, draws the picture. It is trained as GLIDE trains its text encoder (Nichol et al. 2022): both parts
from scratch, jointly, on the draw world's (image, caption) pairs (config_lib.draw_world: the scenes world at 32 px,
2x2 grid, 1-2 objects), each caption's conditioning replaced by the learned null conditioning with probability
train.caption_dropout so that classifier-free guidance works. AdamW with warmup + cosine decay
(mmproj/train/optimizer.py); the params saved are an exponential moving average of the trained ones (decay
min(train.ema_decay, (1 + step) / (10 + step))), as diffusion models are sampled from.

Written under stage0.cache_dir/<key>/ (key = a hash of the recipe without where things are stored and without
recipe.sample, the report's sampling settings: new ones sample the report again from the saved generator):
  generator/      mmproj.generators.save: generator.json + Orbax params (the EMA params)
  report.json     train time and final loss; sha256 (16 hex digits over the saved params: what a run that reads
                  the generator records, since one key can name different weights after a rebuild); the
                  flow-matching loss on the test split with its captions and with the null conditioning; the
                  recogniser's match rates (mmproj.eval.recognise.match_rates) of one image
                  sampled per test caption at the recipe's sampling steps and guidance, and at guidance 1 (no
                  classifier-free guidance) beside it, and of the real test images (the recogniser's own ceiling):
                  the "upper reference" the LLM + output projector pipeline is compared with
  samples.png     the first test images (left of each pair) beside the generator's samples at the recipe's guidance
  work/           Orbax checkpoints of the training state (an interrupted build resumes from the newest), the
                  training's seconds and losses up to each (train_history.json), its report (train_report.json)
One process builds a key at a time (a lock file beside it); `resolve(recipe)` builds when missing and returns the
generator's directory. The world is built under recipe.data.data_dir.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from mmproj import config_lib
from mmproj import generators
from mmproj.data import shapes
from mmproj.data.file_lock import file_lock
from mmproj.train import optimizer as opt_lib


STAGE0 = 'stage0'     # the cfg.init.generator value that means "the generator of cfg.generator"


def _print(msg: str) -> None:
  print(msg, flush=True)


SAMPLE_GRID_PAIRS = (8, 8)   # samples.png: rows x (real, sampled) pairs


# ----------------------------------------------------------------------------------------------- the recipe key


def key(recipe: Any) -> str:
  """12 hex digits naming the recipe's generator: every field but where things are stored and how the report
  samples (recipe.sample: a change there samples the report again from the saved generator, without training)."""
  r = recipe.to_dict() if hasattr(recipe, 'to_dict') else dict(recipe)
  r.pop('cache_dir', None)
  r.pop('sample', None)
  r['data'] = {k: v for k, v in r['data'].items() if k != 'data_dir'}
  return hashlib.sha256(json.dumps(r, sort_keys=True, default=str).encode()).hexdigest()[:12]


def directories(recipe: Any) -> dict[str, str]:
  root = os.path.join(shapes.local_dir('stage0.cache_dir', recipe.cache_dir), key(recipe))
  work = os.path.join(root, 'work')
  return {'root': root, 'generator': os.path.join(root, 'generator'), 'report': os.path.join(root, 'report.json'),
          'samples': os.path.join(root, 'samples.png'), 'work': work,
          'train_report': os.path.join(work, 'train_report.json')}


# ----------------------------------------------------------------------------------------------- data


class DrawSplit:
  """A split of the draw world read once: images uint8 [N, S, S, 3], caption tokens int32 [N, L], captions, and
  the objects of each scene (shapes.decode_record's dicts, what the recogniser checks samples against)."""

  def __init__(self, data_cfg: Any, tok: Any, split: str, text_len: int, limit: int | None = None):
    source = shapes.data_source(data_cfg, split)
    n = len(source) if limit is None else min(int(limit), len(source))
    records = [shapes.decode_record(source[i]) for i in range(n)]
    self.images = np.stack([r['image'] for r in records])                       # [N, S, S, 3]
    self.captions = [r['caption'] for r in records]
    self.tokens = generators.caption_tokens(tok, self.captions, text_len)      # [N, L]
    self.objects = [r['objects'] for r in records]


# ----------------------------------------------------------------------------------------------- training


def ema_decay(step, decay: float):
  """The EMA's decay at `step` (1-based): warmed up as (1 + step) / (10 + step), capped at train.ema_decay."""
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def train_generator(recipe: Any, workdir: str, tok: Any, log=_print) -> tuple[Any, Any, dict]:
  """Trains the generator (resuming from workdir's newest checkpoint) -> (Generator, EMA params, train report)."""
  t = recipe.train
  generator = generators.build(recipe.generator)
  train = DrawSplit(recipe.data, tok, 'train', generator.text_len)
  b, steps, every = int(t.batch_size), int(t.steps), int(t.checkpoint_every)
  if b > len(train.images):
    raise ValueError(f'generator.train.batch_size={b} > the {len(train.images)} training images (data.num_train)')
  init_rng, step_rng = jax.random.split(jax.random.key(int(t.seed)))
  abstract_params = jax.eval_shape(lambda: generators.init_params(generator, init_rng))
  tx = opt_lib.make_optimizer(t, jax.tree.map(lambda _: 'train', abstract_params))

  def state_of(params):
    return {'step': jnp.zeros((), jnp.int32), 'params': params, 'ema': jax.tree.map(jnp.copy, params),
            'opt_state': tx.init(params)}
  dropout, decay = float(t.caption_dropout), float(t.ema_decay)

  @functools.partial(jax.jit, donate_argnums=0)
  def step_fn(state, images, tokens, rng):
    drop_rng, loss_rng = jax.random.split(rng)

    def loss_fn(p):
      cond = generator.apply({'params': p}, tokens, method='encode_text')            # [B, L, Dc]
      null = generator.apply({'params': p}, tokens.shape[0], method='null_condition')
      drop = jax.random.bernoulli(drop_rng, dropout, (tokens.shape[0],))
      cond = jnp.where(drop[:, None, None], null, cond)                                # CFG's caption dropout
      return generators.flow_matching_loss(generator, p, images, cond, loss_rng)
    loss, grads = jax.value_and_grad(loss_fn)(state['params'])
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    step = state['step'] + 1
    d = ema_decay(step.astype(jnp.float32), decay)
    ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, state['ema'], params)
    return {'step': step, 'params': params, 'ema': ema, 'opt_state': opt_state}, loss

  manager = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'),
                                  options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
  # The training seconds and logged losses up to each checkpoint, so that a resumed build reports the whole run.
  history_file = os.path.join(workdir, 'train_history.json')
  history = json.load(open(history_file)) if os.path.isfile(history_file) else {'seconds': {}, 'losses': {}}
  latest = manager.latest_step()
  if latest is None:
    state = jax.jit(state_of)(generators.init_params(generator, init_rng))   # one program, not one per leaf
  else:                                       # restored onto the state's shapes: nothing to initialise or compile
    one_device = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(jax.devices()[:1]), ('one',)),
                                            jax.sharding.PartitionSpec())
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one_device),
                            jax.eval_shape(state_of, abstract_params))
    # Host copies: arrays placed like a fresh state's (uncommitted), so the step compiles to the same program
    # (a persistent compilation cache then serves it).
    state = jax.device_get(manager.restore(latest, args=ocp.args.StandardRestore(abstract)))
    log(f'[stage0 generator] resuming from step {latest}')
  losses = {k: v for k, v in history['losses'].items() if int(k) <= (latest or 0)}   # {step: mean loss}
  before = float(history['seconds'].get(str(latest), 0.0))
  recent, t0 = [], time.time()
  try:             # on an error too: a pending save finishes, so the next run resumes from it
    for step in range(int(state['step']) + 1, steps + 1):
      # The batch and the noise are pure functions of (seed, step): a resumed run sees what it would have seen.
      index = np.random.default_rng([int(t.seed), step]).choice(len(train.images), b, replace=False)
      state, loss = step_fn(state, train.images[index], train.tokens[index], jax.random.fold_in(step_rng, step))
      recent.append(float(loss))
      logged = step % int(t.log_every) == 0 or step == steps
      if logged:
        losses[str(step)] = float(np.mean(recent))
        recent = []
      if step % every == 0 or step == steps:
        manager.save(step, args=ocp.args.StandardSave(state))
        history['seconds'][str(step)] = round(before + time.time() - t0, 1)
        history['losses'] = losses
        with open(history_file + '.tmp', 'w') as f:
          json.dump(history, f)
        os.replace(history_file + '.tmp', history_file)
      if logged:
        log(f'[stage0 generator] step {step}/{steps} loss {losses[str(step)]:.4f} ({before + time.time() - t0:.0f}s)')
  finally:
    manager.wait_until_finished()
    manager.close()
  curve = sorted((int(k), v) for k, v in losses.items())
  report = {'steps': steps, 'batch_size': b, 'param_count': generators.param_count(state['params']),
            'saved_params': f'EMA of the trained params, decay min({decay}, (1 + step) / (10 + step))',
            'train_seconds': float(history['seconds'].get(str(steps), round(before + time.time() - t0, 1))),
            'final_loss': curve[-1][1] if curve else None, 'losses': curve}
  return generator, jax.device_get(state['ema']), report


# ----------------------------------------------------------------------------------------------- evaluation


def test_loss(generator, params, split: DrawSplit, batch_size: int, seed: int) -> dict[str, float]:
  """The flow-matching loss over the split (t and noise from a fixed key per batch) with each image's caption
  conditioning and with the null conditioning: how much the text tells the generator."""
  @jax.jit
  def losses(params, images, tokens, rng):
    cond = generator.apply({'params': params}, tokens, method='encode_text')
    null = generator.apply({'params': params}, tokens.shape[0], method='null_condition')
    return (generators.flow_matching_loss(generator, params, images, cond, rng),
            generators.flow_matching_loss(generator, params, images, null, rng))
  total, n = np.zeros(2), 0
  for i in range(0, len(split.images), batch_size):
    images, tokens = split.images[i:i + batch_size], split.tokens[i:i + batch_size]
    total += len(images) * np.array(losses(params, images, tokens, jax.random.fold_in(jax.random.key(seed), i)))
    n += len(images)
  return {'caption': float(total[0] / n), 'null': float(total[1] / n)}


def draw(generator, params, tokens: np.ndarray, *, steps: int, guidance: float, batch_size: int, seed: int
         ) -> np.ndarray:
  """One image per caption (tokens [N, L]) -> uint8 [N, S, S, 3]; batch i's noise from fold_in(key(seed), i)."""
  @jax.jit
  def run(params, tokens, rng):
    cond = generator.apply({'params': params}, tokens, method='encode_text')
    return generators.sample(generator, params, cond, rng, steps=steps, guidance=guidance)
  return np.concatenate([np.asarray(run(params, tokens[i:i + batch_size], jax.random.fold_in(jax.random.key(seed), i)))
                         for i in range(0, len(tokens), batch_size)])


def sample_report(recipe: Any, generator, params, test: DrawSplit, log=_print) -> tuple[dict, np.ndarray]:
  """The recogniser's match rates of images drawn from the test captions at the recipe's guidance and at
  guidance 1, and of the real test images -> (report, the guided samples)."""
  from mmproj.eval import recognise      # the recogniser reads the images (eval ranks below stage0)

  s, grid = recipe.sample, int(recipe.data.grid)
  n = len(test.images) if s.num_images is None else min(int(s.num_images), len(test.images))
  objects = test.objects[:n]
  kwargs = dict(steps=int(s.steps), batch_size=int(s.batch_size), seed=int(s.seed))
  guidance = float(s.guidance)
  t0 = time.time()
  guided = draw(generator, params, test.tokens[:n], guidance=guidance, **kwargs)
  seconds = time.time() - t0
  report = {'steps': int(s.steps), 'guidance': guidance, 'num_images': n, 'sample_seconds': round(seconds, 1),
            'match_rates': recognise.match_rates(guided, objects, grid=grid)}
  if guidance != 1.0:
    plain = draw(generator, params, test.tokens[:n], guidance=1.0, **kwargs)
    report['match_rates_guidance_1'] = recognise.match_rates(plain, objects, grid=grid)
  else:
    report['match_rates_guidance_1'] = report['match_rates']
  report['match_rates_real_images'] = recognise.match_rates(test.images[:n], objects, grid=grid)
  log(f"[stage0 generator] {n} test captions sampled in {seconds:.0f}s: object match "
      f"{report['match_rates']['object']:.1%} at guidance {guidance}, "
      f"{report['match_rates_guidance_1']['object']:.1%} at guidance 1")
  return report, guided


def write_sample_grid(path: str, real: np.ndarray, sampled: np.ndarray, pairs: tuple[int, int] = SAMPLE_GRID_PAIRS
                      ) -> None:
  """A PNG of rows x cols (real, sampled) image pairs, 2 px apart (as many as there are images)."""
  from PIL import Image

  rows, cols = pairs
  n = min(len(real), len(sampled), rows * cols)
  rows = -(-n // cols)
  s, gap = real.shape[1], 2
  canvas = np.full((rows * (s + gap) + gap, cols * (2 * s + 3 * gap) + gap, 3), 255, np.uint8)
  for i in range(n):
    y, x = gap + (i // cols) * (s + gap), gap + (i % cols) * (2 * s + 3 * gap)
    canvas[y:y + s, x:x + s] = real[i]
    canvas[y:y + s, x + s + gap:x + 2 * s + gap] = sampled[i]
  Image.fromarray(canvas).save(path + '.tmp.png')
  os.replace(path + '.tmp.png', path)


# ----------------------------------------------------------------------------------------------- build / resolve


def _generator_saved(directory: str) -> bool:
  return os.path.isfile(os.path.join(directory, generators.storage.CONFIG_FILE))


def _write_json(path: str, value: Any) -> None:
  with open(path + '.tmp', 'w') as f:
    json.dump(value, f, indent=2, default=str)
  os.replace(path + '.tmp', path)


def is_built(recipe: Any) -> bool:
  """The generator is saved and the report holds samples at the recipe's sampling settings."""
  d = directories(recipe)
  if not (os.path.isfile(d['report']) and _generator_saved(d['generator'])):
    return False
  with open(d['report']) as f:
    return json.load(f)['recipe'].get('sample') == recipe.sample.to_dict()


def build(recipe: Any, log=_print) -> dict[str, str]:
  """Builds the recipe's generator and its report when missing (one process at a time) -> directories(recipe).
  A saved generator is not trained again: only its report is made (after a build killed while sampling, or for new
  sampling settings)."""
  d = directories(recipe)
  with file_lock(d['root'] + '.lock'):
    if is_built(recipe):
      return d
    _, tok = shapes.prepare(recipe.data)
    if _generator_saved(d['generator']) and os.path.isfile(d['train_report']):
      generator, params, _ = generators.load(d['generator'])
      with open(d['train_report']) as f:
        train_report = json.load(f)
    else:
      generator, params, train_report = train_generator(recipe, d['work'], tok, log)
      _write_json(d['train_report'], train_report)
      shutil.rmtree(d['generator'], ignore_errors=True)     # what a build killed while saving left
      generators.save(d['generator'], recipe.generator, params)
    test = DrawSplit(recipe.data, tok, 'test', generator.text_len)
    s = recipe.sample
    report = {'key': key(recipe), 'recipe': recipe.to_dict(), 'train': train_report, 'sha256': params_sha256(params),
              'test_loss': test_loss(generator, params, test, int(s.batch_size), int(s.seed))}
    report['samples'], guided = sample_report(recipe, generator, params, test, log)
    write_sample_grid(d['samples'], test.images, guided)
    _write_json(d['report'], report)
  return d


def resolve(recipe: Any, log=_print) -> str:
  """The directory of the recipe's generator (mmproj.generators.load reads it), built first when missing."""
  return build(recipe, log)['generator']


def resolve_init(cfg, log=_print):
  """cfg with init.generator='stage0' replaced by the directory of cfg.generator's generator (built first when
  missing, its world under the experiment's data.data_dir); cfg unchanged otherwise."""
  if cfg.init.get('generator') != STAGE0:
    return cfg
  if cfg.get('generator') is None:
    raise ValueError("init.generator='stage0' but the config has no generator recipe (config_lib.generator_recipe)")
  cfg = cfg.copy_and_resolve_references()
  cfg.generator.data.data_dir = cfg.data.data_dir
  cfg.init.generator = resolve(cfg.generator, log)
  return cfg


def params_sha256(params: Any) -> str:
  """16 hex digits of a sha256 over the params' leaves (path, dtype, shape, bytes). The params, not the saved
  files, are hashed: Orbax's metadata holds timestamps, so equal weights saved twice give different files."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    leaf = np.ascontiguousarray(np.asarray(leaf))
    h.update(f'{jax.tree_util.keystr(path)} {leaf.dtype} {leaf.shape};'.encode())
    h.update(leaf.tobytes())
  return h.hexdigest()[:16]


def digest(recipe: Any) -> str:
  """The built generator's params_sha256, kept in report.json (a generator built before the field gets it on first
  use)."""
  found = report(recipe)
  if 'sha256' in found:
    return found['sha256']
  d = directories(recipe)
  with file_lock(d['root'] + '.lock'):
    found = report(recipe)
    if 'sha256' not in found:
      found['sha256'] = params_sha256(generators.load(d['generator'])[1])
      _write_json(d['report'], found)
  return found['sha256']


def provenance(cfg) -> dict[str, str] | None:
  """The stage-0 generator a run reads (call it with the generator built): {'key': recipe key, 'generator': its
  digest}; None for a run whose init.generator is not 'stage0'."""
  if cfg.init.get('generator') != STAGE0 or cfg.get('generator') is None:
    return None
  return {'key': key(cfg.generator), 'generator': digest(cfg.generator)}


def report(recipe: Any) -> dict:
  with open(directories(recipe)['report']) as f:
    return json.load(f)


def format_report(r: dict) -> str:
  t, s, loss = r['train'], r['samples'], r['test_loss']
  rates = lambda m: ', '.join(f'{k} {v:.1%}' for k, v in m.items())
  return '\n'.join([
      f"stage0 generator {r['key']}: {t['param_count']:,} params, {t['steps']} steps at batch {t['batch_size']} in "
      f"{t['train_seconds']:.0f}s, final train loss {t['final_loss']:.4f}"
      + (f", weights sha256 {r['sha256']}" if 'sha256' in r else ''),
      f"  test flow-matching loss {loss['caption']:.4f} with the captions, {loss['null']:.4f} with the null "
      'conditioning',
      f"  recogniser on {s['num_images']} samples of test captions ({s['steps']} Euler steps, "
      f"{s['sample_seconds']:.0f}s):",
      f"    guidance {s['guidance']}: {rates(s['match_rates'])}",
      f"    guidance 1 (no CFG): {rates(s['match_rates_guidance_1'])}",
      f"    real test images: {rates(s['match_rates_real_images'])}"])


def main(argv=None) -> int:
  recipe = config_lib.recipe_from_command_line('mmproj.stage0_generator', __doc__.split('\n\n')[0],
                                                'configs/stage0/generator.py', argv)
  d = build(recipe)
  print(format_report(report(recipe)))
  print(f"  generator: {d['generator']}\n  samples: {d['samples']}")
  return 0


if __name__ == '__main__':
  sys.exit(main())
