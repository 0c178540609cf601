"""Stage 0 (mmproj/stage0.py) at its smoke recipe: the towers are trained, reported, written as HF directories that
transformers and mmproj.load read back to the same outputs, resumed exactly after an interruption, and read by a
connector experiment through cfg.init."""
from __future__ import annotations

import hashlib
import json
import math
import os

import jax
import numpy as np
import pytest

from experiment_utils import load_config
from mmproj import stage0
from mmproj.data import shapes


def test_report_has_the_figures(stage0_smoke):
  recipe, dirs = stage0_smoke
  report = stage0.report(recipe)
  ret = report['vision']['retrieval']
  assert ret['candidates'] == recipe.data.num_test and ret['chance'] == pytest.approx(1 / recipe.data.num_test)
  assert 0 <= ret['image_to_text'] <= 1 and 0 <= ret['text_to_image'] <= 1
  assert set(ret['hard_negatives']) == set(shapes.HARD_NEGATIVE_KINDS) | {'mean'}
  assert all(0 <= v <= 1 for v in ret['hard_negatives'].values())
  lm = report['lm']
  assert math.isfinite(lm['caption_perplexity']) and lm['caption_perplexity'] < lm['uniform_perplexity']
  assert report['key'] == stage0.key(recipe) and os.path.basename(dirs['root']) == report['key']
  text = stage0.format_report(report)
  assert 'zero-shot image->text' in text and 'perplexity' in text and 'one thing changed' in text
  # build() keeps the weights' digests in the report
  assert f"weights sha256: vision {report['vision']['sha256']}, lm {report['lm']['sha256']}" in text


def test_key_ignores_where_things_are_stored_but_not_the_recipe(stage0_smoke):
  recipe, _ = stage0_smoke
  moved = recipe.copy_and_resolve_references()
  moved.cache_dir, moved.data.data_dir, moved.lm.data.data_dir = '/elsewhere', '/x', '/y'
  assert stage0.key(moved) == stage0.key(recipe)
  longer = recipe.copy_and_resolve_references()
  longer.vision.steps += 1
  assert stage0.key(longer) != stage0.key(recipe)
  # caption_order='reading' is what a recipe written before the field trained: the same key, so its towers are found.
  assert recipe.vision.caption_order == 'reading'
  older = recipe.copy_and_resolve_references()
  del older.vision['caption_order']
  shuffled = recipe.copy_and_resolve_references()
  shuffled.vision.caption_order = 'shuffled'
  assert stage0.key(older) == stage0.key(recipe) != stage0.key(shuffled)
  # So is model.modality='image' of the LM's run (a field added with audio and video): the cached towers stay found.
  assert recipe.lm.model.modality == 'image'
  before = recipe.copy_and_resolve_references()
  del before.lm.model['modality']
  assert stage0.key(before) == stage0.key(recipe)
  # The full recipe's key is the one its towers were built under (a stable figure: a changed key rebuilds them).
  from mmproj import config_lib
  assert stage0.key(config_lib.stage0_recipe(False)) == '3aad27d13d5f'


def test_hf_directories_load_in_transformers_and_mmproj_with_equal_outputs(stage0_smoke):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  import mmproj
  recipe, dirs = stage0_smoke

  image = shapes.generate_example(shapes.config_from(recipe.data), 'test', 0)['image'][None]   # [1, 96, 96, 3]
  vit = mmproj.load(dirs['vision'])
  ours = np.asarray(vit.model.apply({'params': vit.params}, image)[0])                        # [1, 64, D]
  hf_vit = transformers.SiglipVisionModel.from_pretrained(dirs['vision']).eval()
  assert tuple(vit.image_processor.image_mean) == tuple(vit.image_processor.image_std) == (0.5, 0.5, 0.5)
  pixels = torch.from_numpy(image.astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)  # mean = std = 0.5
  with torch.no_grad():
    theirs = hf_vit(pixel_values=pixels).last_hidden_state.numpy()
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)

  lm = mmproj.load(dirs['lm'])
  assert lm.tokenizer is not None and lm.tokenizer.token_to_id('<image>') == 3
  tokens = np.array([[1] + lm.tokenizer.encode('large red circle top left').ids + [2]], np.int32)
  batch = dict(tokens=tokens, positions=np.arange(tokens.shape[1])[None].astype(np.int32),
               input_mask=np.ones_like(tokens))
  ours = np.asarray(lm.model.apply({'params': lm.params}, batch))
  hf_lm = transformers.LlamaForCausalLM.from_pretrained(dirs['lm']).eval()
  with torch.no_grad():
    theirs = hf_lm(input_ids=torch.from_numpy(tokens).long()).logits.numpy()
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)


def test_vision_training_resumes_exactly_after_an_interruption(stage0_smoke, tmp_path):
  recipe, _ = stage0_smoke
  recipe = recipe.copy_and_resolve_references()
  recipe.vision.update(steps=6, checkpoint_every=2, log_every=3)
  _, tok = shapes.prepare(recipe.data)
  whole, _ = stage0.train_vision(recipe, str(tmp_path / 'whole'), tok, log=lambda msg: None)

  class Stop(Exception):
    pass

  def stop_at_step_3(msg):
    if 'step 3/' in msg:
      raise Stop
  with pytest.raises(Stop):
    stage0.train_vision(recipe, str(tmp_path / 'cut'), tok, log=stop_at_step_3)
  assert sorted(os.listdir(tmp_path / 'cut' / 'checkpoints')) == ['2']
  messages = []
  resumed, report = stage0.train_vision(recipe, str(tmp_path / 'cut'), tok, log=messages.append)
  assert '[stage0 vision] resuming from step 2' in messages
  seconds = json.loads((tmp_path / 'cut' / 'train_seconds.json').read_text())    # both runs' training time
  assert sorted(seconds) == ['2', '4', '6'] and report['train_seconds'] == seconds['6'] > seconds['2'] > 0
  for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_resolve_init_points_at_the_towers_and_refuses_an_unresolved_entry(stage0_smoke):
  from mmproj.train import pretrained
  recipe, dirs = stage0_smoke
  cfg = load_config('configs/scenes.py', 'mlp,smoke')
  cfg.stage0.cache_dir = recipe.cache_dir
  cfg.data.data_dir = recipe.data.data_dir
  with pytest.raises(ValueError, match=r"init.encoder='stage0' is resolved by mmproj.experiment.run"):
    pretrained.check(cfg)
  resolved = stage0.resolve_init(cfg)
  assert (resolved.init.encoder, resolved.init.lm) == (dirs['vision'], dirs['lm'])
  pretrained.check(resolved)                                  # the towers fit cfg.model
  blind = cfg.copy_and_resolve_references()
  blind.model.use_image = False
  blind = stage0.resolve_init(blind)
  assert blind.init.encoder is None and blind.init.lm == dirs['lm']
  no_recipe = cfg.copy_and_resolve_references()
  del no_recipe['stage0']
  with pytest.raises(ValueError, match='no stage0 recipe'):
    stage0.resolve_init(no_recipe)


def test_a_connector_experiment_starts_from_the_towers_and_keeps_the_encoder_frozen(stage0_smoke, tmp_path):
  import mmproj
  from mmproj import experiment
  recipe, dirs = stage0_smoke
  cfg = load_config('configs/scenes.py', 'mlp,smoke')
  cfg.stage0.cache_dir = recipe.cache_dir
  cfg.data.data_dir = recipe.data.data_dir
  cfg.train.update(steps=6, warmup_steps=2)
  cfg.checkpoint.every, cfg.log_every = 3, 3
  cfg.eval.update(batch_size=16, max_examples=16)
  results = experiment.run(cfg, str(tmp_path / 'run'))
  assert set(results['vqa_accuracy']) == {'overall', *shapes.SCENE_FAMILIES}
  assert set(results['chance']) == {'overall', *shapes.SCENE_FAMILIES}
  assert 'blind_vqa_accuracy' in results
  saved = json.loads((tmp_path / 'run' / 'config.json').read_text())
  assert (saved['init']['encoder'], saved['init']['lm']) == (dirs['vision'], dirs['lm'])
  # results.json names the weights it read: the recipe key and each tower file's sha256, kept in report.json.
  sha = {part: hashlib.sha256(open(os.path.join(dirs[part], 'model.safetensors'), 'rb').read()).hexdigest()[:16]
         for part in ('vision', 'lm')}
  expected = {'key': stage0.key(recipe), **sha}
  assert results['stage0'] == json.loads((tmp_path / 'run' / 'results.json').read_text())['stage0'] == expected
  assert {part: stage0.report(recipe)[part]['sha256'] for part in sha} == sha
  blind = cfg.copy_and_resolve_references()
  blind.model.use_image = False
  assert stage0.provenance(blind) == {'key': stage0.key(recipe), 'lm': sha['lm']}
  assert stage0.provenance(load_config('configs/zoo.py', 'mlp,smoke')) is None    # a from-scratch run
  trained = mmproj.load(str(tmp_path / 'run'))
  tower = mmproj.load(dirs['vision'])
  for a, b in zip(jax.tree.leaves(tower.params), jax.tree.leaves(trained.params['encoder'])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))     # loaded, and frozen through training


def test_sigmoid_loss_counts_extra_captions_as_negatives_only():
  import jax
  import numpy as np
  rng = np.random.default_rng(0)
  zimg, ztxt, extra = (rng.normal(size=(n, 8)).astype(np.float32) for n in (4, 4, 3))
  t, b = 10.0, -3.0
  base = float(stage0.sigmoid_loss(zimg, ztxt, t, b))
  with_extra = float(stage0.sigmoid_loss(zimg, np.concatenate([ztxt, extra]), t, b))
  expected = base - float(jax.nn.log_sigmoid(-(zimg @ extra.T * t + b)).sum()) / 4
  assert with_extra == pytest.approx(expected, rel=1e-5)


def test_tower_probe_reads_cells_from_the_frozen_tower(stage0_smoke):
  import sys
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'experiments'))
  import tower_probe
  recipe, dirs = stage0_smoke
  out = tower_probe.main([dirs['vision'], '--field', 'color', '--recipe', 'configs/stage0/scenes.py:smoke',
                          '--data_dir', recipe.data.data_dir, '--train', '48', '--steps', '3'])
  assert out['field'] == 'color' and out['occupied_chance'] == pytest.approx(1 / len(shapes.COLORS))
  assert all(0 <= out[k] <= 1 for k in ('cell_accuracy', 'occupancy_accuracy', 'occupied_cell_accuracy'))


def test_token_position_probe_reads_where_an_untrained_towers_tokens_are(stage0_smoke):
  """At initialisation the position embedding is in every token's content, so the probe must find it (a probe that
  standardised per token index would subtract it and sit at chance)."""
  import sys
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'experiments'))
  import tower_probe
  recipe, dirs = stage0_smoke
  out = tower_probe.main([dirs['vision'], '--field', 'token_position', '--random', '--recipe',
                          'configs/stage0/scenes.py:smoke', '--data_dir', recipe.data.data_dir, '--train', '48',
                          '--steps', '100'])
  assert out['chance'] == pytest.approx(1 / 36) and set(out) >= {'empty_cell_tokens', 'occupied_cell_tokens'}
  assert out['token_accuracy'] > 5 * out['chance'], out


def test_captioner_sees_the_vit_tokens_without_their_positions_and_trains_on_real_tokens_only():
  """SigLIP 2's decoder loss asks the ViT to put each token's place in its content: the decoder must be blind to
  the order of the memory (a permutation leaves its logits unchanged) but not to its content."""
  cap = stage0.Captioner(vocab_size=11, width=16, depth=1, num_heads=2, mlp_dim=32)
  rng = np.random.default_rng(0)
  memory = rng.normal(size=(2, 9, 8)).astype(np.float32)
  tokens = rng.integers(1, 11, size=(2, 7)).astype(np.int32)
  mask = np.ones_like(tokens)
  mask[1, 5:] = 0
  params = cap.init(jax.random.key(0), memory, tokens, mask)['params']
  logits = cap.apply({'params': params}, memory, tokens, mask)
  permuted = cap.apply({'params': params}, memory[:, rng.permutation(9)], tokens, mask)
  np.testing.assert_allclose(logits, permuted, atol=1e-5)
  assert not np.allclose(logits, cap.apply({'params': params}, memory[::-1], tokens, mask), atol=1e-3)
  # Padding targets do not count: changing a padded token leaves the loss unchanged.
  loss = stage0.caption_loss(logits, tokens, mask)
  other = tokens.copy()
  other[1, 6] = (other[1, 6] % 10) + 1
  np.testing.assert_allclose(loss, stage0.caption_loss(logits, other, mask), rtol=1e-6)


def test_shuffled_captions_hold_the_same_objects_in_new_orders(stage0_smoke):
  """caption_order='shuffled': the decoder writes each image's objects (then glyphs) in a fresh random order, each
  object still followed by its own cell, so the cell words can only come from that object's tokens."""
  recipe, _ = stage0_smoke
  tok = shapes.make_tokenizer('scenes')
  split = stage0.CaptionedSplit(recipe.data, tok, 'train', int(recipe.vision.text_len), limit=32)
  many = [i for i in range(32) if len(split.objects[i]['shape']) >= 3]
  assert many, 'the smoke world should have scenes with three objects or more'
  index = np.array(many)
  first, _ = split.shuffled_captions(index, np.random.default_rng(0))
  second, _ = split.shuffled_captions(index, np.random.default_rng(1))
  assert (first != second).any(axis=1).mean() > 0.5     # a new order per draw
  grid = int(recipe.data.grid)
  for row, i in zip(first, index):
    words = tok.decode([int(t) for t in row if t != 0], skip_special_tokens=True).split()
    reading = shapes.scene_caption(split.objects[i], split.glyphs[i], grid)
    # Same caption length, same multiset of words, and each object's five words together in either order.
    assert sorted(words) == sorted(reading.split())
    objects = split.objects[i]
    for s, c, z, r, k in zip(objects['shape'], objects['color'], objects['size'], objects['row'], objects['col']):
      segment = f'{shapes.SIZES[z]} {shapes.COLORS[c]} {shapes.SHAPES[s]} {shapes.position_name(int(r), int(k), grid)}'
      assert segment in ' '.join(words), (segment, words)


def test_the_decoder_trains_on_shuffled_captions_and_an_unknown_order_is_refused(stage0_smoke, tmp_path):
  recipe, _ = stage0_smoke
  recipe = recipe.copy_and_resolve_references()
  recipe.vision.caption_order, recipe.vision.steps = 'shuffled', 2
  _, report = stage0.train_vision(recipe, str(tmp_path / 'shuffled'), shapes.make_tokenizer('scenes'),
                                  log=lambda msg: None)
  assert report['steps'] == 2 and 0 <= report['retrieval']['image_to_text'] <= 1
  recipe.vision.caption_order = 'alphabetical'
  with pytest.raises(ValueError, match=r"stage0\.vision\.caption_order='alphabetical'"):
    stage0.train_vision(recipe, str(tmp_path / 'unknown'), shapes.make_tokenizer('scenes'), log=lambda msg: None)
