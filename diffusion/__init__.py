"""diffusion: masked (absorbing-state) diffusion language modelling.

Schedules and time sampling, forward corruption, the NELBO objective, likelihood estimates,
iterative-unmasking samplers and a small reference bidirectional transformer. Formulas and usage:
docs/diffusion.md. Fused kernels (Triton, optional) and their dispatch: `diffusion.kernels`,
docs/kernels.md.
"""

from . import kernels
from ._checks import debug_checks, debug_checks_enabled
from .block_sampling import block_aligned_steps, even_transfer_schedule, generate_block_aligned
from .cache import CACHE_MODES, CachedDenoiser, supports_cache
from .corruption import corrupt, nested_mask
from .likelihood import choose, elbo_log_likelihood
from .loss import masked_diffusion_loss, masked_diffusion_loss_from_hidden
from .sampling import GenerationStats, StepInfo, generate, transfer_schedule
from .schedules import CosineSchedule, LinearSchedule, LogLinearSchedule, Schedule, sample_t
from .transformer import Transformer

__all__ = [
    "CACHE_MODES",
    "CachedDenoiser",
    "CosineSchedule",
    "GenerationStats",
    "LinearSchedule",
    "LogLinearSchedule",
    "Schedule",
    "StepInfo",
    "Transformer",
    "block_aligned_steps",
    "choose",
    "corrupt",
    "debug_checks",
    "debug_checks_enabled",
    "elbo_log_likelihood",
    "even_transfer_schedule",
    "generate",
    "generate_block_aligned",
    "kernels",
    "masked_diffusion_loss",
    "masked_diffusion_loss_from_hidden",
    "nested_mask",
    "sample_t",
    "supports_cache",
    "transfer_schedule",
]
