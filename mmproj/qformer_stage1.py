"""BLIP-2's first stage (Li et al. 2023, section 3.2) in the scenes regime: the 'qformer' connector's Q-Former learns,
before it meets the LM, to pull out of the frozen stage-0 ViT what the captions say, with ITC + ITM + ITG
(mmproj/projectors/qformer_losses.py). The LLaVA-style stages then start from it:

  ./launch.sh configs/scenes.py:qformer,pretrain --workdir runs/qformer_stage1
  ./launch.sh configs/scenes.py:qformer,align --workdir runs/qformer_align --config.init.projector=runs/qformer_stage1
  ./launch.sh configs/scenes.py:qformer,instruct --workdir runs/qformer --config.init.projector=runs/qformer_align

A run reads cfg.model.encoder and cfg.init.encoder (the frozen ViT), cfg.model.projector (the Q-Former's shape; its
text side embeds the world's vocabulary, model.lm.vocab_size, at data.text_len positions), cfg.data (the world's
image-caption pairs, captions tokenized as <bos> caption <eos>) and cfg.train (AdamW, steps, batch size; seed).
Batches are a pure function of (seed, step), the state is checkpointed with Orbax every checkpoint.every steps, and
an interrupted run resumes from its newest checkpoint. The workdir gets config.json and tokenizer.json as any run's,
and results.json: the last logging interval's mean losses and zero-shot image -> text retrieval through ITC on the
test split (top-1 among all test captions; chance 1 / num_test).

`mmproj.train.pretrained` takes the workdir as init.projector: the query tokens, ln_vision and the Q-Former's
layers come from it; its text embeddings and the ITC / ITM / ITG heads stay behind (the connector has no text
input), and language_projection, which stage 1 does not have, starts from its initialisation.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from mmproj import stage0
from mmproj.data import shapes
from mmproj.encoders import build_encoder
from mmproj.projectors.qformer import QFormerFields
from mmproj.projectors.qformer_losses import QFormerPretrainer
from mmproj.train import checkpoint, optimizer as opt_lib, paths, pretrained

OBJECTIVE = pretrained.QFORMER_STAGE1   # cfg.objective of such a run (mmproj/experiment.py dispatches on it)


def pretrainer(cfg) -> QFormerPretrainer:
  """The ITC / ITM / ITG model over the Q-Former cfg.model.projector describes."""
  proj = dict(cfg.model.projector)
  if proj.get('name') != 'qformer':
    raise ValueError(f'objective={OBJECTIVE!r} trains a Q-Former, but model.projector.name={proj.get("name")!r}')
  fields = {f.name for f in dataclasses.fields(QFormerFields)} - {'vocab_size', 'max_text_len', 'dtype', 'parent',
                                                                    'name'}
  kwargs = {k: v for k, v in proj.items() if k in fields}
  return QFormerPretrainer(in_dim=int(cfg.model.encoder.width), embed_dim=int(proj.get('hidden_dim', 768)),
                           vocab_size=int(cfg.model.lm.vocab_size), max_text_len=int(cfg.data.text_len), **kwargs)


def _retrieval(model, params, feats_fn, split, batch_size: int) -> dict:
  """Image -> text top-1 over the whole split through the ITC similarity."""
  n = len(split.images)
  image_feats = jax.jit(lambda p, x: model.apply({'params': p}, x, method='image_feats'))
  text_feats = jax.jit(lambda p, t, m: model.apply({'params': p}, t, m, method='text_feats'))
  zi = np.concatenate([image_feats(params, feats_fn(split.images[i:i + batch_size]))
                       for i in range(0, n, batch_size)])                        # [N, Q, E]
  zt = np.concatenate([text_feats(params, split.tokens[i:i + batch_size], split.mask[i:i + batch_size])
                       for i in range(0, n, batch_size)])                        # [N, E]
  sim = np.einsum('iqe,te->iqt', zi, zt).max(1)                                  # [N, N]
  return {'image_to_text': float(np.mean(sim.argmax(1) == np.arange(n))), 'chance': 1.0 / n, 'candidates': n}


def run(cfg, workdir: str, log=print, towers: dict | None = None) -> dict:
  """Trains (or resumes) the stage-1 Q-Former in `workdir` -> results (also written to results.json, with towers:
  the stage-0 towers it read, stage0.provenance)."""
  if not cfg.init.get('encoder'):
    raise ValueError(f'objective={OBJECTIVE!r} needs the frozen ViT: set init.encoder')
  workdir = paths.resolve(workdir)
  enc_cfg = cfg.copy_and_resolve_references()
  enc_cfg.init = ml_collections.ConfigDict(dict(encoder=cfg.init.encoder, lm=None, projector=None))
  vit_params = pretrained.load(enc_cfg)['encoder']
  vit = build_encoder(cfg.model.encoder)
  encode = jax.jit(lambda x: vit.apply({'params': vit_params}, x)[0])           # uint8 [B, H, W, 3] -> [B, N, Dv]
  _, tok = shapes.prepare(cfg.data)
  text_len, seed = int(cfg.data.text_len), int(cfg.seed)
  train = stage0.CaptionedSplit(cfg.data, tok, 'train', text_len)
  test = stage0.CaptionedSplit(cfg.data, tok, 'test', text_len)
  model = pretrainer(cfg)
  b, steps = int(cfg.train.batch_size), int(cfg.train.steps)
  image, tokens, mask = train.batch(np.arange(b))
  params = nn.unbox(model.init(jax.random.key(seed), encode(image), tokens, mask)['params'])
  tx = opt_lib.make_optimizer(cfg.train, jax.tree.map(lambda _: 'train', params))
  state = {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': tx.init(params)}
  base_rng = jax.random.key(seed + 1)

  @functools.partial(jax.jit, donate_argnums=0)
  def step_fn(state, feats, tokens, mask):
    rng = jax.random.fold_in(base_rng, state['step'])
    def loss_fn(p):
      out = model.apply({'params': p}, feats, tokens, mask, negatives_rng=rng)
      return out['loss'], out
    (_, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['params'])
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    return {'step': state['step'] + 1, 'params': optax.apply_updates(state['params'], updates),
            'opt_state': opt_state}, out

  checkpoint.save_run_files(workdir, cfg, tok)
  manager = ocp.CheckpointManager(checkpoint.checkpoint_dir(workdir), options=ocp.CheckpointManagerOptions(
      max_to_keep=int(cfg.checkpoint.keep), create=True))
  latest = manager.latest_step()
  if latest is not None:
    state = manager.restore(latest, args=ocp.args.StandardRestore(state))
    log(f'[qformer stage 1] resuming from step {latest}')
  every, log_every = int(cfg.checkpoint.every), int(cfg.log_every)
  logged, means, t0 = [], {}, time.time()
  try:             # on an error too: a pending save finishes, so the next run resumes from it
    for step in range(int(state['step']) + 1, steps + 1):
      index = np.random.default_rng([seed, step]).choice(len(train.images), b, replace=False)
      image, tokens, mask = train.batch(index)
      state, out = step_fn(state, encode(image), tokens, mask)
      logged.append(jax.device_get(out))
      if step % every == 0 or step == steps:
        manager.save(step, args=ocp.args.StandardSave(state))
      if step % log_every == 0 or step == steps:
        means = {k: float(np.mean([o[k] for o in logged])) for k in logged[0]}
        log(f'[qformer stage 1] step {step}/{steps} | ' + ' | '.join(f'{k} {v:.4f}' for k, v in means.items())
            + f' | {time.time() - t0:.0f}s')
        logged = []
  finally:
    manager.wait_until_finished()
    manager.close()
  results = {'qformer_stage1': {**{k: round(v, 4) for k, v in means.items()},
                                'retrieval': _retrieval(model, state['params'], encode, test, 250)},
             'steps': steps, 'train_seconds': round(time.time() - t0, 1)}
  if towers:
    results['stage0'] = towers
  if jax.process_index() == 0:
    paths.write_text(paths.join(workdir, 'results.json'), json.dumps(results, indent=2))
    log(f'[qformer stage 1] ITC image -> text top-1 {results["qformer_stage1"]["retrieval"]["image_to_text"]:.1%} '
        f'(chance {1 / len(test.images):.1%}); results: {os.path.join(workdir, "results.json")}')
  return results
