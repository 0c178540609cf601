"""Output-projector registry: name -> flax module class mapping the LM's hidden states at its K signal tokens
[IMG0]..[IMGk-1] [B, K, D_lm] into a generator's conditioning [B, L, Dc] (NExT-GPT, GILL, MiniGPT-5: the fourth of
the five parts of a multimodal LLM, the input projector's mirror on the output side).

Every output-projector class
  - is a `flax.linen.Module` with fields `in_dim` (D_lm), `num_signal_tokens` (K), `out_len` (L), `out_dim` (Dc),
    `dtype` plus its own hyper-parameters (the keys of `cfg.model.output.projector` other than `name` and the
    sizes), called as `proj(h, deterministic=True)`; deterministic=False applies its dropout (rng 'dropout');
  - has methods `check()` (ValueError naming the field, `model.output.projector.<field>`; `check_int` /
    `check_choice` / `check_positive` / `check_rate` below do the common checks) and `param_count() -> int` (the
    formula documented in its docstring). They read the module's fields, so a hyper-parameter's default lives only
    in its field; they are plain methods, usable on the unbound module `build` returns.

    proj = build(cfg.model.output.projector, in_dim=D_lm, num_signal_tokens=K, out_len=L, out_dim=Dc)
    y = proj.apply({'params': p}, h, deterministic=True)                 # h [B, K, D_lm] -> y [B, L, Dc]
    y = proj.apply({'params': p}, h, deterministic=False, rngs={'dropout': key})          # training
    param_count(cfg.model.output.projector, D_lm, K, L, Dc) == proj.param_count()

Families:
  mlp          per-token MLP D_lm -> Dc, then a learned K -> L mixing along the token axis when K != L (the
               linear / MLP baseline of GILL's and NExT-GPT's ablations)
  transformer  GILL's GILLMapper, NExT-GPT's and MiniGPT-5's output projector: an encoder over the K states and
               a decoder of L learned queries cross-attending to them
"""

from mmproj.output_projectors.registry import (FIELD, REGISTRY, build, check_choice, check_int, check_positive,
                                              check_rate, get, param_count, register, validate)

# Output-projector families register themselves on import.
from mmproj.output_projectors import mlp as mlp
from mmproj.output_projectors import transformer as transformer

__all__ = ['FIELD', 'REGISTRY', 'build', 'check_choice', 'check_int', 'check_positive', 'check_rate', 'get',
           'param_count', 'register', 'validate']
