"""Voxtral connector — Voxtral (Liu et al. 2025, "Voxtral", arXiv:2507.13264).

Voxtral's adapter shortens the Whisper encoder's 50 Hz frame sequence by stacking every k consecutive frames into
one token (their channels concatenated, frame by frame) and maps it to the LM width with a bias-free two-layer MLP
(transformers VoxtralMultiModalProjector; k = 4 there, the encoder output reshaped to audio intermediate_size =
4 * d_model before linear_1):

    x [B, T, Dv] ──stack k consecutive frames──> [B, T/k, k*Dv] ──linear_1──> [B, T/k, Dt] ──act──> ──linear_2──> y

Token (frame) i of output token j is frame j*k + i; its channels sit at [i*Dv, (i+1)*Dv) of the stacked token.
A token count not divisible by k is a ValueError naming model.projector.stack_factor rather than padding: the
reference never pads (it reshapes the whole batch, so an indivisible count would mix frames across examples or
fail), and zero frames would be tokens the trained weights never saw; trim or pad the audio upstream instead.
The tokens are read as one sequence in the order given (time order for an audio grid (T,); row-major runs of k
patches for an image grid (h, w), straddling rows when k does not divide w).

  tokens in -> out:  N -> M = N / stack_factor   (N = T, or h*w for an image grid)
  params:            k*Dv*Dt + b*Dt + Dt*Dt + b*Dt,  k = stack_factor, b = use_bias (Voxtral: no biases)
  temporal locality: kept — output token j depends only on frames j*k .. j*k + k - 1, in their order
  shapes:            x [B, T, Dv] -> stacked [B, M, k*Dv] -> linear_1 [k*Dv, Dt] ('embed', 'mlp') -> act
                     -> linear_2 [Dt, Dt] ('mlp', 'embed') -> y [B, M, Dt]
"""

from typing import Any

import einops
import flax.linen as nn
import jax.numpy as jnp

from mmproj.layers import ACTIVATIONS
from mmproj.layers.token_grid import check_tokens, grid_tokens
from mmproj.projectors.mlp import dense_stack, dense_stack_param_count
from mmproj.projectors.registry import check_choice, check_int, register


def stacked_length(n: int, k: int, what: str) -> int:
  """n / k; ValueError naming model.projector.stack_factor when k does not divide n."""
  if n % k:
    raise ValueError(f'{what}: {n} encoder tokens are not divisible by model.projector.stack_factor={k} '
                     '(frames are stacked k at a time; trim or pad the audio to a multiple of k frames)')
  return n // k


@register('voxtral', modality='audio')
class VoxtralProjector(nn.Module):
  """Stack k consecutive frames, then Linear-act-Linear: [B, T, Dv] -> [B, T / stack_factor, Dt]."""

  in_dim: int
  out_dim: int
  stack_factor: int = 4      # k frames per LM token (Voxtral: intermediate_size / d_model = 4)
  act: str = 'gelu'          # HF projector_hidden_act (exact erf GELU)
  use_bias: bool = False     # Voxtral's linears have no bias
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, grid=None, deterministic: bool = True):    # x [B, T, Dv]
    del deterministic  # no dropout
    what = 'voxtral projector'
    n = check_tokens(x, grid, what)
    if x.shape[-1] != self.in_dim:
      raise ValueError(f'{what} expects in_dim={self.in_dim}, got tokens of width {x.shape[-1]}')
    stacked_length(n, self.stack_factor, what)
    x = einops.rearrange(x, 'b (m k) d -> b m (k d)', k=self.stack_factor)   # [B, M, k*Dv]
    return dense_stack(x, self.out_dim, 2, self.act, self.use_bias, self.dtype)  # [B, M, Dt]

  @nn.nowrap
  def check(self) -> None:
    check_int('stack_factor', self.stack_factor)
    check_choice('act', self.act, ACTIVATIONS)

  @nn.nowrap
  def num_output_tokens(self, grid) -> int:
    return stacked_length(grid_tokens(grid, 'voxtral projector'), self.stack_factor, 'voxtral projector')

  @nn.nowrap
  def param_count(self) -> int:
    return dense_stack_param_count(self.stack_factor * self.in_dim, self.out_dim, 2, self.use_bias)
