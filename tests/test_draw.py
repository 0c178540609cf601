"""The output side end to end (configs/draw.py): signal tokens in the tokenizer, the model and generation; the
draw rows; the stage-1 (align) and stage-2 (generate) losses in the one trainer, resume, freezing, errors."""
from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiment_utils import tiny_draw


def test_draw_tokenizer_appends_ids():
  from mmproj.data import draw, shapes, tokenizer as tokenizer_lib
  world = shapes.make_tokenizer('scenes')
  tok = draw.extend_tokenizer(world, {'name': 'shapes', 'world': 'scenes', 'task': 'draw', 'signal_tokens': 3})
  assert all(tok.token_to_id(w) == i for w, i in world.get_vocab().items())       # a pretrained LM's rows keep
  first = draw.signal_token_id(tok)
  assert first == tokenizer_lib.vocab_size(world) + 1 == tok.token_to_id('draw') + 1
  ids = tokenizer_lib.encode(tok, 'draw large red circle top left <sep> [IMG0] [IMG1] [IMG2]')
  assert ids[-3:] == [first, first + 1, first + 2] and ids[0] == tok.token_to_id('draw')
  with pytest.raises(ValueError, match="'draw' is already"):
    tokenizer_lib.extend(tok, words=['draw'])
  with pytest.raises(ValueError, match='max_vocab_size=75'):
    tokenizer_lib.extend(world, words=['draw'], specials=[f'[IMG{i}]' for i in range(5)], max_vocab_size=75)


def test_draw_rows(draw_dirs):
  from mmproj import generators
  from mmproj.data import draw, prepare, shapes, tokenizer as tokenizer_lib
  data_dir, _ = draw_dirs
  cfg = tiny_draw(data_dir, None)
  _, tok = prepare(cfg.data)
  row_maker = draw._row_maker(cfg.data, tok, 'train')  # pylint: disable=protected-access
  record = shapes.decode_record(shapes.data_source(cfg.data, 'train')[3])
  row = row_maker.random_map({**record, 'index': 3}, np.random.default_rng(0))
  k, first = cfg.data.signal_tokens, draw.signal_token_id(tok)
  real = row['tokens'][row['input_mask'] == 1].tolist()
  want = ([tokenizer_lib.BOS_ID] + tokenizer_lib.encode(tok, 'draw ' + record['caption']) + [tokenizer_lib.SEP_ID]
          + list(range(first, first + k)) + [tokenizer_lib.EOS_ID])
  assert real == want
  # The loss is on the K signal tokens and the <eos>, predicted from <sep> onwards.
  sep = real.index(tokenizer_lib.SEP_ID)
  assert np.flatnonzero(row['loss_mask']).tolist() == list(range(sep, sep + k + 1))
  assert row['targets'][sep:sep + k + 1].tolist() == list(range(first, first + k)) + [tokenizer_lib.EOS_ID]
  np.testing.assert_array_equal(row['gen_text'], generators.caption_tokens(tok, [record['caption']],
                                                                           cfg.data.gen_text_len)[0])
  np.testing.assert_array_equal(row['gen_image'], record['image'])
  assert 'image' not in row                          # the picture is the answer, never the input


def test_signal_rows_are_the_output_sides(draw_dirs):
  """The signal tokens' embeddings and logits come from params['output'], every other id's from the LM."""
  from mmproj import model as model_lib
  from mmproj.train import state as state_lib
  cfg = tiny_draw(draw_dirs[0], None)
  s = state_lib.setup(cfg, jax.devices()[:1])
  params = jax.tree.map(lambda a: jax.random.normal(jax.random.key(1), a.shape, a.dtype), s.abstract_state.params)
  first, k = cfg.model.output.signal_token_id, cfg.model.output.num_signal_tokens
  tokens = jnp.array([[1, 8, first, first + k - 1, 2]], jnp.int32)
  x = s.model.apply({'params': params}, tokens, method='embed_text')
  np.testing.assert_allclose(x[0, 2], params['output']['signal_embed'][0], rtol=1e-6)
  np.testing.assert_allclose(x[0, 3], params['output']['signal_embed'][k - 1], rtol=1e-6)
  np.testing.assert_allclose(x[0, 1], params['lm']['embed_tokens']['embedding'][8], rtol=1e-6)
  hidden = jax.random.normal(jax.random.key(2), (1, 3, cfg.model.lm.width))
  logits = s.model.apply({'params': params}, hidden, method='head')
  plain = model_lib.build_model(_without_output(cfg.model))
  lm_logits = plain.apply({'params': {'lm': params['lm']}}, hidden, method='head')
  others = np.r_[0:first, first + k:cfg.model.lm.vocab_size]
  np.testing.assert_allclose(logits[..., others], lm_logits[..., others], rtol=1e-5, atol=1e-5)
  assert not np.allclose(logits[..., first:first + k], lm_logits[..., first:first + k])


def _without_output(cfg_model):
  c = cfg_model.copy_and_resolve_references()
  del c['output']
  return c


def test_frozen_parts_get_no_optimizer_state(draw_dirs):
  """Only the output side trains: the LM and the generator have labels 'freeze' and no Adam moments."""
  from mmproj.train import optimizer as opt_lib, state as state_lib
  cfg = tiny_draw(draw_dirs[0], None)
  s = state_lib.setup(cfg, jax.devices()[:1])
  labels = {k: set(jax.tree.leaves(v)) for k, v in s.labels.items()}
  assert labels == {'lm': {'freeze'}, 'output': {'train'}, 'generator': {'freeze'}}
  moments = [opt_lib.path_str(p) for p, leaf in jax.tree_util.tree_flatten_with_path(s.abstract_state.opt_state)[0]
             if leaf.ndim > 0]
  assert moments and all('output/' in m for m in moments), moments
  n_output = len(jax.tree.leaves(s.abstract_state.params['output']))
  assert len(moments) == 2 * n_output              # Adam's mu and nu of each output-side param, nothing else


def test_config_errors(draw_dirs):
  from mmproj.train import state as state_lib
  cfg = tiny_draw(draw_dirs[0], None)
  cfg.train.trainable, cfg.train.frozen = ['.*'], ['lm/.*']
  with pytest.raises(ValueError, match="generator/.*stays frozen"):
    state_lib.setup(cfg, jax.devices()[:1])
  cfg = tiny_draw(draw_dirs[0], None)
  cfg.train.output_loss = 'mse'
  with pytest.raises(ValueError, match="train.output_loss='mse'"):
    state_lib.setup(cfg, jax.devices()[:1])
  cfg = tiny_draw(draw_dirs[0], None)
  cfg.model.output.signal_token_id = cfg.model.lm.vocab_size - 1
  with pytest.raises(ValueError, match='model.output.signal_token_id=.*exceeds model.lm.vocab_size'):
    state_lib.setup(cfg, jax.devices()[:1])
  cfg = tiny_draw(draw_dirs[0], None)
  cfg.model.output.projector.name = 'resampler'
  with pytest.raises(ValueError, match='model.output.projector.name'):
    state_lib.setup(cfg, jax.devices()[:1])
  cfg = tiny_draw(draw_dirs[0], None)
  cfg.model.output.generator.patch_size = 5
  with pytest.raises(ValueError, match='model.output.generator.patch_size'):
    state_lib.setup(cfg, jax.devices()[:1])
  cfg = tiny_draw(draw_dirs[0], None)
  cfg.data.task = None
  with pytest.raises(ValueError, match="data.task='draw'"):
    state_lib.setup(cfg, jax.devices()[:1])


def test_init_generator_checked(draw_dirs, tmp_path):
  from mmproj.train import pretrained
  cfg = tiny_draw(*draw_dirs)
  cfg.model.output.generator.depth += 1
  with pytest.raises(ValueError, match=r'model.output.generator.depth=\d+ but init.generator'):
    pretrained.check(cfg)
  cfg = tiny_draw(draw_dirs[0], str(tmp_path / 'missing'))
  with pytest.raises(FileNotFoundError, match='init.generator'):
    pretrained.check(cfg)


def test_two_stages_train_and_evaluate(draw_runs, draw_dirs):
  """Stage 1 lowers the alignment loss; stage 2 starts from stage 1's output side and trains through the frozen
  generator; both write the draw figures, the sample grid and keep the generator's weights as loaded."""
  from mmproj import generators
  from mmproj.train import checkpoint as ckpt_lib
  root, align, generate = draw_runs
  for results, run in ((align, 'align'), (generate, 'generate')):
    d = results['draw']
    assert set(d['pipeline']) == set(d['reference']) >= {'shape', 'color', 'size', 'cell', 'object', 'image'}
    assert d['examples'] == 8 and 0 <= d['signal_first'] <= 1 and d['condition_mse'] >= 0
    assert (root / run / 'draw_samples.png').stat().st_size > 1000
    assert json.loads((root / run / 'results.json').read_text())['draw']['examples'] == 8
  records = [json.loads(line) for line in (root / 'align' / 'metrics.jsonl').read_text().splitlines()]
  assert records[-1]['output_loss'] < records[0]['output_loss']
  assert {'token_loss', 'output_loss', 'loss'} <= set(records[-1])
  # The generator is exactly the loaded one after training (frozen), and stage 2 began from stage 1's output.
  _, gen_params, _ = generators.load(draw_dirs[1])
  cfg, _ = ckpt_lib.read_run_files(str(root / 'generate'))
  from mmproj.train import state as state_lib
  cfg.mesh.update(data=-1, fsdp=1, tensor=1)
  s = state_lib.setup(cfg, jax.devices()[:1])
  restored, _ = ckpt_lib.restore_state(str(root / 'generate'), s.abstract_state)
  for a, b in zip(jax.tree.leaves(restored.params['generator']), jax.tree.leaves(gen_params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_stage1_resumes_exactly(draw_dirs, tmp_path):
  """A stage-1 run stopped at step 3 and resumed ends with the params of one that never stopped."""
  from mmproj.train import trainer
  data_dir, gen_dir = draw_dirs
  whole = trainer.train(tiny_draw(data_dir, gen_dir), str(tmp_path / 'whole'))
  half = tiny_draw(data_dir, gen_dir)
  half.train.steps = 3
  trainer.train(half, str(tmp_path / 'split'))
  resumed = trainer.train(tiny_draw(data_dir, gen_dir), str(tmp_path / 'split'))
  assert resumed.resumed_from == 3
  for a, b in zip(jax.tree.leaves(whole.state.params['output']), jax.tree.leaves(resumed.state.params['output'])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_generate_draws_where_the_signal_is(draw_runs):
  """mmproj.generate on a draw model: a Reply per prompt, with a picture exactly where [IMG0] was emitted; the
  picture is the one the generator draws from the hidden states at the K appended signal tokens."""
  import mmproj
  from mmproj import inference
  root = draw_runs[0]
  bundle = mmproj.load(str(root / 'generate'))
  prompts = ['draw large red circle top left', 'draw small blue square bottom right']
  replies, ids = mmproj.generate(bundle, None, prompts, max_new_tokens=6, return_ids=True, image_steps=2)
  first = int(bundle.config.model.output.signal_token_id)
  for reply, row in zip(replies, ids):
    assert isinstance(reply, mmproj.Reply) and '[IMG' not in reply.text
    assert (reply.image is not None) == (first in row.tolist())
  # The signal path itself, with ids that emit [IMG0] after one word and ids that do not.
  rows = {k: np.asarray(v) for k, v in _prompt_batch(bundle, prompts).items()}
  forced = np.array([[first, 2, 0, 0], [8, 2, 0, 0]], np.int32)
  out = inference._draw_replies(bundle, rows, forced, seed=0, steps=2, guidance=2.0)  # pylint: disable=protected-access
  assert out[0].image.shape == (32, 32, 3) and out[0].image.dtype == np.uint8 and out[1].image is None
  again = inference._draw_replies(bundle, rows, forced, seed=0, steps=2, guidance=2.0)  # pylint: disable=protected-access
  np.testing.assert_array_equal(out[0].image, again[0].image)


def _prompt_batch(bundle, prompts):
  from mmproj import inference
  rows = [inference.encode_prompt(bundle, p) for p in prompts]
  length = max(len(r) for r in rows)
  tokens = np.zeros((len(rows), length), np.int32)
  mask = np.zeros((len(rows), length), np.int32)
  for b, row in enumerate(rows):
    tokens[b, length - len(row):] = row
    mask[b, length - len(row):] = 1
  return {'tokens': tokens, 'input_mask': mask, 'positions': np.maximum(np.cumsum(mask, 1) - 1, 0)}


def test_output_loss_accumulates_exactly(draw_dirs):
  """train.grad_accum_steps=2 gives the loss, metrics and gradients of one pass over the batch (the output term's
  denominator is the batch's rows, counted before the micro-batches)."""
  from mmproj import data
  from mmproj.train import loss as loss_lib, state as state_lib
  cfg = tiny_draw(draw_dirs[0], None, 'align')
  _, tok = data.prepare(cfg.data)
  batch = next(iter(data.train_loader(cfg.data, tok, num_image_tokens=0, global_batch_size=8, seed=0)))
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  s = state_lib.setup(cfg, jax.devices()[:1])
  params = jax.tree.map(lambda a: 0.05 * jax.random.normal(jax.random.key(3), a.shape, a.dtype),
                        s.abstract_state.params)
  (loss1, m1), g1 = jax.jit(loss_lib.make_loss_and_grads(s))(params, batch, jax.random.key(0))
  cfg.train.grad_accum_steps = 2
  s2 = state_lib.setup(cfg, jax.devices()[:1])
  (loss2, m2), g2 = jax.jit(loss_lib.make_loss_and_grads(s2))(params, batch, jax.random.key(0))
  assert set(m1) == set(m2) == {'accuracy', 'token_loss', 'output_loss'}
  np.testing.assert_allclose(loss1, loss2, rtol=1e-5)
  np.testing.assert_allclose(m1['output_loss'], m2['output_loss'], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g1['output']), jax.tree.leaves(g2['output'])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert any(float(jnp.abs(a).max()) > 0 for a in jax.tree.leaves(g1['output']['projector']))


def test_draw_sweep_commands_and_table(tmp_path, capsys):
  """configs/sweeps/draw.py: both stages of every output projector per seed, stage 2 starting from its seed's
  stage 1; --collect reads draw.pipeline, adds the reference row and differences paired by seed (hand-made
  results, no training)."""
  from configs import draw as draw_config
  from experiment_utils import REPO
  sys.path.insert(0, os.path.join(REPO, 'experiments'))
  import sweep as sweep_tool  # pylint: disable=g-import-not-at-top

  assert sweep_tool.main(['configs/sweeps/draw.py', '--workdir', str(tmp_path), '--print-commands']) == 0
  lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith('./launch.sh')]
  assert len(lines) == 2 * len(draw_config.ZOO) * 3
  stage2 = [line for line in lines if 'transformer/seed1' in line and ',generate' in line]
  assert len(stage2) == 1 and f'--config.init.output={tmp_path}/transformer.align/seed1' in stage2[0]

  sweep = sweep_tool.load_sweep('configs/sweeps/draw.py')
  runs = sweep_tool.runs_of(sweep, str(tmp_path))
  for r in runs:
    os.makedirs(r.workdir, exist_ok=True)
    shift = 0.1 * r.seed + (0.2 if r.cell == 'transformer' else 0.0)
    rates = lambda base: {k: base + shift for k in ('shape', 'color', 'size', 'cell', 'object', 'count', 'image')}
    with open(os.path.join(r.workdir, 'results.json'), 'w') as f:
      json.dump({'draw': {'pipeline': rates(0.3), 'reference': {k: 0.9 for k in rates(0)}, 'examples': 8}}, f)
  text = sweep_tool.collect(sweep, runs, str(tmp_path / 'out'), 'cmd')
  assert 'Recogniser match rate (%)' in text
  rows = {}
  for line in text.splitlines():                 # the first table's rows (the differences' table comes after)
    if line.startswith('| '):
      rows.setdefault(line.split('|')[1].strip(), line)
  assert rows['reference'].count('90.0 ± 0.0') == 7 and '60.0 ± 24.8' in rows['transformer']
  assert 'Difference from the reference baseline' in text
  diff = [line for line in text.splitlines() if line.startswith('| transformer |')][-1]
  assert '-30.0 ± 24.8*' in diff       # paired by seed: -40, -30, -20 pp
