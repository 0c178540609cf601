"""Audio and video end to end through the one trainer: configs/audio_tones.py and configs/video_motion.py shrunk to
seconds, trained, evaluated next to the blind baseline (experiment.run), resumed, reloaded with mmproj.load and
asked questions with mmproj.generate on raw waveforms / frames; and the config checks that name the field."""
import json
import os
import shutil

import numpy as np
import pytest

import mmproj
from experiment_utils import load_config
from mmproj import experiment
from mmproj import model as model_lib
from mmproj.data import worlds
from mmproj.train import state, trainer


@pytest.mark.slow
@pytest.mark.parametrize('modality', ['audio', 'video'])
def test_trains_evaluates_resumes_and_generates(modality, media_runs, tmp_path):
  cfg, workdir, results = media_runs[modality]
  families = worlds.world(cfg.data).families(cfg.data)
  assert set(results['vqa_accuracy']) == {'overall', *families}
  assert set(results['blind_vqa_accuracy']) == {'overall', *families}
  assert np.isfinite(results['caption_loss']) and set(results['chance']) == {'overall', *families}
  with open(os.path.join(workdir, 'results.json')) as f:
    np.testing.assert_equal(json.load(f)['vqa_accuracy'], results['vqa_accuracy'])   # (NaN: a family not asked)
  assert experiment.format_table(results, modality).split()[:5] == ['family', modality, 'blind', 'gain', 'chance']

  bundle = mmproj.load(workdir)
  assert model_lib.modality(bundle.config.model) == modality
  source = worlds.world(cfg.data).data_source(cfg.data, 'test')
  rec = worlds.world(cfg.data).decode_record(source[0])
  media = rec[modality]                                   # float32 [S] waveform | uint8 [F, H, W, 3]
  texts = mmproj.generate(bundle, [media, media], [rec['questions'][0]] * 2, max_new_tokens=3)
  assert len(texts) == 2 and texts[0] == texts[1]
  vocab = set(bundle.tokenizer.get_vocab())
  assert all(word in vocab for word in texts[0].split())

  # Resume: two more steps continue from step 6 (a checkpoint of the media model, restored), in a copy of the run.
  resumed_dir = str(tmp_path / 'resumed')
  shutil.copytree(workdir, resumed_dir)
  cfg = cfg.copy_and_resolve_references()
  cfg.train.steps = 8
  resumed = trainer.train(cfg, resumed_dir)
  assert resumed.resumed_from == 6 and int(resumed.state.step) == 8


def test_a_modality_the_encoder_does_not_read_is_refused():
  cfg = load_config('configs/audio_tones.py', 'smoke')
  cfg.model.modality = 'image'
  with pytest.raises(ValueError, match=r"model.encoder.name='whisper' does not read model.modality='image'"):
    model_lib.validate(cfg.model)
  cfg.model.modality = 'smell'
  with pytest.raises(ValueError, match=r"model.modality='smell' is not one of"):
    model_lib.validate(cfg.model)


def test_the_data_must_match_the_model(tmp_path):
  cfg = load_config('configs/audio_tones.py', 'smoke')
  cfg = cfg.copy_and_resolve_references()         # (the encoder's chunk_length follows data.clip_seconds)
  cfg.data.update(clip_seconds=1.0, max_events=2)
  with pytest.raises(ValueError, match=r'16000 samples \(data.clip_seconds\).*32000.*chunk_length=2.0'):
    state.validate(cfg)
  cfg = load_config('configs/video_motion.py', 'smoke').copy_and_resolve_references()  # (num_frames is linked)
  cfg.model.num_frames = cfg.model.projector.num_frames = 6
  with pytest.raises(ValueError, match=r'data.num_frames=8 does not match model.num_frames=6'):
    state.validate(cfg)
  cfg = load_config('configs/audio_tones.py', 'smoke')
  cfg.model.modality, cfg.model.encoder = 'video', load_config('configs/video_motion.py', 'smoke').model.encoder
  cfg.model.num_frames, cfg.model.projector = 8, dict(name='perceiver', num_latents=4)
  with pytest.raises(ValueError, match=r"data.name='tones' gives audio but model.modality='video'"):
    state.validate(cfg)


def test_a_per_image_connector_on_video_is_refused_before_compiling():
  cfg = load_config('configs/video_motion.py', 'smoke')
  cfg.model.projector = dict(name='mlp', depth=2)
  with pytest.raises(ValueError, match=r"model.projector.name='mlp' maps one video \(8 frames of 4x4 tokens\) to "
                                       r"128 tokens but counts 16"):
    model_lib.validate(cfg.model)
  cfg.model.projector = dict(name='llava_next_video', num_frames=4)
  with pytest.raises(ValueError, match=r'model.projector.num_frames=4'):
    model_lib.validate(cfg.model)
  cfg.model.num_frames = 7
  cfg.model.encoder.temporal_patch_size = 2
  with pytest.raises(ValueError, match=r'model.num_frames=7 is not divisible by model.encoder.temporal_patch_size=2'):
    model_lib.validate(cfg.model)


@pytest.mark.parametrize('config', ['configs/audio_tones.py', 'configs/video_motion.py'])
def test_every_zoo_entry_counts_its_tokens(config):
  """Each connector entry validates and its token count is what the config's docstring promises (M <= 100)."""
  from configs import audio_tones, video_motion
  module = audio_tones if 'audio' in config else video_motion
  for name in module.ZOO:
    cfg = load_config(config, name)
    model_lib.validate(cfg.model)
    m = model_lib.num_image_tokens(cfg.model)
    assert 1 <= m <= 100, (name, m)


@pytest.mark.parametrize('sweep,cells', [('audio', 10), ('video', 9)])
def test_the_sweeps_list_every_connector_and_the_blind_baseline_for_three_seeds(sweep, cells, tmp_path, capsys):
  """configs/sweeps/{audio,video}.py: one launch line per connector of the zoo and the blind baseline, per seed (the
  runs themselves are the configs' own, trained end to end above)."""
  import sys
  from experiment_utils import REPO
  sys.path.insert(0, os.path.join(REPO, 'experiments'))
  import sweep as sweep_tool  # pylint: disable=g-import-not-at-top
  assert sweep_tool.main([f'configs/sweeps/{sweep}.py', '--workdir', str(tmp_path), '--print-commands']) == 0
  lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith('./launch.sh')]
  assert len(lines) == 3 * cells
  config = 'audio_tones' if sweep == 'audio' else 'video_motion'
  assert sum(f'configs/{config}.py:' in l and '--config.model.use_image=False' in l for l in lines) == 3
