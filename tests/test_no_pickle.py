"""Issue 6: no load path unpickles. Orbax workdirs (train, resume, mmproj.load), HF directories (mmproj.load and
cfg.init), the data loaders (shapes, LLaVA-JSON with its token-length cache) and tokenizers all run here under
`no_unpickling()`, which makes any unpickling in this process fail and records it, so a swallowed attempt fails
the test too. The guard is tested first, so the other tests cannot pass vacuously. Planted pickles (an HF
pytorch_model.bin, a fake model.safetensors, a token-length cache holding an object array, stray .pkl files in a
checkpoint) would create a marker file if anything unpickled them: the marker must never appear.

HF directories are built with torch + transformers outside the guard (torch may pickle internally); everything
mmproj does with them runs inside it.
"""
from __future__ import annotations

import _pickle
import contextlib
import functools
import glob
import io
import multiprocessing
import os
import pickle
import shutil
import sys

import jax
import numpy as np
import pytest

import mmproj
from experiment_utils import llava_config, tiny_experiment
from mmproj import data
from mmproj.train import pretrained, trainer

try:
  import torch
except ImportError:  # the HF tests skip; the guard still covers pickle and numpy
  torch = None

# ------------------------------------------------------------------------------------------------------- guard

# attempts / ipc are replaced (never cleared) on entry, so a late event from another thread cannot break anything.
_GUARD = {'active': False, 'attempts': [], 'ipc': []}
_HOOK_INSTALLED = False
# A multiprocessing.Queue pickles what is put and unpickles it in get(): bytes this process (or its own worker)
# just produced, never a file. tensorboardX's event writer queues every scalar that way; that is let through
# (and counted), anything else is not.
_QUEUE_FILE = os.path.join('multiprocessing', 'queues.py')


def _refuse(what: str):
  if _GUARD['active']:
    _GUARD['attempts'].append(what)
    raise AssertionError(f'unpickling attempted: {what}')


def _audit(event, args):
  # Every unpickler (C or Python, however a library got hold of it) resolves each global through find_class,
  # which raises this event; a hook cannot be removed, so it is installed once and acts only while guarded.
  if event == 'pickle.find_class' and _GUARD['active']:
    if _from_queue_get():
      _GUARD['ipc'].append(tuple(args))
      return
    _refuse(f'pickle.find_class{tuple(args)!r}')


def _from_queue_get() -> bool:
  """Whether the unpickler was called directly by multiprocessing.Queue.get / SimpleQueue.get."""
  frame = sys._getframe(2)  # pylint: disable=protected-access  (0: this, 1: _audit, 2: the unpickler's caller)
  return frame.f_code.co_name == 'get' and frame.f_code.co_filename.endswith(_QUEUE_FILE)


def _install_audit_hook():
  global _HOOK_INSTALLED
  if not _HOOK_INSTALLED:
    sys.addaudithook(_audit)
    _HOOK_INSTALLED = True


def _refusing(name: str):
  def refuse(*args, **kwargs):
    _refuse(name)
    raise AssertionError(f'unpickling attempted: {name}')  # the guard is off: never reached in practice
  return refuse


@contextlib.contextmanager
def no_unpickling():
  """Inside: pickle/_pickle/cloudpickle loaders, np.load(allow_pickle=True) and torch.load raise AssertionError
  ('unpickling attempted: ...'), np.load runs with allow_pickle=False, and any find_class of any unpickler raises
  through the audit hook. On a normal exit, AssertionError if anything was attempted (even if code caught it)."""
  _install_audit_hook()
  attempts = []
  real_np_load = np.load

  @functools.wraps(real_np_load)
  def np_load(*args, allow_pickle=False, **kwargs):
    if len(args) > 2:                                       # (file, mmap_mode, allow_pickle, ...) positionally
      args, allow_pickle = args[:2] + args[3:], args[2]
    if allow_pickle:
      _refuse(f'numpy.load(allow_pickle=True) of {args[0] if args else kwargs.get("file")!r}')
    return real_np_load(*args, allow_pickle=False, **kwargs)

  with pytest.MonkeyPatch.context() as mp:
    for module, names in ((pickle, ('load', 'loads', 'Unpickler', '_load', '_loads', '_Unpickler')),
                          (_pickle, ('load', 'loads', 'Unpickler'))):
      for name in names:
        if hasattr(module, name):
          mp.setattr(module, name, _refusing(f'{module.__name__}.{name}'))
    for name in ('cloudpickle', 'dill', 'joblib'):
      module = sys.modules.get(name)
      for attr in ('load', 'loads'):
        if module is not None and hasattr(module, attr):
          mp.setattr(module, attr, _refusing(f'{name}.{attr}'))
    mp.setattr(np, 'load', np_load)
    if torch is not None:
      mp.setattr(torch, 'load', _refusing('torch.load'))
    _GUARD.update(active=True, attempts=attempts, ipc=[])
    try:
      yield attempts
    finally:
      _GUARD['active'] = False
  assert not attempts, f'unpickling attempted (and caught by the code under test): {attempts}'


class _Plant:
  """Unpickling this opens `marker` for writing, i.e. creates the file: the proof that a pickle was executed."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return (open, (self.marker, 'w'))


class _Message:

  def __init__(self, text):
    self.text = text


def _plant_bytes(marker) -> bytes:
  return pickle.dumps(_Plant(marker))


def test_guard_catches_every_way_to_unpickle(tmp_path):
  marker = tmp_path / 'pwned'
  payload = _plant_bytes(marker)
  obj_npy = tmp_path / 'objects.npy'
  np.save(obj_npy, np.array([_Plant(marker), 1], dtype=object))
  (tmp_path / 'plant.pkl').write_bytes(payload)
  captured_loads, captured_np_load = pickle.loads, np.load   # as a library that bound them at import would
  assert not marker.exists()

  with pytest.raises(AssertionError, match='caught by the code under test'):
    with no_unpickling():
      calls = [
          lambda: pickle.loads(pickle.dumps(_Plant(marker))),
          lambda: pickle.load(io.BytesIO(payload)),
          lambda: pickle.Unpickler(io.BytesIO(payload)).load(),
          lambda: _pickle.loads(payload),
          lambda: captured_loads(payload),                                  # only the audit hook sees this
          lambda: captured_np_load(obj_npy, allow_pickle=True),             # the real np.load asked to unpickle
          lambda: np.load(obj_npy, None, True),
          lambda: np.load(obj_npy, allow_pickle=True),
          lambda: np.load(tmp_path / 'plant.pkl', allow_pickle=True),
      ]
      if torch is not None:
        calls.append(lambda: torch.load(tmp_path / 'plant.pkl', weights_only=False))
      for call in calls:
        with pytest.raises(AssertionError, match='unpickling attempted'):
          call()
      with pytest.raises(ValueError, match='allow_pickle=False'):
        np.load(obj_npy)                                                    # refused by numpy, nothing unpickled
      try:                                                                  # code that swallows the error ...
        pickle.loads(payload)
      except Exception:  # pylint: disable=broad-except
        pass
    # ... still fails the guard on exit (the pytest.raises around it).
  assert not marker.exists()

  # The one exemption: a multiprocessing.Queue round trip (in-process IPC, e.g. tensorboardX's event writer).
  queue = multiprocessing.Queue()
  with no_unpickling():
    queue.put(_Message('hi'))
    assert queue.get(timeout=30).text == 'hi'
  assert _GUARD['ipc']                                      # seen by the hook, and let through
  queue.close()
  queue.join_thread()

  # Outside the guard everything is back: the plant really would have run.
  assert pickle.loads is captured_loads and np.load is captured_np_load
  assert pickle.loads(pickle.dumps([1, 'a'])) == [1, 'a']
  pickle.loads(payload).close()
  assert marker.exists()


# ------------------------------------------------------------------------------------ Orbax workdirs: train, resume

def _plant_in_checkpoints(workdir: str, marker) -> list[str]:
  planted = []
  for step_dir in glob.glob(os.path.join(workdir, 'checkpoints', '*')):
    for sub in ('', 'state', 'data', 'meta'):
      where = os.path.join(step_dir, sub)
      if os.path.isdir(where):
        for name in ('evil.pkl', 'evil.pickle'):
          with open(os.path.join(where, name), 'wb') as f:
            f.write(_plant_bytes(marker))
          planted.append(os.path.join(where, name))
  return planted


def test_train_resume_and_load_never_unpickle(shapes_data_dir, tmp_path):
  workdir, marker = str(tmp_path / 'run'), tmp_path / 'pwned'
  first = tiny_experiment(shapes_data_dir)
  first.train.steps = 3                                    # checkpoint.every = 3: one checkpoint, at step 3
  with no_unpickling():
    assert trainer.train(first, workdir).resumed_from is None
  planted = _plant_in_checkpoints(workdir, marker)
  assert any('/state/' in p for p in planted) and any('/data/' in p for p in planted)

  second = tiny_experiment(shapes_data_dir)                # steps 6: restores state + grain iterator of step 3
  with no_unpickling():
    result = trainer.train(second, workdir)
    assert result.resumed_from == 3 and int(jax.device_get(result.state.step)) == 6
    _plant_in_checkpoints(workdir, marker)
    bundle = mmproj.load(workdir)
    assert bundle.step == 6 and bundle.tokenizer.get_vocab_size() > 0
    assert mmproj.load(os.path.join(workdir, 'checkpoints', '3')).step == 3
  assert not marker.exists()
  assert not os.path.exists(os.path.join(workdir, 'checkpoints_corrupt'))   # nothing fell back


def test_shapes_loader_never_unpickles(shapes_data_dir):
  cfg = tiny_experiment(shapes_data_dir)
  with no_unpickling():
    _, tok = data.prepare(cfg.data)
    it = iter(data.train_loader(cfg.data, tok, num_image_tokens=16, global_batch_size=4, seed=0,
                                process_index=0, process_count=1))
    batch = next(it)
    state = it.get_state()
    it.set_state(state)
    next(it)
  assert batch['image'].shape[0] == 4 and batch['tokens'].shape[0] == 4


# ------------------------------------------------------------------------------------------------ HF directories

@pytest.fixture(scope='module')
def hf(tmp_path_factory):
  """Tiny CLIP, Llama and LLaVA directories (safetensors), the LLaVA-format fixture data and tokenizer, all built
  here, outside any guard."""
  pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  import llava_fixture
  from parity_utils import randomize_, seeded

  root = tmp_path_factory.mktemp('no_pickle_hf')
  tok = llava_fixture.make_tokenizer(root / 'tokenizer')
  vocab = llava_fixture.vocab_size(tok)
  seeded(0)
  vision_cfg = transformers.CLIPVisionConfig(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32,
                                             num_hidden_layers=2, num_attention_heads=2)
  text_cfg = transformers.LlamaConfig(vocab_size=vocab - 6, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                      max_position_embeddings=256)
  randomize_(transformers.CLIPVisionModel(vision_cfg), seed=1, std=0.1).save_pretrained(
      root / 'clip', safe_serialization=True)
  randomize_(transformers.LlamaForCausalLM(text_cfg), seed=2, std=0.1).save_pretrained(
      root / 'llama', safe_serialization=True)
  llava_text = transformers.LlamaConfig(**{**text_cfg.to_dict(), 'vocab_size': vocab})
  llava_cfg = transformers.LlavaConfig(vision_config=vision_cfg, text_config=llava_text,
                                       image_token_index=llava_fixture.IMAGE_TOKEN_ID, image_seq_length=4,
                                       vision_feature_layer=-2, vision_feature_select_strategy='default')
  model = transformers.LlavaForConditionalGeneration._from_config(llava_cfg)
  randomize_(model, seed=3, std=0.1).save_pretrained(root / 'llava', safe_serialization=True)
  shutil.copy(tok, root / 'llava' / 'tokenizer.json')
  json_path, image_dir = llava_fixture.make_llava_json(root / 'data', n=6)
  for d in ('clip', 'llama', 'llava'):
    assert not [f for f in os.listdir(root / d) if f.endswith(('.bin', '.pt', '.pth', '.pkl'))]
  return dict(root=root, clip=str(root / 'clip'), llama=str(root / 'llama'), llava=str(root / 'llava'),
              tokenizer=tok, json=json_path, images=image_dir)


def test_hf_directories_load_without_unpickling(hf):
  with no_unpickling():
    llava = mmproj.load(hf['llava'])
    lm = mmproj.load(hf['llama'])
    tower = mmproj.load(hf['clip'])
    texts = mmproj.generate(llava, [np.zeros((20, 24, 3), np.uint8)], ['USER: <image>\nWhat? ASSISTANT:'],
                            max_new_tokens=2)
  assert llava.tokenizer is not None and len(texts) == 1
  assert set(llava.params) == {'encoder', 'projector', 'lm'} and set(lm.params) == {'lm'}
  assert tower.prompt_format == 'none'


def _llava_config(hf, data_dir, lm=None, **extra):
  args = dict(json=hf['json'], images=hf['images'], data_dir=data_dir, text_len=64, dtype='float32', steps=2,
              batch=2)
  args.update(extra)
  return llava_config('configs/llava15_stage1.py', hf['clip'], lm or hf['llama'], hf['tokenizer'], **args)


def test_pretrained_init_from_hf_dirs_never_unpickles(hf, tmp_path):
  with no_unpickling():
    cfg = _llava_config(hf, str(tmp_path / 'tfds'))
    loaded = pretrained.load(cfg)
  assert set(loaded) == {'encoder', 'lm'}
  assert loaded['lm']['embed_tokens']['embedding'].shape[0] == cfg.model.lm.vocab_size


def test_llava_json_loader_and_token_length_cache_never_unpickle(hf, tmp_path):
  from mmproj.data import llava_json
  from mmproj.model import num_image_tokens

  marker = tmp_path / 'pwned'
  cfg = _llava_config(hf, str(tmp_path / 'tfds'))
  cfg.data.overflow = 'skip'                                # reads (or writes) the token-length cache
  m = num_image_tokens(cfg.model)

  def batches():
    _, tok = data.prepare(cfg.data)
    it = iter(data.train_loader(cfg.data, tok, num_image_tokens=m, global_batch_size=2, seed=0,
                                process_index=0, process_count=1))
    return [next(it) for _ in range(2)]

  with no_unpickling():
    first = batches()                                       # builds the TFDS set, computes and writes the cache
  cache = glob.glob(os.path.join(os.fspath(llava_json.builder(cfg.data).data_path), 'token_lengths-*.npy'))
  assert len(cache) == 1
  lengths = np.load(cache[0])
  with no_unpickling():
    again = batches()                                       # reads the cache back
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a['tokens'], b['tokens'])

  # A cache replaced by an object array (a pickle inside the .npy) is refused and computed again.
  np.save(cache[0], np.array([_Plant(marker)] * len(lengths), dtype=object))
  with no_unpickling():
    planted = batches()
  assert not marker.exists()
  np.testing.assert_array_equal(np.load(cache[0]), lengths)
  np.testing.assert_array_equal(planted[0]['tokens'], first[0]['tokens'])


# ------------------------------------------------------------------------------------- planted HF pickle weights

def _hf_dir_with(hf, tmp_path, name: str, *, with_safetensors: bool) -> tuple[str, str]:
  """A copy of the tiny Llama directory whose weights are `name` = a planted pickle (+ the real safetensors when
  asked) -> (directory, marker path)."""
  path, marker = tmp_path / 'model', tmp_path / 'pwned'
  shutil.copytree(hf['llama'], path)
  if not with_safetensors:
    os.remove(path / 'model.safetensors')
  (path / name).write_bytes(_plant_bytes(marker))
  return str(path), str(marker)


@pytest.mark.parametrize('name', ['pytorch_model.bin', 'model.pt', 'model.pth', 'weights.ckpt', 'weights.pkl'])
def test_pickle_only_hf_dir_is_refused_naming_the_file(hf, tmp_path, name):
  path, marker = _hf_dir_with(hf, tmp_path, name, with_safetensors=False)
  with no_unpickling():
    with pytest.raises(ValueError, match=rf'only pickle-based weights \({name}\).*safetensors'):
      mmproj.load(path)
    cfg = _llava_config(hf, str(tmp_path / 'tfds'), lm=path)   # cfg.init.lm -> the pickle-only directory
    with pytest.raises(ValueError, match=rf'\({name}\)'):
      pretrained.load(cfg)
  assert not os.path.exists(marker)


def test_pickle_beside_safetensors_is_ignored(hf, tmp_path):
  path, marker = _hf_dir_with(hf, tmp_path, 'pytorch_model.bin', with_safetensors=True)
  with no_unpickling():
    bundle = mmproj.load(path)
    reference = mmproj.load(hf['llama'])
  np.testing.assert_array_equal(bundle.params['lm']['embed_tokens']['embedding'],
                                reference.params['lm']['embed_tokens']['embedding'])
  assert not os.path.exists(marker)


def test_pickle_named_safetensors_is_not_unpickled(hf, tmp_path):
  path, marker = _hf_dir_with(hf, tmp_path, 'pytorch_model.bin', with_safetensors=True)
  shutil.copy(os.path.join(path, 'pytorch_model.bin'), os.path.join(path, 'model.safetensors'))
  with no_unpickling():
    with pytest.raises(ValueError, match='model.safetensors: unreadable safetensors file'):
      mmproj.load(path)
  assert not os.path.exists(marker)
