"""diffusion: masked (absorbing-state) diffusion language modelling.

Schedules and time sampling, forward corruption, the NELBO objective, likelihood estimates,
iterative-unmasking samplers and a small reference bidirectional transformer. Formulas and usage:
docs/diffusion.md.
"""

from .corruption import corrupt, nested_mask
from .likelihood import choose, elbo_log_likelihood
from .loss import masked_diffusion_loss
from .sampling import GenerationStats, StepInfo, generate, transfer_schedule
from .schedules import CosineSchedule, LinearSchedule, LogLinearSchedule, Schedule, sample_t
from .transformer import Transformer

__all__ = [
    "CosineSchedule",
    "GenerationStats",
    "LinearSchedule",
    "LogLinearSchedule",
    "Schedule",
    "StepInfo",
    "Transformer",
    "choose",
    "corrupt",
    "elbo_log_likelihood",
    "generate",
    "masked_diffusion_loss",
    "nested_mask",
    "sample_t",
    "transfer_schedule",
]
