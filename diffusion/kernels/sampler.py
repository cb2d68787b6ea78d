"""One sampler step's proposals: a token and its confidence for every candidate position.

For a candidate row with scores z = logits (V,) and the mask token excluded (z_mask = -inf):

    proposal     temperature 0: argmax_v z_v;
                 T > 0: argmax_v (z_v / T + G_v), G_v iid Gumbel(0, 1) in float64 (Gumbel-max:
                 an exact draw from softmax(z / T) that never exponentiates the logits);
    confidence   with p = softmax(z) (untempered):
                 "low_confidence"  p(proposal);
                 "margin"          p_(1) - p_(2), the two largest probabilities;
                 "entropy"         sum_v p_v log p_v (the negative entropy);
                 "random"          U(0, 1), independent of the logits.

`propose` dispatches between the reference (PyTorch on the gathered candidate rows: a float32
copy of them, and float64 Gumbel noise of the same size) and the fused Triton kernel of
`triton_sampler.py` (one sweep over each row's vocabulary in registers, float64 noise from
Philox drawn in the kernel, no copy of any row). Both draw from the same distribution, but from
different random streams, so samples agree in law, not bit for bit; at temperature 0 with
"low_confidence", "margin" or "entropy" both are deterministic and agree to rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .dispatch import resolve_backend
from .proposal import Proposal, confidence_of, random_confidence

__all__ = ["REMASKING", "Proposal", "propose", "propose_reference"]

REMASKING = ("low_confidence", "random", "margin", "entropy")


def propose(
    logits: Tensor,
    candidates: Tensor,
    *,
    mask_id: int,
    temperature: float,
    remasking: str,
    generator: torch.Generator | None = None,
    backend: str = "auto",
) -> Proposal:
    """Proposals and confidences for the candidate positions (module docstring).

    Args:
        logits: (B, Lb, V) logits of a block (a view into the model output is fine).
        candidates: (B, Lb) bool, the positions to propose for.
        mask_id: the mask token, never proposed and left out of the softmax.
        temperature: 0 for argmax, > 0 for Gumbel-max sampling at that temperature.
        remasking: "low_confidence", "margin", "entropy" or "random".
        generator: random source (Gumbel noise and random confidences; the kernel draws a
            Philox seed from it).
        backend: "auto", "reference" or "triton" (`diffusion.kernels.dispatch`).
    """
    if remasking not in REMASKING:
        raise ValueError(f"propose: remasking must be one of {REMASKING}, got {remasking!r}")
    chosen = resolve_backend(backend, logits.device, fn="propose")
    if chosen == "triton":
        from .triton_sampler import propose_triton

        return propose_triton(logits, candidates, mask_id, temperature, remasking, generator)
    return propose_reference(logits, candidates, mask_id, temperature, remasking, generator)


def propose_reference(
    logits: Tensor,
    candidates: Tensor,
    mask_id: int,
    temperature: float,
    remasking: str,
    generator: torch.Generator | None,
) -> Proposal:
    """The PyTorch path: score the gathered candidate rows (module docstring)."""
    # Boolean indexing copies, so writing the mask column leaves the caller's logits untouched.
    scores = logits[candidates].to(torch.promote_types(logits.dtype, torch.float32))  # (N, V)
    scores[:, mask_id] = -torch.inf
    top, picked = scores.max(-1)
    if temperature > 0:
        picked = _gumbel_argmax(scores, temperature, generator)
    picked_score = scores.gather(-1, picked[:, None]).squeeze(-1)
    # Untempered softmax, in place on the copy: probs = exp(scores - top) / total.
    probs = scores.sub_(top[:, None]).exp_()
    total = probs.sum(-1)

    if remasking == "random":
        confidence = random_confidence(scores.shape[0], generator, scores.device)
    else:
        confidence = confidence_of(picked_score, top, probs, total, remasking)
    finite = torch.isfinite(top) & torch.isfinite(confidence)
    return Proposal(picked, confidence.double(), finite)


def _gumbel_argmax(scores: Tensor, temperature: float, generator: torch.Generator | None) -> Tensor:
    """argmax_v(scores_v / T + G_v), G_v = -log(-log U_v) iid Gumbel(0, 1), in float64.

    float64 keeps the noise's tail (arXiv 2409.02908 shows float32 Gumbel noise lowers the
    effective temperature). In place, one allocation.
    """
    noise = torch.rand(scores.shape, generator=generator, device=scores.device, dtype=torch.float64)
    # U in [tiny, 1): -log U in (0, 709], so the Gumbel noise is finite.
    noise.clamp_(min=torch.finfo(torch.float64).tiny).log_().neg_().log_()  # log(-log U) = -G
    return noise.sub_(scores, alpha=1.0 / temperature).argmin(-1)  # argmax(scores / T + G)
