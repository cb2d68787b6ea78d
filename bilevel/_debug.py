"""The opt-in switch for per-step structure checks (optax style: validate once, at the boundary).

Factories and ``init`` validate their arguments always. ``update`` of an optimizer, of ``chain``
and of the stateless transforms does not re-check the keys and shapes of the gradient dicts at
every step (a Python walk over every tensor, at every inner step); switch the checks on while
debugging: ``bl.debug_checks(True)``, ``with bl.debug_checks():`` or BILEVEL_DEBUG_CHECKS=1.
"""

from __future__ import annotations

import os

_ENV = "BILEVEL_DEBUG_CHECKS"
_debug = {"on": os.environ.get(_ENV, "").strip() not in ("", "0", "false", "False")}


class debug_checks:  # a switch that reads as a function, like torch's anomaly mode
    """Turn the per-step checks on or off, now; as a context manager, restore the previous
    setting on exit. Off by default (unless BILEVEL_DEBUG_CHECKS=1)."""

    def __init__(self, enabled: bool = True) -> None:
        if not isinstance(enabled, bool):
            raise TypeError(f"debug_checks: enabled must be a bool, got {enabled!r}")
        self.previous = _debug["on"]
        _debug["on"] = enabled

    def __enter__(self) -> debug_checks:
        return self

    def __exit__(self, *exc_info) -> bool:
        _debug["on"] = self.previous
        return False


def debug_checks_enabled() -> bool:
    """Whether ``update`` re-checks its gradient dicts at every call."""
    return _debug["on"]
