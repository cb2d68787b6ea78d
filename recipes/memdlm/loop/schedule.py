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


def trainer_cosine_with_warmup(
    total: int, warmup_ratio: float, min_ratio: float = 0.0
) -> Callable[[int], float]:
    """Hugging Face Trainer's `lr_scheduler_type="cosine"` with `warmup_ratio` (transformers
    4.57): ceil(total * warmup_ratio) warm-up steps from 0 (step s gets s / warm-up), then
    0.5 (1 + cos(pi progress)), here floored at `min_ratio` (0: the Trainer's)."""
    warmup = math.ceil(total * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    return factor


def lr_factor(phase) -> Callable[[int], float]:
    """The multiplier of `phase` (a PhaseConfig) by its `schedule`: "recipe" or "trainer"."""
    rule = trainer_cosine_with_warmup if phase.schedule == "trainer" else cosine_with_warmup
    return rule(phase.steps, phase.warmup_ratio, phase.min_lr_ratio)
