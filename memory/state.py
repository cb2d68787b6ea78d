"""Helpers over a fast-weight state, which is a plain `dict[str, Tensor]`.

Keys are `"<target>.A"` / `"<target>.B"` (LoRA) or `"<target>.delta"` (full). The helpers
never mutate their argument; they return a new dict with the same keys.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def detach(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same tensors cut from the autograd graph (storage is shared, nothing is copied).

    This is the first-order step of MemDLM: the outer loss sees the adapted fast weights as
    constants, so no gradient flows back through the inner updates.
    """
    return {key: tensor.detach() for key, tensor in _check_mapping(state).items()}


def clone(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Independent copies of every tensor (differentiable: gradients flow to the original)."""
    return {key: tensor.clone() for key, tensor in _check_mapping(state).items()}


def _check_mapping(state: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a mapping of str to Tensor, got {type(state).__name__}")
    for key, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"state[{key!r}] must be a Tensor, got {type(tensor).__name__}")
    return state
