"""Fused kernels for masked diffusion LMs, each with a pure-PyTorch reference and a dispatcher.

    linear_cross_entropy   sum_i w_i CE(W h_i, y_i) from hidden rows and the output projection,
                           chunked, gradients fused into the forward pass (never the (N, V)
                           logits); `diffusion.masked_diffusion_loss_from_hidden` builds on it.
    propose                one sampler step: Gumbel-max proposal and confidence per candidate
                           row in one sweep over the vocabulary; `diffusion.generate` uses it.

`backend="auto" | "reference" | "triton"` picks the implementation, and the environment variable
DIFFUSION_KERNELS steers "auto" (`dispatch`). Triton is optional: without it every call runs the
reference. Formulas, dispatch rules and measurements: docs/kernels.md.
"""

from .dispatch import BACKEND_ENV, BACKENDS, resolve_backend, triton_available
from .linear_ce import default_chunk_rows, linear_cross_entropy, reference_rows
from .sampler import REMASKING, Proposal, propose, propose_reference

__all__ = [
    "BACKENDS",
    "BACKEND_ENV",
    "REMASKING",
    "Proposal",
    "default_chunk_rows",
    "linear_cross_entropy",
    "propose",
    "propose_reference",
    "reference_rows",
    "resolve_backend",
    "triton_available",
]
