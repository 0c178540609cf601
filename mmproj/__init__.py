"""mmproj: multimodal input projectors in JAX/Flax, one interface, one sharded training loop."""
from mmproj import projectors
from mmproj.model import MultimodalLM, build_model
from mmproj.train.checkpoint import Bundle, load

__all__ = ['Bundle', 'MultimodalLM', 'build_model', 'load', 'projectors']
