"""The adapter of the reference `diffusion.Transformer` (`Backbone`, base.py).

The model already has the split forward (`hidden_states` / `logits_from` / `features_from`, with
a mid-layer entry point), a bias-free `lm_head` for the fused loss and one `layers` stack.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

import diffusion as dd
import memory as mm
from recipes.memdlm.backbones.base import (
    SplitForwardOf,
    bidirectional_only,
    last_layer_targets,
    layer_of,
)


def unhooked(module: torch.nn.Module) -> bool:
    """True when `module` may be entered through its sub-blocks: FSDP2 gathers a sharded layer's
    parameters in its forward hooks, which running its sub-blocks directly would bypass."""
    from torch.distributed.fsdp import FSDPModule

    return not (
        isinstance(module, FSDPModule) or module._forward_pre_hooks or module._forward_hooks
    )


class ReferenceBackbone(SplitForwardOf):
    """`Backbone` view of a `dd.Transformer` (the model itself stays the trained module)."""

    def __init__(self, model: dd.Transformer):
        self.module = model

    def fast_weight_targets(self, fraction: float, modules: Sequence[str]) -> tuple[str, ...]:
        return last_layer_targets(self.module, fraction, modules)

    def num_layers(self) -> int:
        return len(self.module.layers)

    def head_weight(self, loss_backend: str | None) -> torch.Tensor | None:
        # A hook on the head (fast weights there, or FSDP's sharding signal) must see its call.
        head = self.module.lm_head
        if loss_backend is None or head.bias is not None or not unhooked(head):
            return None
        return head.weight

    def can_split_mid_layer(self, layer: int, targets: Sequence[str]) -> bool:
        if layer >= len(self.module.layers) or not unhooked(self.module.layers[layer]):
            return False
        prefix = f"layers.{layer}."
        return all(not n.startswith(prefix) or n.startswith(prefix + "mlp.") for n in targets)

    def position_wise_after(self, start: int, mid_layer: bool) -> bool:
        # The last layer's feed-forward sub-block and the final RMSNorm: both act per position.
        return mid_layer and start == len(self.module.layers) - 1

    def split_methods(self) -> tuple[str, ...]:
        return ("hidden_states", "logits_from", "features_from")

    def output_head(self) -> torch.nn.Module:
        return self.module.lm_head

    def max_positions(self) -> int | None:
        return self.module.max_seq_len  # the rotary tables' length: the run's model.max_seq_len

    def uses_every_parameter(self) -> bool:
        return True

    def sampling_attention(self, attention: str, block_size: int):
        del block_size
        return bidirectional_only("reference", attention)

    def describe(self, fraction: float, modules: Sequence[str]) -> dict[str, Any]:
        targets = self.fast_weight_targets(fraction, modules)
        first = mm.first_of_last_layers(self.num_layers(), fraction)
        return {
            "family": "reference (diffusion.Transformer)",
            "forward": f"split at layer {first}",
            "fast_weight_modules": len(targets),
            "fast_weight_layers": sorted({layer_of(n, "layers.") for n in targets} - {None}),
        }
