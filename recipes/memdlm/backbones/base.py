"""The one interface between the recipe and a model: `Backbone`.

Everything above the model (the method, the training loop, evaluation, the API, the commands)
asks these questions through `backbones.adapter(model)` and never inspects a model's class:
each model family answers them in its own adapter module (`reference.py` for
`diffusion.Transformer`, `hf/` for Hugging Face models and the LLaDA family, `generic.py` for
any module mapping tokens to logits).

The forward conventions every adapter presents upward, whatever the model does inside:
logits (B, L, V) where position i predicts token i (a shifted model, e.g. Dream, is realigned
by its adapter), bidirectional attention, and a 2-D 0/1 key-padding `attention_mask` or None.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

import memory as mm
from recipes.memdlm.errors import UserError


@runtime_checkable
class Backbone(Protocol):
    """What the recipe asks of a model (see the module docstring for the conventions)."""

    module: nn.Module  # the trained module: parameters, state_dict, fast-weight hooks

    def fast_weight_targets(self, fraction: float, modules: Sequence[str]) -> tuple[str, ...]:
        """Names (relative to `module`) of the linear layers that carry fast weights: the
        `modules` projections of the last `fraction` of the layer stack (`memory.last_layers`'
        rule)."""
        ...

    def num_layers(self) -> int:
        """Length of the layer stack that `hidden_states(upto=k)` / `logits_from(start=k)` index."""
        ...

    def head_weight(self, loss_backend: str | None) -> torch.Tensor | None:
        """The output head's (V, D) weight when the fused loss (`dd.masked_diffusion_loss_from_
        hidden`) applies to `features_from`, else None (the logits path)."""
        ...

    def can_split_mid_layer(self, layer: int, targets: Sequence[str]) -> bool:
        """True when layer `layer`'s attention does not depend on fast weights on `targets`, so
        the split forward may start between its attention and its FFN (`method.split`)."""
        ...

    def position_wise_after(self, start: int, mid_layer: bool) -> bool:
        """True when `features_from(h, start=start, mid_layer=mid_layer)` acts on each position
        alone (no attention left, nothing that mixes rows), so that it may run on just the rows
        a loss scores: (N, 1, D), or (B, M, D) packed by sample (`method.losses.tail_on_rows`)."""
        ...

    def split_methods(self) -> tuple[str, ...]:
        """The module's own split-forward methods (FSDP2 must gather weights when they run)."""
        ...

    def layers(self) -> Sequence[nn.Module]:
        """The layer stack (FSDP2 shards each layer as one unit); empty when there is none."""
        ...

    def hidden_states(self, x, attention_mask=None, *, upto: int, mid_layer: bool = False):
        """The input of layer `upto` (B, L, D) of tokens x (B, L) (with `mid_layer`, after that
        layer's attention); a module without a split forward returns the tokens themselves."""
        ...

    def logits_from(self, h, attention_mask=None, *, start: int, mid_layer: bool = False):
        """Logits (B, L, V) from `hidden_states(..., upto=start)` (a full forward of the tokens
        for a module without a split forward)."""
        ...

    def features_from(self, h, *, start: int, mid_layer: bool = False):
        """The head's input (B, L, D) from `hidden_states(..., upto=start)`, for the fused loss
        (`head_weight` not None)."""
        ...

    def shares_ffn(self, start: int, mid_layer: bool = False) -> bool:
        """True when, after this position-wise split (`position_wise_after`), forwards of the
        same rows under different fast-weight states (or none) can share the start of the last
        FFN (`ffn_entry`): asked once, where the method is built."""
        ...

    def ffn_entry(self, h, *, start: int, mid_layer: bool = False):
        """The shared start of the last FFN on rows h (N, 1, D), where `shares_ffn`: its entry
        norm and input-side base products, computed once (an `hf.tail.FFNEntry`)."""
        ...

    def features_from_entry(self, entry, *, start: int, mid_layer: bool = False):
        """`features_from` of an `ffn_entry`'s rows (N, 1, D) under the bindings open now."""
        ...

    def output_head(self) -> nn.Module | None:
        """The output head module when the fused loss reads its weight directly, else None."""
        ...

    def max_positions(self) -> int | None:
        """The longest input the module's position encoding allows, when it says (else None)."""
        ...

    def uses_every_parameter(self) -> bool:
        """False when a step may leave weights unused (unrouted MoE experts): DDP must look."""
        ...

    def sampling_attention(self, attention: str, block_size: int) -> AbstractContextManager:
        """A context in which forwards attend as `attention` ("bidirectional", or "block_causal":
        bidirectional inside blocks of `block_size`, causal across), for sampling."""
        ...

    def describe(self, fraction: float, modules: Sequence[str]) -> dict[str, Any]:
        """Family, forward path and fast-weight placement, for the start-up line and the run's
        `config.json` / `summary.json` (`describe_line` formats it)."""
        ...


class SplitForwardOf:
    """The split-forward part of `Backbone` for a module that has it (`hidden_states`,
    `logits_from`, `features_from`, a `layers` stack): every call goes to the module's own
    method, so FSDP2's registered forward methods (`loop.sharding`) gather its weights."""

    module: nn.Module

    def layers(self) -> Sequence[nn.Module]:
        return self.module.layers

    def hidden_states(self, x, attention_mask=None, *, upto: int, mid_layer: bool = False):
        extra = {"mid_layer": True} if mid_layer else {}
        if attention_mask is not None:
            extra["attention_mask"] = attention_mask
        return self.module.hidden_states(x, upto=upto, **extra)

    def logits_from(self, h, attention_mask=None, *, start: int, mid_layer: bool = False):
        extra = {"mid_layer": True} if mid_layer else {}
        if attention_mask is not None:
            extra["attention_mask"] = attention_mask
        return self.module.logits_from(h, start=start, **extra)

    def features_from(self, h, *, start: int, mid_layer: bool = False):
        extra = {"mid_layer": True} if mid_layer else {}
        return self.module.features_from(h, start=start, **extra)

    def shares_ffn(self, start: int, mid_layer: bool = False) -> bool:
        return False  # an adapter that can share the FFN's start says so

    def ffn_entry(self, h, *, start: int, mid_layer: bool = False):
        raise TypeError(f"{type(self).__name__} offers no shared FFN entry")

    def features_from_entry(self, entry, *, start: int, mid_layer: bool = False):
        raise TypeError(f"{type(self).__name__} offers no shared FFN entry")


def describe_line(info: dict[str, Any]) -> str:
    """One line from `Backbone.describe`: family, forward path, fast-weight modules and where."""
    if "line" in info:  # the family's own wording (hf.HFBackbone)
        return info["line"]
    targets = info.get("fast_weight_modules", 0)
    where = info.get("fast_weight_layers", [])
    return (
        f"backbone {info.get('family', '?')}: {info.get('forward', '?')}; "
        f"{targets} fast-weight modules in layers {where}"
    )


def bidirectional_only(family: str, attention: str) -> AbstractContextManager:
    """`sampling_attention` of a family that always attends bidirectionally."""
    if attention != "bidirectional":
        raise UserError(f"attention {attention!r} is not available for the {family} backbone")
    return nullcontext()


def layer_of(name: str, prefix: str) -> int | None:
    """The layer index in a module name under `prefix` ("layers.3.mlp.up_proj" -> 3)."""
    if not name.startswith(prefix):
        return None
    head = name[len(prefix) :].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def last_layer_targets(module: nn.Module, fraction: float, modules: Sequence[str]) -> tuple:
    """`memory.last_layers` of the configured `memdlm.layer_fraction` and `memdlm.targets`; a
    name that matches nothing is the user's mistake (UserError), not a bug."""
    try:
        return tuple(mm.last_layers(module, fraction=fraction, modules=tuple(modules)))
    except ValueError as error:
        raise UserError(f"memdlm.targets / memdlm.layer_fraction: {error}") from None
