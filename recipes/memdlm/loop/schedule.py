"""The learning-rate schedule of every training phase."""

from __future__ import annotations

import math
from collections.abc import Callable


def cosine_with_warmup(total: int, warmup_ratio: float, min_ratio: float) -> Callable[[int], float]:
    """Multiplier of the base lr at optimizer step s (0-based): linear warm-up, cosine decay."""
    warmup = max(1, round(total * warmup_ratio)) if warmup_ratio > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
