"""Shared pytest fixtures."""

import atexit
import os
import shutil
import tempfile

# Tests compile far more than they run: XLA's CPU backend at LLVM optimisation level 0 compiles ~25% faster and
# computes the same values (the HLO passes still run; no fast-math either way). Subprocesses inherit it.
if 'xla_backend_optimization_level' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_backend_optimization_level=0').strip()

# One JAX compilation cache for the whole test session, shared by both xdist workers and every subprocess (they
# inherit the environment): many tests train the same tiny configs, and each train() call builds fresh jitted
# functions whose programs would otherwise compile again. Set before jax is imported; removed at the end by the
# process that made it.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _cache_dir = tempfile.mkdtemp(prefix='mmproj-test-jax-cache-')
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.3')
  atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)

import ml_collections  # noqa: E402
import pytest  # noqa: E402

from mmproj import config_lib  # noqa: E402

# The modules that take longest, first: with two workers (.ci/run: --dist loadscope --no-loadscope-reorder) each
# module runs on one worker, and one started last would run alone at the end while the other worker idles.
SLOW_FIRST = ('test_projector_configs', 'test_findings', 'test_stage0', 'test_generator', 'test_faults',
              'test_scan_remat', 'test_train', 'test_multiprocess', 'test_cloud_workdir', 'test_sweep', 'test_bench',
              'test_attention_maps', 'test_sharding', 'test_llava_training', 'test_no_pickle')


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOW_FIRST)}
  items.sort(key=lambda item: rank.get(item.module.__name__ if item.module else '', len(rank)))


def make_tiny_model_cfg() -> ml_collections.ConfigDict:
  """cfg.model as in the spec, with tiny dims (image 16, patch 4 -> 16 visual tokens, widths 32, depth 2)."""
  return config_lib.model_config(
      image_token_id=3, projector=dict(name='mlp', depth=2),
      encoder=dict(name='vit', image_size=16, patch_size=4, width=32, depth=2, num_heads=2, mlp_dim=64,
                   output_layer=-1, cls_token=False, pre_norm=False, final_norm=True, norm_eps=1e-6, act='gelu'),
      lm=dict(vocab_size=32, width=32, depth=2, num_heads=4, num_kv_heads=2, head_dim=None, mlp_dim=64,
              rope_theta=10000.0, norm_eps=1e-6, tie_embeddings=False, max_len=64))


@pytest.fixture
def tiny_model_cfg() -> ml_collections.ConfigDict:
  """A fresh tiny cfg.model (mutable ConfigDict) per test."""
  return make_tiny_model_cfg()


@pytest.fixture(scope='session')
def shapes_data_dir(tmp_path_factory) -> str:
  """A data dir holding the shapes world at the smoke quickstart's settings, built once per test session."""
  import os

  from experiment_utils import load_config
  from mmproj.data import shapes

  cfg = load_config('configs/quickstart.py', 'smoke')
  cfg.data.data_dir = os.environ.get('MMPROJ_TEST_DATA_DIR') or str(tmp_path_factory.mktemp('shapes_data'))
  shapes.prepare(cfg.data)
  return cfg.data.data_dir


@pytest.fixture(scope='session')
def trained_workdir(shapes_data_dir, tmp_path_factory) -> str:
  """An mmproj workdir holding a freshly trained tiny shapes-world model (a few seconds of training)."""
  from experiment_utils import tiny_experiment
  from mmproj.train import trainer

  workdir = str(tmp_path_factory.mktemp('trained') / 'run')
  trainer.train(tiny_experiment(shapes_data_dir), workdir)
  return workdir


@pytest.fixture(scope='session')
def media_runs(tmp_path_factory) -> dict:
  """{'audio' | 'video': (cfg, workdir, results)}: tiny runs of configs/audio_tones.py and configs/video_motion.py
  through experiment.run (trained, evaluated next to the blind baseline), once per test session."""
  from experiment_utils import tiny_media_experiment
  from mmproj import experiment

  runs = {}
  for modality in ('audio', 'video'):
    root = tmp_path_factory.mktemp(modality)
    cfg = tiny_media_experiment(modality, str(root / 'data'))
    runs[modality] = cfg, str(root / 'run'), experiment.run(cfg, str(root / 'run'))
  return runs


@pytest.fixture(scope='session')
def draw_dirs(tmp_path_factory):
  """(data dir, a generator directory holding the smoke recipe's generator with random weights), once per session."""
  import jax

  from experiment_utils import load_config
  from mmproj import generators
  cfg = load_config('configs/draw.py', 'mlp,align,smoke')
  gen = generators.build(cfg.model.output.generator)
  gen_dir = str(tmp_path_factory.mktemp('generator') / 'generator')
  generators.save(gen_dir, cfg.model.output.generator, generators.init_params(gen, jax.random.key(0)))
  return str(tmp_path_factory.mktemp('draw_data')), gen_dir


@pytest.fixture(scope='session')
def draw_runs(draw_dirs, tmp_path_factory):
  """Tiny runs of configs/draw.py through experiment.run: stage 1 (align) in ROOT/align and stage 2 (generate,
  from stage 1's output side) in ROOT/generate -> (ROOT, align results, generate results)."""
  from experiment_utils import tiny_draw
  from mmproj import experiment
  data_dir, gen_dir = draw_dirs
  root = tmp_path_factory.mktemp('draw_runs')
  align_results = experiment.run(tiny_draw(data_dir, gen_dir, 'align'), str(root / 'align'))
  generate = tiny_draw(data_dir, gen_dir, 'generate')
  generate.init.output = str(root / 'align')
  return root, align_results, experiment.run(generate, str(root / 'generate'))


@pytest.fixture(scope='session')
def stage0_smoke(tmp_path_factory):
  """The stage-0 smoke towers (configs/stage0/scenes.py:smoke), built once per test session:
  (recipe with tmp cache_dir and data_dir, directories(recipe))."""
  from experiment_utils import load_config
  from mmproj import stage0

  root = tmp_path_factory.mktemp('stage0')
  recipe = load_config('configs/stage0/scenes.py', 'smoke')
  recipe.cache_dir = str(root / 'cache')
  recipe.data.data_dir = recipe.lm.data.data_dir = str(root / 'data')
  return recipe, stage0.build(recipe, log=lambda msg: None)
