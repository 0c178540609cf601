"""Llama 3.2 Vision's gated cross-attention layer: transformers `MllamaCrossAttentionDecoderLayer` -> mmproj
`GatedCrossAttentionBlock` (gated_xattn, variant='mllama').

    block, params = mmproj.convert.from_transformers(hf_layer)
    y = block.apply({'params': params}, x, grid=(h, w), media=media, mask=mask)

  x      [B, T, D]  the text hidden states (HF `hidden_states`)
  media  [B, S, D]  the projected vision tokens (HF `cross_attention_states`)
  mask   bool [B, T, S], True = text token t may attend media token s. From HF's 4-d cross_attention_mask
         [B, T, n_images, n_tiles] (1 = attend) with `num_vision_tokens` tokens per tile:
             mask = repeat(cross_attention_mask, num_vision_tokens, axis=3).reshape(B, T, S).astype(bool)
         (what transformers' `_prepare_cross_attention_mask` turns into the additive mask and
         full_text_row_masked_out_mask the HF layer takes). `grid` is ignored.

The port uses empty_rows='unmasked', transformers' behaviour for a text token with no visible media token: HF
drops the mask on that row (the token attends to all media) and zeroes only the MLP output. mmproj's default
('zero', as Meta's Llama 3.2 reference and Flamingo) zeroes the attention output there too.
HF config -> gated_xattn cfg: num_attention_heads -> heads, num_key_value_heads -> kv_heads, hidden_size //
num_attention_heads -> head_dim, intermediate_size -> ff_dim, rms_norm_eps -> norm_eps (hidden_act must be silu).
"""

from __future__ import annotations

from typing import Any

from mmproj.convert.base import StateDict, activation, converter
from mmproj import projectors


@converter('MllamaCrossAttentionDecoderLayer')
def mllama_cross_attention_layer(module: Any):
  attn = module.cross_attn
  heads, kv_heads, head_dim = int(attn.num_heads), int(attn.num_key_value_heads), int(attn.head_dim)
  eps = float(module.input_layernorm.variance_epsilon)
  for norm in (module.post_attention_layernorm, attn.q_norm, attn.k_norm):
    if float(norm.variance_epsilon) != eps:
      raise ValueError(f'MllamaCrossAttentionDecoderLayer: RMSNorm eps {norm.variance_epsilon} differs from '
                       f'input_layernorm eps {eps}; mmproj uses one norm_eps')
  if activation(module.mlp.act_fn, 'MllamaCrossAttentionDecoderLayer.mlp.act_fn (hidden_act)') != 'silu':
    raise ValueError('MllamaCrossAttentionDecoderLayer.mlp.act_fn (hidden_act): the mllama variant is a SwiGLU '
                     f'(silu) MLP, got {type(module.mlp.act_fn).__name__}')

  width, ff_dim = int(attn.q_proj.in_features), int(module.mlp.gate_proj.out_features)
  sd = StateDict.of(module)

  def heads_kernel(prefix, n):                                                # [D, n*d] -> [D, n, d]
    return sd.kernel(prefix, width, n * head_dim).reshape(width, n, head_dim)

  params = {
      'input_layernorm': sd.norm('input_layernorm', bias=False),
      'cross_attn': {
          'q_proj': {'kernel': heads_kernel('cross_attn.q_proj', heads)},
          'k_proj': {'kernel': heads_kernel('cross_attn.k_proj', kv_heads)},
          'v_proj': {'kernel': heads_kernel('cross_attn.v_proj', kv_heads)},
          'o_proj': {'kernel': sd.kernel('cross_attn.o_proj', heads * head_dim, width).reshape(heads, head_dim, width)},
          'q_norm': sd.norm('cross_attn.q_norm', bias=False),
          'k_norm': sd.norm('cross_attn.k_norm', bias=False),
      },
      'attn_gate': sd.take('cross_attn_attn_gate', (1,)),
      'post_attention_layernorm': sd.norm('post_attention_layernorm', bias=False),
      'mlp': {'gate_proj': {'kernel': sd.kernel('mlp.gate_proj', width, ff_dim)},
              'up_proj': {'kernel': sd.kernel('mlp.up_proj', width, ff_dim)},
              'down_proj': {'kernel': sd.kernel('mlp.down_proj', ff_dim, width)}},
      'mlp_gate': sd.take('cross_attn_mlp_gate', (1,)),
  }
  sd.finish()
  cfg = dict(name='gated_xattn', variant='mllama', heads=heads, kv_heads=kv_heads, head_dim=head_dim, ff_dim=ff_dim,
             norm_eps=eps, empty_rows='unmasked')
  return projectors.build(cfg, in_dim=width, out_dim=width).build_block(), params
