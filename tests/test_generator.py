"""The draw world's generator (mmproj/generators) and its stage-0 build (mmproj/stage0_generator.py): the methods'
shapes and causality, params under one subtree as a submodule, the rectified-flow loss (it trains, and its gradient
reaches the conditioning), the sampler (deterministic, uint8, classifier-free guidance against a hand-written Euler
loop), save / load and their errors, and the :smoke build end to end (report, cache, resume)."""
from __future__ import annotations

import functools
import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiment_utils import load_config
from mmproj import generators, stage0_generator
from mmproj.data import shapes

# The smoke recipe's generator (32 px, widths 32, one block each): its init compiles once for these tests and the
# smoke build.
TINY = dict(load_config('configs/stage0/generator.py', 'smoke').generator)
S, B = TINY['image_size'], 3


@functools.lru_cache(maxsize=None)
def tiny():
  """(generator, params with every leaf moved off its initial value: adaLN-zero and the zero output layer would
  otherwise make the velocity 0 whatever the conditioning). The noise is numpy's: a jitted draw per leaf takes
  seconds to compile."""
  generator = generators.build(TINY)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: (x + 0.1 * rng.standard_normal(x.shape)).astype(np.float32),
                        generators.init_params(generator, jax.random.key(0)))
  return generator, params


@functools.lru_cache(maxsize=None)
def encoder():
  """jit of the tiny generator's encode_text: (params, tokens [B, L]) -> cond [B, L, Dc]."""
  generator, _ = tiny()
  return jax.jit(lambda params, tokens: generator.apply({'params': params}, tokens, method='encode_text'))


def tokens_of(captions, text_len=TINY['text_len']):
  return generators.caption_tokens(shapes.make_tokenizer('scenes'), captions, text_len)


def draw_images(n: int, size: int = S) -> np.ndarray:
  """n rendered scenes of one object on a 1x1 grid (uint8 [n, size, size, 3])."""
  out = []
  for i in range(n):
    objects = {k: np.array([v], np.int32) for k, v in
               dict(shape=i % 4, color=i % 6, size=i % 2, x=size // 2, y=size // 2).items()}
    out.append(shapes.render(objects, size, 1))
  return np.stack(out)


CAPTIONS = ['large red circle top left', 'small blue square bottom right large green cross top right',
            'small yellow triangle bottom left']


# ----------------------------------------------------------------------------------------------- the model


def test_methods_give_their_shapes_and_the_text_encoder_is_causal():
  generator, params = tiny()
  v = {'params': params}

  twin = generators.build({**TINY, 'prediction': 'velocity'})                 # the same net, its output as is

  @jax.jit
  def methods(tokens, x_t, t):
    cond = generator.apply(v, tokens, method='encode_text')
    return (cond, generator.apply(v, B, method='null_condition'), generator.apply(v, x_t, t, cond, method='velocity'),
            twin.apply(v, x_t, t, cond, method='velocity'))

  tokens = tokens_of(CAPTIONS)                                                 # [B, L]
  x_t, t = jax.random.normal(jax.random.key(2), (B, S, S, 3)), jnp.array([0.3, 0.6, 0.99])
  cond, null, vel, out = methods(tokens, x_t, t)
  assert cond.shape == null.shape == (B, TINY['text_len'], TINY['text_width']) and np.isfinite(cond).all()
  np.testing.assert_array_equal(null[0], null[2])
  assert vel.shape == (B, S, S, 3) and vel.dtype == jnp.float32 and np.isfinite(vel).all()
  # prediction='data': the net's output is the clean image, the velocity the way from x_t to it in the time left
  # (at least 0.05).
  remaining = np.array([0.7, 0.4, 0.05])[:, None, None, None]
  np.testing.assert_allclose(vel, (np.asarray(out) - np.asarray(x_t)) / remaining, rtol=1e-4, atol=1e-4)
  # Causal: changing token 3 changes the states from position 3 on, never before it (pads included).
  changed = tokens.copy()
  changed[:, 3] = tokens[:, 3] % 60 + 7
  after = methods(changed, x_t, t)[0]
  np.testing.assert_array_equal(np.asarray(cond[:, :3]), np.asarray(after[:, :3]))
  assert (np.abs(np.asarray(cond[:, 3:]) - np.asarray(after[:, 3:])).max(axis=-1) > 0).all()
  with pytest.raises(ValueError, match='generator.text_len is 16'):
    generator.apply(v, tokens[:, :5], method='encode_text')
  with pytest.raises(ValueError, match=r'cond has shape .*generator.text_len'):
    generator.apply(v, x_t, t, cond[:, :4], method='velocity')


def test_as_a_submodule_its_params_sit_under_one_subtree():
  generator, params = tiny()

  class Outer(nn.Module):
    @nn.compact
    def __call__(self, tokens, x_t, t):
      gen = generators.Generator(**TINY, name='generator')
      cond = nn.Dense(TINY['text_width'], name='adapter')(gen.encode_text(tokens))
      return gen.velocity(x_t, t, cond)

  outer = Outer()
  tokens, x_t, t = tokens_of(CAPTIONS), jnp.zeros((B, S, S, 3)), jnp.full((B,), 0.5)
  shapes_only = nn.unbox(jax.eval_shape(outer.init, jax.random.key(0), tokens, x_t, t)['params'])
  assert set(shapes_only) == {'generator', 'adapter'}
  # The generator's subtree is the standalone tree (null_cond included, though unused here), so a trained
  # generator's params drop in.
  assert jax.tree.structure(shapes_only['generator']) == jax.tree.structure(params)
  adapter = {'kernel': jnp.eye(TINY['text_width']), 'bias': jnp.zeros(TINY['text_width'])}

  @jax.jit
  def both(params):
    out = outer.apply({'params': {'generator': params, 'adapter': adapter}}, tokens, x_t, t)
    cond = generator.apply({'params': params}, tokens, method='encode_text')
    return out, generator.apply({'params': params}, x_t, t, cond, method='velocity')
  out, ref = both(params)
  np.testing.assert_allclose(out, ref, atol=1e-5)


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match='generator.patch_size=5 does not divide generator.image_size=32'):
    generators.build({**TINY, 'patch_size': 5})
  with pytest.raises(ValueError, match='generator.num_heads=3 does not divide generator.width=32'):
    generators.build({**TINY, 'num_heads': 3})
  with pytest.raises(ValueError, match='generator.time_sampling'):
    generators.build({**TINY, 'time_sampling': 'cosine'})
  with pytest.raises(ValueError, match=r"generator.prediction='noise'"):
    generators.build({**TINY, 'prediction': 'noise'})
  with pytest.raises(ValueError, match='generator.colour: unknown field'):
    generators.build({**TINY, 'colour': 1})
  with pytest.raises(ValueError, match='generator.depth: missing'):
    generators.build({k: v for k, v in TINY.items() if k != 'depth'})


def test_caption_tokens_pad_to_text_len_and_refuse_what_does_not_fit():
  tok = shapes.make_tokenizer('scenes')
  ids = generators.caption_tokens(tok, ['large red circle top left'], 8)
  words = tok.encode('large red circle top left', add_special_tokens=False).ids
  np.testing.assert_array_equal(ids, [[1, *words, 2, 0]])
  assert ids.dtype == np.int32
  with pytest.raises(ValueError, match='generator.text_len=6'):
    generators.caption_tokens(tok, ['large red circle top left'], 6)
  with pytest.raises(ValueError, match='out-of-vocabulary'):
    generators.caption_tokens(tok, ['large purple circle'], 8)


# ----------------------------------------------------------------------------------------------- loss


def test_the_loss_is_differentiable_in_the_conditioning():
  """As an output projector trains through the frozen generator: a finite gradient, nonzero for every example.
  (That the loss falls in training: the smoke build's loss curve, below.)"""
  generator, params = tiny()
  images = draw_images(B)
  cond = encoder()(params, tokens_of(CAPTIONS))
  grad = jax.jit(jax.grad(lambda c: generators.flow_matching_loss(generator, params, images, c,
                                                                  jax.random.key(3))))(cond)
  assert grad.shape == cond.shape and np.isfinite(grad).all()
  assert (np.abs(np.asarray(grad)).sum(axis=(1, 2)) > 0).all()
  with pytest.raises(ValueError, match='uint8'):
    generators.flow_matching_loss(generator, params, images.astype(np.float32), cond, jax.random.key(3))


# ----------------------------------------------------------------------------------------------- sampling


def _reference_euler(generator, params, cond, rng, steps, guidance):
  """Euler from noise with CFG, one velocity call per branch (what sample must equal)."""
  velocity = jax.jit(lambda x, t, c: generator.apply({'params': params}, x, t, c, method='velocity'))
  null = generator.apply({'params': params}, cond.shape[0], method='null_condition')
  x = jax.random.normal(rng, (cond.shape[0], S, S, 3))
  for k in range(steps):
    t = jnp.full((cond.shape[0],), k / steps)
    v_cond = velocity(x, t, cond)
    v = v_cond if guidance is None else velocity(x, t, null) + guidance * (v_cond - velocity(x, t, null))
    x = x + v / steps
  return np.asarray(generators.to_uint8(x)).astype(int)


def test_sample_is_deterministic_uint8_and_guidance_is_classifier_free_guidance():
  generator, params = tiny()
  cond = encoder()(params, tokens_of(CAPTIONS))
  run = {g: jax.jit(functools.partial(generators.sample, generator, steps=3, guidance=g)) for g in (1.0, 2.5)}
  a, b = run[2.5](params, cond, jax.random.key(7)), run[2.5](params, cond, jax.random.key(7))
  assert a.dtype == jnp.uint8 and a.shape == (B, S, S, 3)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, run[2.5](params, cond, jax.random.key(8)))
  # guidance 1 is the plain conditional sampler; 2.5 is v_null + 2.5 (v_cond - v_null) (a pixel may round apart).
  plain = np.asarray(run[1.0](params, cond, jax.random.key(7))).astype(int)
  assert np.abs(plain - _reference_euler(generator, params, cond, jax.random.key(7), 3, None)).max() <= 1
  guided = np.asarray(a).astype(int)
  assert np.abs(guided - _reference_euler(generator, params, cond, jax.random.key(7), 3, 2.5)).max() <= 1
  assert np.abs(guided - plain).max() > 8                                      # guidance changes the images


# ----------------------------------------------------------------------------------------------- save / load


def test_save_load_round_trip_and_clear_errors(tmp_path):
  generator, params = tiny()
  directory = str(tmp_path / 'gen')
  generators.save(directory, TINY, params)
  loaded, loaded_params, cfg = generators.load(directory)
  assert loaded == generator and cfg == generators.config_of(generator)
  assert jax.tree.structure(loaded_params) == jax.tree.structure(params)
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(loaded_params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  with pytest.raises(ValueError, match='holds a generator already'):
    generators.save(directory, TINY, params)

  with pytest.raises(FileNotFoundError, match=r'nowhere/generator\.json is missing'):
    generators.load(str(tmp_path / 'nowhere'))
  config_file = os.path.join(directory, 'generator.json')
  good = open(config_file).read()
  open(config_file, 'w').write('{"width": ')
  with pytest.raises(ValueError, match=r'gen/generator\.json is not valid JSON'):
    generators.load(directory)
  open(config_file, 'w').write(json.dumps({**json.loads(good), 'depth': 'two'}))
  with pytest.raises(ValueError, match=r'generator\.json: generator.depth: must be a positive int'):
    generators.load(directory)
  open(config_file, 'w').write(json.dumps({**json.loads(good), 'width': 64}))   # params of another shape
  with pytest.raises(ValueError, match=r'cannot restore .*gen/params'):
    generators.load(directory)
  open(config_file, 'w').write(good)
  os.rename(os.path.join(directory, 'params'), os.path.join(directory, 'moved'))
  with pytest.raises(FileNotFoundError, match=r'gen/params is missing'):
    generators.load(directory)


# ----------------------------------------------------------------------------------------------- stage 0


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  """The :smoke generator built once: (recipe with tmp cache_dir and data_dir, directories, build log)."""
  root = tmp_path_factory.mktemp('stage0_generator')
  recipe = load_config('configs/stage0/generator.py', 'smoke')
  recipe.cache_dir, recipe.data.data_dir = str(root / 'cache'), str(root / 'data')
  log = []
  return recipe, stage0_generator.build(recipe, log=log.append), log


def test_the_smoke_build_writes_the_generator_and_its_report(built):
  recipe, dirs, log = built
  assert any('step 30/30' in m for m in log)
  r = stage0_generator.report(recipe)
  assert r['key'] == stage0_generator.key(recipe) == os.path.basename(dirs['root'])
  assert r['train']['steps'] == 30 and r['train']['train_seconds'] > 0
  # The loss falls in 30 steps on the 64 smoke images, batch 8 (the mean loss of steps 1-5 and of 26-30).
  curve = r['train']['losses']
  assert [step for step, _ in curve] == [5, 10, 15, 20, 25, 30] and curve[-1][1] == r['train']['final_loss']
  assert np.isfinite(curve[-1][1]) and curve[-1][1] < 0.7 * curve[0][1], curve
  assert 'EMA' in r['train']['saved_params']
  assert np.isfinite(r['test_loss']['caption']) and np.isfinite(r['test_loss']['null'])
  s = r['samples']
  assert s['num_images'] == recipe.data.num_test and (s['steps'], s['guidance']) == (4, 3.0)
  for rates in (s['match_rates'], s['match_rates_guidance_1'], s['match_rates_real_images']):
    assert {'shape', 'color', 'size', 'cell', 'object', 'count', 'image'} <= set(rates)
    assert all(0 <= v <= 1 for v in rates.values())
  assert s['match_rates_real_images']['object'] == 1.0        # the recogniser reads the world's own renders
  assert os.path.isfile(dirs['samples'])
  text = stage0_generator.format_report(r)
  assert 'guidance 1 (no CFG)' in text and 'null conditioning' in text
  generator, params, cfg = generators.load(dirs['generator'])
  assert cfg == generators.check_config(recipe.generator) and generator.image_size == recipe.data.image_size


def test_a_second_call_finds_the_build_and_new_sampling_settings_only_sample_again(built, tmp_path):
  recipe, dirs, _ = built
  log = []
  assert stage0_generator.resolve(recipe, log=log.append) == dirs['generator']
  assert log == []                                                      # nothing trained or sampled again
  moved = recipe.copy_and_resolve_references()
  moved.cache_dir, moved.data.data_dir = '/elsewhere', '/x'
  assert stage0_generator.key(moved) == stage0_generator.key(recipe)
  longer = recipe.copy_and_resolve_references()
  longer.train.steps += 1
  assert stage0_generator.key(longer) != stage0_generator.key(recipe)
  # The report's sampling settings are not the generator's: new ones sample the saved generator again (in a
  # copy of the cache, so that the other tests see the build as it was).
  resampled = recipe.copy_and_resolve_references()
  resampled.sample.guidance = 2.0
  resampled.cache_dir = str(tmp_path / 'cache')
  assert stage0_generator.key(resampled) == stage0_generator.key(recipe)
  shutil.copytree(dirs['root'], stage0_generator.directories(resampled)['root'])
  before = stage0_generator.report(recipe)
  stage0_generator.build(resampled, log=log.append)
  assert len(log) == 1 and 'at guidance 2.0' in log[0]                  # sampled; not a step trained
  after = stage0_generator.report(resampled)
  assert after['samples']['guidance'] == 2.0 and after['train'] == before['train']
  assert after['samples']['match_rates_guidance_1'] == before['samples']['match_rates_guidance_1']


def test_an_interrupted_build_resumes_exactly(built, tmp_path):
  recipe, dirs, _ = built
  _, tok = shapes.prepare(recipe.data)
  # The build checkpointed steps 15 and 30; without 30 its work dir is that of a build killed after step 15.
  work = str(tmp_path / 'work')
  shutil.copytree(dirs['work'], work)
  shutil.rmtree(os.path.join(work, 'checkpoints', '30'))
  log = []
  _, resumed, report = stage0_generator.train_generator(recipe, work, tok, log.append)
  assert log[0] == '[stage0 generator] resuming from step 15' and 'step 20/30' in log[1]
  # The loss curve of the whole run: steps 5-15 from the history the first run left, 20-30 trained again.
  assert [list(point) for point in report['losses']] == stage0_generator.report(recipe)['train']['losses']
  _, saved, _ = generators.load(dirs['generator'])
  for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(resumed)):   # the same batches, noise and updates
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_the_report_keeps_the_weights_digest_and_a_draw_run_records_it(built, tmp_path):
  """report.json's sha256 is the saved params' digest (one key can name different weights after a rebuild); a
  generator built before the field gets it on first use; a draw run on the stage-0 generator writes it to
  results.json's 'stage0_generator' (mmproj.experiment.run), which the sweep's collection states."""
  from experiment_utils import tiny_draw
  from mmproj import experiment
  recipe, dirs, _ = built
  _, params, _ = generators.load(dirs['generator'])
  sha = stage0_generator.params_sha256(params)
  assert len(sha) == 16 and stage0_generator.report(recipe)['sha256'] == sha
  assert f'weights sha256 {sha}' in stage0_generator.format_report(stage0_generator.report(recipe))
  leaves, tree = jax.tree.flatten(params)
  nudged = jax.tree.unflatten(tree, [np.asarray(leaves[0]) + np.float32(1e-3)] + leaves[1:])
  assert stage0_generator.params_sha256(nudged) != sha
  # A report written before the field: digest() hashes the saved params once and keeps the figure.
  old = recipe.copy_and_resolve_references()
  old.cache_dir = str(tmp_path / 'cache')
  shutil.copytree(dirs['root'], stage0_generator.directories(old)['root'])
  r = stage0_generator.report(old)
  del r['sha256']
  stage0_generator._write_json(stage0_generator.directories(old)['report'], r)
  assert stage0_generator.digest(old) == sha and stage0_generator.report(old)['sha256'] == sha
  # A draw run reading the built generator (init.generator='stage0') records which weights it read.
  cfg = tiny_draw(recipe.data.data_dir, stage0_generator.STAGE0)
  assert stage0_generator.key(cfg.generator) == stage0_generator.key(recipe)
  cfg.generator.cache_dir = recipe.cache_dir
  experiment.run(cfg, str(tmp_path / 'run'))
  expected = {'key': stage0_generator.key(recipe), 'generator': sha}
  assert json.loads((tmp_path / 'run' / 'results.json').read_text())['stage0_generator'] == expected
  assert stage0_generator.provenance(cfg) == expected
  assert stage0_generator.provenance(tiny_draw(recipe.data.data_dir, dirs['generator'])) is None
