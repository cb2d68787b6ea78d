"""Choosing target layers: by position in the layer stack, or by a regex over module names.

Both helpers return the full dotted names of `nn.Linear` submodules, in `named_modules()`
order, ready to pass as `targets=` to `FastLoRA` or `FullFastWeights`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

MEMDLM_FFN = ("gate_proj", "up_proj", "down_proj")


def last_layers(
    model: nn.Module,
    fraction: float = 0.1,
    modules: Sequence[str] = MEMDLM_FFN,
    *,
    layers: str = "layers",
) -> list[str]:
    """Names of the `modules` linears in the last `fraction` of the model's layer stack.

    The rule is MemDLM's (`InnerLoRAManager._inject`): with L layers, layers
    `int(L * (1 - fraction))` to L - 1 are selected, and always at least the last one.
    Inside each selected layer every `nn.Linear` whose own (last) name is in `modules`
    is taken, at any depth, so MoE experts (`mlp.experts.3.gate_proj`) are included.

    Args:
        model: the model; `model.<layers>` must be an `nn.ModuleList` or `nn.Sequential`.
        fraction: share of layers to take, in (0, 1]. MemDLM uses 0.1.
        modules: last name components to match, e.g. `("gate_proj", "up_proj", "down_proj")`.
            Every name must match at least one linear (a typo is an error, not a no-op).
        layers: dotted path of the layer stack inside `model` (`"model.layers"` for
            Hugging Face decoder models).

    Returns:
        Full dotted names such as `"layers.3.mlp.gate_proj"`.
    """
    wanted = _check_module_names(modules)
    stack = _layer_stack(model, layers)
    num_layers = len(stack)
    start = first_of_last_layers(num_layers, fraction)
    names, seen = [], set()
    for index in range(start, num_layers):
        for name, module in stack[index].named_modules():
            last = name.rsplit(".", 1)[-1]
            if isinstance(module, nn.Linear) and last in wanted:
                names.append(f"{layers}.{index}.{name}")
                seen.add(last)
    missing = [m for m in wanted if m not in seen]
    if missing:
        raise ValueError(
            f"modules {missing} match no nn.Linear in {layers}[{start}:{num_layers}] "
            f"(modules={tuple(wanted)!r})"
        )
    return names


def first_of_last_layers(num_layers: int, fraction: float) -> int:
    """Index of the first layer `last_layers` selects: int(L * (1 - fraction)), at most L - 1
    (at least one layer is taken). fraction in (0, 1]."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        raise TypeError(f"fraction must be a float in (0, 1], got {fraction!r}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    return min(int(num_layers * (1.0 - fraction)), num_layers - 1)


def select(model: nn.Module, pattern: str | re.Pattern) -> list[str]:
    """Names of the `nn.Linear` submodules whose full dotted name matches `pattern` entirely.

    `re.fullmatch` is used, so `r"layers\\.[23]\\.mlp\\.(gate|up|down)_proj"` selects exactly
    those projections and `"mlp"` alone selects nothing. Matching modules that are not
    linear (containers) are skipped; if no linear matches, a `ValueError` says so.
    """
    if isinstance(pattern, str):
        try:
            regex = re.compile(pattern)
        except re.error as err:
            raise ValueError(f"pattern {pattern!r} is not a valid regex: {err}") from None
    elif isinstance(pattern, re.Pattern):
        regex = pattern
    else:
        raise TypeError(f"pattern must be a str or re.Pattern, got {type(pattern).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")

    names = [
        name
        for name, module in model.named_modules()
        if name and isinstance(module, nn.Linear) and regex.fullmatch(name)
    ]
    if not names:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(
            f"pattern {regex.pattern!r} fully matches no nn.Linear submodule; "
            f"linear modules are e.g. {linears[:5]}"
        )
    return names


def _check_module_names(modules: Sequence[str]) -> list[str]:
    if isinstance(modules, str):
        raise TypeError(f"modules must be a sequence of names, got the string {modules!r}")
    wanted = list(modules)
    if not wanted or not all(isinstance(m, str) and m for m in wanted):
        raise ValueError(f"modules must be a non-empty sequence of names, got {modules!r}")
    return wanted


def _layer_stack(model: nn.Module, path: str) -> nn.ModuleList | nn.Sequential:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    try:
        stack = model.get_submodule(path)
    except AttributeError:
        raise ValueError(
            f"model {type(model).__name__} has no submodule {path!r}; pass layers= the "
            "dotted path of its layer stack (e.g. layers='model.layers')"
        ) from None
    if not isinstance(stack, (nn.ModuleList, nn.Sequential)):
        raise ValueError(
            f"model.{path} must be an nn.ModuleList or nn.Sequential, got {type(stack).__name__}"
        )
    if len(stack) == 0:
        raise ValueError(f"model.{path} is empty: there are no layers to select from")
    return stack
