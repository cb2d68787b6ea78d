"""MemDLM (arXiv 2603.22241) and the standard masked-diffusion baseline.

Inference with a model you loaded yourself (recipes/memdlm/api.py):

    import recipes.memdlm as memdlm
    out = memdlm.generate(model, prompt_ids, mask_id=..., gen_length=64, steps=64, adapt=True)

`generate`, `adapt_prompt` and `fast_weights_for` are imported on first use, so that the command
line (`python -m recipes.memdlm`) starts without loading torch.
"""

from __future__ import annotations

__all__ = ["adapt_prompt", "fast_weights_for", "generate"]


def __getattr__(name: str):
    if name in __all__:
        from recipes.memdlm import api

        return getattr(api, name)
    raise AttributeError(f"module 'recipes.memdlm' has no attribute {name!r}")
