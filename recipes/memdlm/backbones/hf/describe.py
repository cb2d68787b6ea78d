"""Which linears of an `HFDenoiser` carry fast weights (`fast_weight_targets`), and what the
recipe says about the backbone at start (`describe`, `description`)."""

from __future__ import annotations

import collections
import re
from collections.abc import Sequence

from torch import nn

from recipes.memdlm.backbones.hf.attention import first_fast_index
from recipes.memdlm.backbones.hf.experts import UnfusedExperts, is_fused_experts
from recipes.memdlm.errors import UserError

DEFAULT_FFN = ("gate_proj", "up_proj", "down_proj")
# The FFN projections of a layer, relative to the layer, for the layouts we know: Llama, Qwen,
# Mistral, OLMoE, LLaDA-MoE (gate/up/down_proj); Mixtral's w1/w2/w3; LLaDA-8B / OLMo
# (ff_proj, up_proj, ff_out); ModernBERT (mlp.Wi, mlp.Wo); BERT (intermediate.dense, output.dense).


FFN_PATTERN = re.compile(
    r"(?:.*\.)?(?:gate_proj|up_proj|down_proj|w1|w2|w3|ff_proj|ff_out)"
    r"|(?:.*\.)?mlp\.(?:Wi|Wo)|intermediate\.dense|output\.dense"
)


def fast_weight_targets(denoiser, fraction: float, modules: Sequence[str] = DEFAULT_FFN):
    """Names (from this wrapper) of the FFN linears in the last `fraction` of layers.

    `modules` equal to the default (gate/up/down_proj) means "the FFN projections" of any
    known layout (FFN_PATTERN); other names are matched against the last name component.
    In a MoE layer only `mlp.experts.*` and `mlp.shared_experts.*` are taken (the reference
    code's rule). Outer-LoRA layers are looked through to their `base_layer`.
    """
    if not 0 < fraction <= 1:
        raise UserError(f"fraction must be in (0, 1], got {fraction}")
    stack = denoiser.layers
    start = first_fast_index(len(stack), fraction)
    default = tuple(modules) == DEFAULT_FFN
    names = []
    for index in range(start, len(stack)):
        layer = stack[index]
        if any(is_fused_experts(m) for m in layer.modules()):
            raise UserError(
                f"layer {index} still holds fused experts; wrap the model with "
                f"layer_fraction >= {fraction} (hf.load_model / hf.wrap unfuse them)"
            )
        moe = has_expert_list(layer)
        for name, module in layer.named_modules():
            if not isinstance(module, nn.Linear) or "lora_" in name:
                continue  # peft's own adapter matrices are not targets
            logical = name.removesuffix(".base_layer")  # the frozen linear under peft
            if moe and not logical.startswith(("mlp.experts.", "mlp.shared_experts.")):
                continue
            wanted = (
                FFN_PATTERN.fullmatch(logical) if default else logical.rsplit(".", 1)[-1] in modules
            )
            if wanted:
                names.append(f"hf.{denoiser.layers_path}.{index}.{name}")
    if not names:
        raise UserError(
            f"no FFN linear matches modules={tuple(modules)} in layers {start}.."
            f"{len(stack) - 1} of {denoiser.layers_path}; set memdlm.targets to the model's names"
        )
    return names


def describe(denoiser, fraction: float = 0.1, modules: Sequence[str] = DEFAULT_FFN) -> dict:
    """What the recipe runs on: family, forward path, attention, fast-weight modules.

    Returns {"family", "forward", "split", "split_note", "tail" (the fused head and the
    scored-rows tail: "rows", "head" or "none"), "tail_note", "attention", "logit_shift",
    "mask_style", "fast_weights": count, "fast_weight_layers": [indices],
    "fast_weight_kinds": {relative name pattern: count}, "routing": {MoE layer: how it
    serves per-sample fast weights, "softmax" or "module" (the adapter's dispatch) or
    "per_sample" (the block once per sample)}}.
    """
    targets = denoiser.fast_weight_targets(fraction, modules)
    prefix = f"hf.{denoiser.layers_path}."
    layers, kinds = [], collections.Counter()
    for name in targets:
        index, _, rest = name[len(prefix) :].partition(".")
        if int(index) not in layers:
            layers.append(int(index))
        kinds[re.sub(r"\.\d+\.", ".*.", rest)] += 1
    routing = {
        i: layer.mlp.memdlm_dispatch
        for i, layer in enumerate(denoiser.layers)
        if hasattr(getattr(layer, "mlp", None), "memdlm_dispatch")
    }
    first = first_fast_index(len(denoiser.layers), fraction)
    forward = (
        f"split at layer {first} (layers < {first} once per inner state)"
        if denoiser.split
        else f"full forward ({denoiser.split_note})"
    )
    tail = "rows" if denoiser.tail_rows else "head" if denoiser.tail is not None else "none"
    last = len(denoiser.layers) - 1
    inside = f"hf.{denoiser.layers_path}.{last}."
    if (
        denoiser.split
        and tail == "rows"
        and first == last
        and all(denoiser.tail.is_ffn(n[len(inside) :]) for n in targets if n.startswith(inside))
    ):
        forward += f"; after layer {last}'s attention, the scored rows only"
    return {
        "family": denoiser.family,
        "forward": forward,
        "split": denoiser.split,
        "split_note": denoiser.split_note,
        "tail": tail,
        "tail_note": denoiser.tail_note,
        "attention": denoiser.attention
        + (f" (blocks of {denoiser.block_size})" if denoiser.attention == "block_causal" else ""),
        "logit_shift": denoiser.shift,
        "mask_style": denoiser.mask_style,
        "fast_weights": len(targets),
        "fast_weight_layers": layers,
        "fast_weight_kinds": dict(kinds),
        "routing": routing,
    }


def description(denoiser, fraction: float = 0.1, modules: Sequence[str] = DEFAULT_FFN) -> str:
    """`describe` as one line, for the recipe to print at start."""
    d = describe(denoiser, fraction, modules)
    kinds = ", ".join(f"{n} {k}" for k, n in d["fast_weight_kinds"].items())
    fast = sorted(i for i, how in d["routing"].items() if how != "per_sample")
    looped = sorted(i for i, how in d["routing"].items() if how == "per_sample")
    routed = f"; adapter MoE dispatch in layers {fast}" if fast else ""
    if looped:
        routed += f"; MoE blocks run once per sample (exact, slower) in layers {looped}"
    shift = "; logits shifted back by one (Dream)" if d["logit_shift"] else ""
    return (
        f"backbone {d['family']} ({type(denoiser.hf).__name__}): {d['forward']}; "
        f"attention {d['attention']}{shift}; {d['fast_weights']} fast-weight modules in "
        f"layers {d['fast_weight_layers']} of {denoiser.layers_path} ({kinds}){routed}"
    )


def has_expert_list(layer: nn.Module) -> bool:
    mlp = getattr(layer, "mlp", None)
    return isinstance(getattr(mlp, "experts", None), (nn.ModuleList, UnfusedExperts))
