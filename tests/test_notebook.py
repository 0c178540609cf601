"""experiments/colab_load_checkpoint.ipynb: committed clean, and runs top to bottom on a freshly trained workdir."""
from __future__ import annotations

import os

import nbclient
import nbformat
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, 'experiments', 'colab_load_checkpoint.ipynb')
KERNEL = 'mmproj-test-python'


def test_committed_notebook_is_valid_and_has_no_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  assert nb.nbformat == 4
  for i, cell in enumerate(nb.cells):
    if cell.cell_type == 'code':
      assert cell.outputs == [] and cell.execution_count is None, f'cell {i} of {NOTEBOOK} has outputs'


def _text(cell) -> str:
  parts = []
  for out in cell.get('outputs', []):
    if out.output_type == 'stream':
      parts.append(out.text)
    elif 'data' in out:
      parts.append(out.data.get('text/plain', ''))
  return ''.join(parts)


@pytest.mark.slow
def test_notebook_runs_on_a_trained_workdir(trained_workdir, media_runs, draw_runs, tmp_path, monkeypatch):
  """Executes every cell with nbclient in a kernel of this interpreter (a kernelspec written to a temporary
  JUPYTER_PATH, whose argv is sys.executable, so no user- or system-wide 'python3' kernel is picked up)."""
  from ipykernel.kernelspec import install

  prefix = tmp_path / 'jupyter'
  install(kernel_name=KERNEL, prefix=str(prefix))                  # argv: [sys.executable, -m, ipykernel_launcher]
  monkeypatch.setenv('JUPYTER_PATH', str(prefix / 'share' / 'jupyter'))
  monkeypatch.setenv('MMPROJ_CHECKPOINT', trained_workdir)        # its config.json holds the test data_dir
  monkeypatch.setenv('MMPROJ_AUDIO_CHECKPOINT', media_runs['audio'][1])
  monkeypatch.setenv('MMPROJ_VIDEO_CHECKPOINT', media_runs['video'][1])
  monkeypatch.setenv('MMPROJ_DRAW_CHECKPOINT', str(draw_runs[0] / 'generate'))
  monkeypatch.setenv('MPLBACKEND', 'module://matplotlib_inline.backend_inline')
  monkeypatch.delenv('MMPROJ_GIT_URL', raising=False)

  nb = nbformat.read(NOTEBOOK, as_version=4)
  run_dir = tmp_path / 'cwd'
  run_dir.mkdir()
  client = nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=240, resources={'metadata': {'path': str(run_dir)}})
  client.execute()                                                  # CellExecutionError on any failing cell

  code = [c for c in nb.cells if c.cell_type == 'code']
  assert all(out.output_type != 'error' for c in code for out in c.outputs)
  assert 'nothing to install' in _text(code[0])                    # mmproj imports: no pip install attempted
  text = '\n'.join(_text(c) for c in code)
  assert f'checkpoint     {trained_workdir}' in text and 'projector      mlp' in text
  assert 'accuracy: ' in text and '% on 4 test images' in text
  table = _text(code[3]).splitlines()
  assert table[0].split() == ['image', 'question', 'model', 'truth'] and len(table) > 5
  assert 'attention maps: (4, 3, 3)' in text                       # lm_attention_to_image on the 3x3 grid
  assert any('image/png' in out.get('data', {}) for out in code[-4].outputs)     # the attention maps
  assert 'audio accuracy: ' in text and 'video accuracy: ' in text and "media shown: ['audio', 'video']" in text
  assert any('image/png' in out.get('data', {}) for out in code[-2].outputs)     # the log-mel and the frames
  assert 'draw: ' in text and 'output projector mlp' in text and 'drawings shown: ' in text
  assert any('image/png' in out.get('data', {}) for out in code[-1].outputs)     # the drawings
