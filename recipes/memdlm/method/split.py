"""Where the fast-weight-dependent part of the network begins (the split forward).

Layers before the first fast-weight layer do not depend on phi, so they run once per state
without gradient; with fast weights only on that layer's FFN, its attention is shared too.
A `Split` holds the run's `Backbone` (resolved once, where the model is built) and asks it
for every forward piece.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

import memory as mm
from recipes.memdlm.backbones import Backbone
from recipes.memdlm.config import MemDLMConfig


def first_fast_layer(backbone: Backbone, cfg: MemDLMConfig) -> int:
    """Index of the first layer holding fast weights (the reference code's rule)."""
    return mm.first_of_last_layers(backbone.num_layers(), cfg.layer_fraction)


@dataclass(frozen=True)
class Split:
    """Where the part of the network that depends on the fast weights begins.

    Before `layers[layer]` of `backbone`, or, with `mid`, between that layer's attention and its
    feed-forward: when the fast weights of the first fast layer sit only in its FFN (the default
    targets), the layer's attention does not depend on them and is computed once per input.
    """

    backbone: Backbone
    layer: int
    mid: bool = False

    def early(self, x: torch.Tensor) -> torch.Tensor:
        """Everything before the split: (B, L) tokens -> (B, L, D)."""
        return self.backbone.hidden_states(x, upto=self.layer, mid_layer=self.mid)

    def features(self, hidden: torch.Tensor) -> torch.Tensor:
        """The head's input (B, L, D) from `early`'s output."""
        return self.backbone.features_from(hidden, start=self.layer, mid_layer=self.mid)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (B, L, V) from `early`'s output."""
        return self.backbone.logits_from(hidden, start=self.layer, mid_layer=self.mid)

    def position_wise(self) -> bool:
        """True when everything after the split acts on each position alone (the last layer's
        FFN and the final norm): a loss then needs it only at the positions it scores."""
        return self.backbone.position_wise_after(self.layer, self.mid)

    def row_features(self, rows: torch.Tensor) -> torch.Tensor:
        """`features` of (N, D) rows of hidden states taken from anywhere in the batch, for a
        `position_wise` split: (N, D) -> (N, D)."""
        return self.features(rows[:, None])[:, 0]

    def shares_ffn(self) -> bool:
        """Whether forwards of the same rows under different fast-weight states can share the
        start of the network after this split (`Backbone.shares_ffn`, `ffn_entry`)."""
        return self.backbone.shares_ffn(self.layer, self.mid)

    def ffn_entry(self, rows: torch.Tensor):
        """The shared start of the network after a `shares_ffn` split on (N, D) rows
        (`Backbone.ffn_entry`)."""
        return self.backbone.ffn_entry(rows[:, None], start=self.layer, mid_layer=self.mid)

    def entry_features(self, entry) -> torch.Tensor:
        """`row_features` of an `ffn_entry`'s rows under the bindings open now: (N, D)."""
        backbone = self.backbone
        return backbone.features_from_entry(entry, start=self.layer, mid_layer=self.mid)[:, 0]


def last_split(backbone: Backbone) -> Split:
    """The latest split a model allows with no fast weights: half-way through its last layer
    when the backbone can split there (the reference Transformer), else before the first."""
    last = backbone.num_layers() - 1
    if last >= 0 and backbone.can_split_mid_layer(last, ()):
        return Split(backbone, last, mid=True)
    return Split(backbone, 0)


def split_point(backbone: Backbone, targets: Sequence[str], cfg: MemDLMConfig) -> Split:
    """The split for fast weights on `targets`: mid-layer when the backbone allows it for the
    first fast layer (the reference Transformer, when every target there is one of its FFN
    projections)."""
    layer = first_fast_layer(backbone, cfg)
    return Split(backbone, layer, backbone.can_split_mid_layer(layer, targets))
