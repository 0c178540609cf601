"""Helpers for parity tests against transformers PyTorch modules (tiny random configs, no downloads)."""

import numpy as np
import pytest

torch = pytest.importorskip('torch')

ATOL = 1e-5  # f32 parity tolerance required of every ported module


def seeded(seed: int = 0):
  torch.manual_seed(seed)
  return np.random.default_rng(seed)


def randomize_(module, seed: int = 0, std: float = 0.5):
  """Overwrites every parameter and float buffer with N(0, std) noise (HF inits zeros/ones for norms and gates,
  which would hide a swapped scale or bias)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.copy_(torch.randn(p.shape, generator=g) * std)
  return module.eval()


def to_torch(x: np.ndarray):
  return torch.from_numpy(np.ascontiguousarray(x))


def assert_close(ours, theirs, atol: float = ATOL, what: str = 'output'):
  ours = np.asarray(ours, np.float32)
  theirs = theirs.detach().cpu().float().numpy() if hasattr(theirs, 'detach') else np.asarray(theirs)
  assert ours.shape == theirs.shape, f'{what}: shape {ours.shape} vs reference {theirs.shape}'
  err = float(np.max(np.abs(ours - theirs))) if ours.size else 0.0
  assert err <= atol, f'{what}: max abs diff {err:.3g} > {atol}'
