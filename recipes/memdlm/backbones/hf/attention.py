"""Which LLaDA-family (or other Hugging Face) model this is, and the attention mask each family
needs so that attention is bidirectional (or block-causal while sampling)."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

import memory as mm
from recipes.memdlm.errors import UserError

FAMILIES = ("llada", "llada_moe", "llada2", "dream", "decoder", "encoder")


ATTENTION = ("bidirectional", "block_causal")


def detect_family(model: nn.Module) -> str:
    """The backbone family, from `config.model_type` (the LLaDA family's remote code) or the
    architecture: "decoder" for a causal LM made bidirectional, else "encoder" (masked LM)."""
    config = getattr(model, "config", None)
    kind = str(getattr(config, "model_type", "") or "").lower().replace("-", "_")
    if kind.startswith("llada2"):
        return "llada2"
    if kind in ("lladamoe", "llada_moe"):
        return "llada_moe"
    if kind == "llada":
        return "llada"
    if kind == "dream":
        return "dream"
    names = [type(m).__name__ for m in model.modules()][:3]  # a peft wrapper, then the model
    return "decoder" if any(n.endswith("ForCausalLM") for n in names) else "encoder"


# How each family takes an attention mask (llada-family-backbones.md section 2):
# "padding": a 2-D (B, L) 0/1 mask or None (LLaDA, LLaDA-MoE, BERT-likes);
# "bool": None, or a 4-D bool (B, 1, L, L) of allowed keys (Dream casts any 3-D/4-D mask to bool,
#   so an additive mask would be inverted; from a 2-D mask it would also hide pad queries);
# "additive": a 4-D additive float mask (B, 1, L, L), always given, so that the model never
#   builds its own mask (LLaDA2 turns a 2-D mask with padding into a causal one; transformers
#   4.57's decoders build a causal mask whatever `is_causal` says).


MASK_STYLE = {
    "llada": "padding",
    "llada_moe": "padding",
    "llada2": "additive",
    "dream": "bool",
    "decoder": "additive",
    "encoder": "padding",
}


def allowed_keys(
    attention_mask: torch.Tensor | None, shape, *, attention: str, block_size: int, device
) -> torch.Tensor | None:
    """(B, L, L) bool: query i may attend to key j; None when everything is visible.

    attention_mask (B, L) 1 = real token, or None. "block_causal": bidirectional inside blocks
    of `block_size` positions, causal across blocks (key block <= query block)."""
    rows, length = shape
    allowed = None
    if attention == "block_causal":
        block = torch.arange(length, device=device) // block_size
        allowed = (block[None, :] <= block[:, None]).expand(rows, length, length)
    if attention_mask is not None and not bool(attention_mask.bool().all()):
        keys = attention_mask.bool()[:, None, :].expand(rows, length, length)
        allowed = keys if allowed is None else allowed & keys
    return allowed


def additive_mask(allowed: torch.Tensor | None, shape, dtype, device) -> torch.Tensor:
    """(B, 1, L, L) additive float mask: 0 where allowed, the dtype's minimum elsewhere."""
    rows, length = shape
    if allowed is None:
        return torch.zeros(rows, 1, length, length, dtype=dtype, device=device)
    zero = torch.zeros((), dtype=dtype, device=device)
    low = torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=device)
    return torch.where(allowed[:, None], zero, low)


# --------------------------------------------------------------------------- the wrapper


def find_layer_stack(model: nn.Module) -> str:
    """Dotted path of the model's layer stack: the `nn.ModuleList` of same-class blocks that
    holds the most parameters (experts lists are inside it, so they never win)."""
    best, best_size = None, -1
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(block) for block in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > best_size:
            best, best_size = name, size
    if best is None:
        raise UserError(f"{type(model).__name__} has no nn.ModuleList of layers")
    return best


def make_bidirectional(model: nn.Module) -> None:
    """Full attention for a masked diffusion model: a causal decoder config (`is_causal`, used by
    transformers' mask builders) and attention modules' `is_causal` flags are turned off."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and getattr(config, "is_causal", None) is not False:
            with contextlib.suppress(AttributeError):  # a frozen or foreign config object
                config.is_causal = False
        if getattr(module, "is_causal", False) is True:
            module.is_causal = False


def first_fast_index(num_layers: int, fraction: float) -> int:
    """The reference code's first fast-weight layer (`memory.first_of_last_layers`)."""
    return mm.first_of_last_layers(num_layers, fraction)


# --------------------------------------------------------------------------- routed experts
