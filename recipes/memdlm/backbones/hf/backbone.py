"""The `Backbone` view of an `HFDenoiser` (backbones/base.py), and per-sample states of one
prompt spread over many rows."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from recipes.memdlm.backbones.base import SplitForwardOf
from recipes.memdlm.backbones.hf import tail
from recipes.memdlm.backbones.hf.denoiser import HFDenoiser
from recipes.memdlm.backbones.reference import unhooked


def broadcast_state(mem, state: dict[str, torch.Tensor], rows: int) -> dict[str, torch.Tensor]:
    """A per-sample fast-weight state of ONE sample (leading dim 1) for `rows` rows of it
    (e.g. the B x mc rows of `diffusion.elbo_log_likelihood` for one adapted prompt): every
    tensor expanded (a view, no copy) to leading dim `rows`, so each row, and each routed
    expert row of it, meets the same fast weights. mem: the `memory.FastWeights` the state
    belongs to (its `state_shapes`). A shared state (no batch dim) needs none."""
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise ValueError(f"rows must be an int >= 1, got {rows!r}")
    out = {}
    shapes = mem.state_shapes
    for key, value in state.items():
        if key not in shapes or tuple(value.shape) != (1, *shapes[key]):
            raise ValueError(
                f"state[{key!r}] has shape {tuple(value.shape)}; broadcast_state takes the "
                f"per-sample state of one sample, (1, *{shapes.get(key)})"
            )
        out[key] = value.expand(rows, *value.shape[1:])
    return out


class HFBackbone(SplitForwardOf):
    """`Backbone` (base.py) view of an `HFDenoiser`: the split forward lives on the denoiser,
    and routed experts may stay unused in a step. Where the denoiser's tail is proven on its
    probe (`hf/tail.py`), the fused loss reads the head's weight, and the split may fall
    between the last layer's attention and its FFN, after which each position is alone (the
    scored-rows tail); otherwise the logits path and splits between layers."""

    def __init__(self, denoiser: HFDenoiser):
        self.module = denoiser

    def fast_weight_targets(self, fraction: float, modules: Sequence[str]) -> tuple[str, ...]:
        return tuple(self.module.fast_weight_targets(fraction, tuple(modules)))

    def num_layers(self) -> int:
        return len(self.module.layers)

    def head_weight(self, loss_backend: str | None) -> torch.Tensor | None:
        # A hook on the head (fast weights there, or FSDP's sharding signal) must see its call.
        head = self.output_head()
        if loss_backend is None or head is None or not unhooked(head):
            return None
        return self.module.head_weight()

    def can_split_mid_layer(self, layer: int, targets: Sequence[str]) -> bool:
        d = self.module
        last = len(d.layers) - 1
        if not (d.split and d.tail_rows and layer == last and unhooked(d.layers[last])):
            return False
        prefix = f"hf.{d.layers_path}.{last}."
        return all(not n.startswith(prefix) or d.tail.is_ffn(n[len(prefix) :]) for n in targets)

    def position_wise_after(self, start: int, mid_layer: bool) -> bool:
        d = self.module
        return mid_layer and d.split and d.tail_rows and start == len(d.layers) - 1

    def shares_ffn(self, start: int, mid_layer: bool = False) -> bool:
        d = self.module
        if not (d.tail_shared and self.position_wise_after(start, mid_layer)):
            return False
        return d.tail.ffn_inputs(d.layers[start]) is not None  # e.g. no adapter wrapped them

    def ffn_entry(self, h, *, start: int, mid_layer: bool = False):
        return tail.shared_entry(self.module, h)

    def features_from_entry(self, entry, *, start: int, mid_layer: bool = False):
        return tail.shared_features(self.module, entry)

    def split_methods(self) -> tuple[str, ...]:
        return ("hidden_states", "logits_from", "features_from")

    def output_head(self) -> torch.nn.Module | None:
        tail = self.module.tail
        return None if tail is None else self.module.hf.get_submodule(tail.head)

    def max_positions(self) -> int | None:
        positions = getattr(self.module.hf.config, "max_position_embeddings", None)
        return positions if isinstance(positions, int) else None

    def uses_every_parameter(self) -> bool:
        return False

    def sampling_attention(self, attention: str, block_size: int):
        return self.module.attention_mode(attention, block_size)

    def describe(self, fraction: float, modules: Sequence[str]) -> dict[str, Any]:
        info = self.module.describe(fraction, tuple(modules))
        info["fast_weight_modules"] = info["fast_weights"]
        info["line"] = self.module.description(fraction, tuple(modules))
        return info
