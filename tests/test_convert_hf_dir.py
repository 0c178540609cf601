"""Reading HF directories: safetensors only (single file or sharded), clear errors, never pickle."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.flax import save_file

from mmproj.convert import hf_dir


def test_reads_single_file_and_widens_bfloat16(tmp_path):
  save_file({'w': jnp.full((2, 3), 1.5, jnp.bfloat16), 'i': jnp.arange(4)}, str(tmp_path / 'model.safetensors'))
  tensors = hf_dir.read_safetensors(str(tmp_path))
  assert tensors['w'].dtype == np.float32 and np.all(tensors['w'] == 1.5)
  np.testing.assert_array_equal(tensors['i'], np.arange(4))


def test_reads_sharded_index(tmp_path):
  save_file({'a': jnp.ones(2)}, str(tmp_path / 'model-00001-of-00002.safetensors'))
  save_file({'b': jnp.zeros(3)}, str(tmp_path / 'model-00002-of-00002.safetensors'))
  (tmp_path / hf_dir.INDEX_FILE).write_text(json.dumps({'weight_map': {
      'a': 'model-00001-of-00002.safetensors', 'b': 'model-00002-of-00002.safetensors'}}))
  assert sorted(hf_dir.read_safetensors(str(tmp_path))) == ['a', 'b']


def test_missing_shard_is_named(tmp_path):
  (tmp_path / hf_dir.INDEX_FILE).write_text(json.dumps({'weight_map': {'a': 'gone.safetensors'}}))
  with pytest.raises(ValueError, match='gone.safetensors'):
    hf_dir.read_safetensors(str(tmp_path))


def test_pickle_weights_are_refused_not_loaded(tmp_path):
  # A file that would run code if unpickled: it must never be opened as a pickle.
  (tmp_path / 'pytorch_model.bin').write_bytes(b'\x80\x04cos\nsystem\n(S"exit 3"\ntR.')
  with pytest.raises(ValueError, match='pytorch_model.bin.*safetensors only'):
    hf_dir.read_safetensors(str(tmp_path))


def test_corrupt_safetensors_and_config_are_named(tmp_path):
  (tmp_path / 'model.safetensors').write_bytes(b'not a safetensors file')
  with pytest.raises(ValueError, match='model.safetensors: unreadable'):
    hf_dir.read_safetensors(str(tmp_path))
  (tmp_path / 'config.json').write_text('{"hidden_size": ')
  with pytest.raises(ValueError, match='config.json: malformed JSON'):
    hf_dir.read_config(str(tmp_path))
  with pytest.raises(ValueError, match='no config.json'):
    hf_dir.read_config(str(tmp_path / 'nowhere'))
  assert not os.path.exists(tmp_path / 'nowhere')
