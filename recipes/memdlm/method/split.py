"""Where the fast-weight-dependent part of the network begins (the split forward).

Layers before the first fast-weight layer do not depend on phi, so they run once per state
without gradient; with fast weights only on that layer's FFN, its attention is shared too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import memory as mm
from recipes.memdlm.backbones import adapter
from recipes.memdlm.config import MemDLMConfig


def first_fast_layer(model, cfg: MemDLMConfig) -> int:
    """Index of the first layer holding fast weights (the reference code's rule)."""
    return mm.first_of_last_layers(adapter(model).num_layers(), cfg.layer_fraction)


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

    def position_wise(self, model) -> bool:
        """True when everything after the split acts on each position alone (the last layer's
        FFN and the final norm): a loss then needs it only at the positions it scores."""
        return adapter(model).position_wise_after(self.layer, self.mid)

    def row_features(self, model, rows: torch.Tensor) -> torch.Tensor:
        """`features` of (N, D) rows of hidden states taken from anywhere in the batch, for a
        `position_wise` split: (N, D) -> (N, D)."""
        return self.features(model, rows[:, None])[:, 0]


def last_split(model) -> Split:
    """The latest split a model allows with no fast weights: half-way through its last layer
    when the backbone can split there (the reference Transformer), else before the first."""
    last = adapter(model).num_layers() - 1
    if last >= 0 and adapter(model).can_split_mid_layer(last, ()):
        return Split(last, mid=True)
    return Split(0)


def split_point(model, mem, cfg: MemDLMConfig) -> Split:
    """The split for `mem`'s targets: mid-layer when the backbone allows it for the first fast
    layer (the reference Transformer, when every target there is one of its FFN projections)."""
    layer = first_fast_layer(model, cfg)
    return Split(layer, adapter(model).can_split_mid_layer(layer, mem.targets))
