"""Where the fast-weight-dependent part of the network begins (the split forward).

Layers before the first fast-weight layer do not depend on phi, so they run once per state
without gradient; with fast weights only on that layer's FFN, its attention is shared too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import diffusion as dd
from recipes.memdlm.config import MemDLMConfig


def first_fast_layer(model, cfg: MemDLMConfig) -> int:
    """Index of the first layer holding fast weights (the reference code's rule)."""
    return int(len(model.layers) * (1 - cfg.layer_fraction))


@dataclass(frozen=True)
class Split:
    """Where the part of the network that depends on the fast weights begins.

    Before `layers[layer]`, or, with `mid`, between that layer's attention and its feed-forward:
    when the fast weights of the first fast layer sit only in its FFN (the default targets), the
    layer's attention does not depend on them and is computed once per input.
    """

    layer: int
    mid: bool = False

    def early(self, model, x: torch.Tensor) -> torch.Tensor:
        """Everything before the split: (B, L) tokens -> (B, L, D)."""
        return model.hidden_states(x, upto=self.layer, **self._kwargs())

    def features(self, model, hidden: torch.Tensor) -> torch.Tensor:
        return model.features_from(hidden, start=self.layer, **self._kwargs())

    def logits(self, model, hidden: torch.Tensor) -> torch.Tensor:
        return model.logits_from(hidden, start=self.layer, **self._kwargs())

    def _kwargs(self) -> dict[str, bool]:
        return {"mid_layer": True} if self.mid else {}


def split_point(model, mem, cfg: MemDLMConfig) -> Split:
    """The split for `mem`'s targets: mid-layer for the reference Transformer when every target
    of the first fast layer is one of its FFN projections (`layers.k.mlp.*`)."""
    layer = first_fast_layer(model, cfg)
    prefix = f"layers.{layer}."
    ffn_only = all(
        not name.startswith(prefix) or name.startswith(prefix + "mlp.") for name in mem.targets
    )
    mid = (
        isinstance(model, dd.Transformer)
        and layer < len(model.layers)
        and ffn_only
        and not _wrapped(model.layers[layer])
    )
    return Split(layer, mid)


def _wrapped(module: torch.nn.Module) -> bool:
    """True when the layer must be entered through its own call: FSDP2 gathers a sharded layer's
    parameters in its forward hooks, which running its sub-blocks directly would bypass."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule) or bool(
        module._forward_pre_hooks or module._forward_hooks
    )
