"""Where the fast-weight-dependent part of the network begins (the split forward).

Layers before the first fast-weight layer do not depend on phi, so they run once per state
without gradient; with fast weights only on that layer's FFN, its attention is shared too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from recipes.memdlm.backbones import adapter
from recipes.memdlm.config import MemDLMConfig


def first_fast_layer(model, cfg: MemDLMConfig) -> int:
    """Index of the first layer holding fast weights (the reference code's rule)."""
    return int(adapter(model).num_layers() * (1 - cfg.layer_fraction))


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
        return adapter(model).hidden_states(x, upto=self.layer, mid_layer=self.mid)

    def features(self, model, hidden: torch.Tensor) -> torch.Tensor:
        return adapter(model).features_from(hidden, start=self.layer, mid_layer=self.mid)

    def logits(self, model, hidden: torch.Tensor) -> torch.Tensor:
        return adapter(model).logits_from(hidden, start=self.layer, mid_layer=self.mid)


def split_point(model, mem, cfg: MemDLMConfig) -> Split:
    """The split for `mem`'s targets: mid-layer when the backbone allows it for the first fast
    layer (the reference Transformer, when every target there is one of its FFN projections)."""
    layer = first_fast_layer(model, cfg)
    return Split(layer, adapter(model).can_split_mid_layer(layer, mem.targets))
