"""Driving a model's own forward with hooks: stop it where the wanted tensor is (`StopForward`),
and the failures that say the hooks cannot drive it (`SPLIT_FAILURES`)."""

from __future__ import annotations

import torch
from torch import nn


class StopForward(Exception):
    """Raised by a hook to end a forward pass once the wanted hidden states are captured."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden


class SplitUnsupported(RuntimeError):
    """The hooks cannot drive this model: layer `index` of the stack is never called through
    its `__call__`, or is called without its hidden states as first argument or keyword."""


# What the split check may meet on a model the hooks cannot drive; the full forward is then
# used, and `split_note` (printed in the backbone line, kept in summary.json) says why. An
# IndexError comes from a model that indexes its layer stack by absolute position, which
# `logits_from`'s shortened stack breaks. Any other exception is a bug and propagates.
SPLIT_FAILURES = (SplitUnsupported, IndexError)


def stop_at(module: nn.Module, run, *, before: bool = False) -> torch.Tensor:
    """`module`'s input (`before`) or output in the forward `run()`, which stops there."""

    def stop(m, args, out=None):
        value = args[0] if before and args else out
        if not isinstance(value, torch.Tensor):
            where = "input" if before else "output"
            raise SplitUnsupported(f"{type(m).__name__} has no tensor {where}")
        raise StopForward(value)

    if before:
        handle = module.register_forward_pre_hook(stop, prepend=True)
    else:
        handle = module.register_forward_hook(stop, prepend=True)
    try:
        run()
    except StopForward as stopped:
        return stopped.hidden
    finally:
        handle.remove()
    raise SplitUnsupported(f"{type(module).__name__} was never called")
