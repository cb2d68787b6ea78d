"""The adapter of any module mapping tokens (B, L) to logits (B, L, V) (`Backbone`, base.py).

Such a model has no split forward: `FullForward` presents it through the split-forward calls
unsplit (`hidden_states` returns the tokens, `logits_from` runs the whole model), so the inner
loop runs whole forward passes. Fast weights go on the `modules` projections of its `layers`
stack when it has one; otherwise the caller names them (`memory.FastLoRA(model, targets)`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from recipes.memdlm.backbones.base import bidirectional_only, last_layer_targets, layer_of


class FullForward:
    """A tokens -> logits model seen through the recipe's split-forward interface, unsplit."""

    def __init__(self, model: nn.Module):
        if not callable(model):
            raise TypeError(
                f"model must be callable (tokens -> logits), got {type(model).__name__}"
            )
        self.model = model

    @property
    def layers(self):
        return getattr(self.model, "layers", ())

    def parameters(self):
        return self.model.parameters()

    def __call__(self, x, attention_mask=None):
        out = self.model(x) if attention_mask is None else self.model(x, attention_mask)
        return out.logits if hasattr(out, "logits") else out

    def hidden_states(self, x, attention_mask=None, *, upto: int):
        del attention_mask, upto
        return x

    def logits_from(self, h, attention_mask=None, *, start: int):
        del start
        return self(h, attention_mask)


class GenericBackbone:
    """`Backbone` view of a plain tokens -> logits module (or of its `FullForward`)."""

    def __init__(self, model):
        self.module = model.model if isinstance(model, FullForward) else model

    def layer_stack(self) -> nn.Module | None:
        layers = getattr(self.module, "layers", None)
        return layers if isinstance(layers, (nn.ModuleList, nn.Sequential)) else None

    def fast_weight_targets(self, fraction: float, modules: Sequence[str]) -> tuple[str, ...]:
        if self.layer_stack() is None:
            raise TypeError(
                f"{type(self.module).__name__} has no `layers` stack to place fast weights on; "
                "pass fast_weights=mm.FastLoRA(model, targets, ...) (or hf.wrap a Hugging Face "
                "model)"
            )
        return last_layer_targets(self.module, fraction, modules)

    def num_layers(self) -> int:
        # The split index 0 only: a full forward has nothing before the fast weights.
        return len(self.layer_stack()) if self.layer_stack() is not None else 0

    def head_weight(self, loss_backend: str | None) -> torch.Tensor | None:
        del loss_backend
        return None

    def can_split_mid_layer(self, layer: int, targets: Sequence[str]) -> bool:
        del layer, targets
        return False

    def position_wise_after(self, start: int, mid_layer: bool) -> bool:
        del start, mid_layer
        return False

    def split_methods(self) -> tuple[str, ...]:
        return ()

    def layers(self):
        return self.layer_stack() or ()

    def hidden_states(self, x, attention_mask=None, *, upto: int, mid_layer: bool = False):
        return FullForward(self.module).hidden_states(x, attention_mask, upto=upto)

    def logits_from(self, h, attention_mask=None, *, start: int, mid_layer: bool = False):
        return FullForward(self.module).logits_from(h, attention_mask, start=start)

    def features_from(self, h, *, start: int, mid_layer: bool = False):
        raise TypeError(f"{type(self.module).__name__} has no split forward (no fused loss)")

    def shares_ffn(self, start: int, mid_layer: bool = False) -> bool:
        return False

    def ffn_entry(self, h, *, start: int, mid_layer: bool = False):
        raise TypeError("a generic module offers no shared FFN entry")

    def features_from_entry(self, entry, *, start: int, mid_layer: bool = False):
        raise TypeError("a generic module offers no shared FFN entry")

    def output_head(self) -> nn.Module | None:
        return None

    def max_positions(self) -> int | None:
        return None

    def uses_every_parameter(self) -> bool:
        return False

    def sampling_attention(self, attention: str, block_size: int):
        del block_size
        return bidirectional_only("generic", attention)

    def describe(self, fraction: float, modules: Sequence[str]) -> dict[str, Any]:
        targets = self.fast_weight_targets(fraction, modules) if self.layer_stack() else ()
        return {
            "family": f"generic ({type(self.module).__name__})",
            "forward": "full forward (the model has no split forward)",
            "fast_weight_modules": len(targets),
            "fast_weight_layers": sorted({layer_of(n, "layers.") for n in targets} - {None}),
        }
