"""mmproj: multimodal input projectors in JAX/Flax, one interface, one sharded training loop."""
from mmproj import projectors
from mmproj.model import MultimodalLM, build_model
from mmproj.inference import Bundle, Reply, generate, load

__all__ = ['Bundle', 'MultimodalLM', 'Reply', 'build_model', 'generate', 'load', 'projectors']
