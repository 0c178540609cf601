"""Shared building blocks: norms, rotary embeddings, attention (MHA/GQA + masks + KV cache), MLPs."""

from mmproj.layers.attention import (Attention, causal_padding_mask, causal_query_blocks, dot_product_attention,
                                     masked_softmax, padding_mask)
from mmproj.layers.cross_attention import CrossAttention as CrossAttention
from mmproj.layers.deformable_attention import DeformableAttention as DeformableAttention
from mmproj.layers.feature_map import DepthwiseConv2d as DepthwiseConv2d, SqueezeExcite as SqueezeExcite
from mmproj.layers.bert import BertAttention as BertAttention, BertFeedForward as BertFeedForward
from mmproj.layers.mlp import ACTIVATIONS, GeluMLP, SwiGLU, dense, get_activation
from mmproj.layers.norms import LayerNorm, RMSNorm
from mmproj.layers.rope import apply_rope, rope_cos_sin, rotate_half

__all__ = [
    'ACTIVATIONS', 'Attention', 'GeluMLP', 'LayerNorm', 'RMSNorm', 'SwiGLU', 'apply_rope', 'causal_padding_mask',
    'causal_query_blocks', 'dense', 'dot_product_attention', 'get_activation', 'masked_softmax', 'padding_mask',
    'rope_cos_sin', 'rotate_half',
]
