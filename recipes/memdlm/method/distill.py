"""The inner distillation objectives of the reference code (`memdlm.inner_loss` != "ce").

Each inner step compares the network with phi bound on its input (the student) with the same
network, same phi, without gradient, on the state the step looks ahead to (the teacher;
`trajectory.teacher_masks`): logits (distill, distill_reverse), final features or the first
layers' features (distill_hidden).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_divergence(student, teacher, kind: str, temperature: float = 1.0, hidden_type="mse"):
    """Per-token inner distillation loss (B, L), at least float32 (the reference code's definitions,
    `memdlm/memory.py` `_compute_*distill_loss`):

    distill:          KL(p_T || p_S) = sum_v p_T (log p_T - log p_S), p = softmax(z / tau)
    distill_reverse:  KL(p_S || p_T) = sum_v p_S (log p_S - log p_T)
    distill_hidden:   mse: mean_d (h_S - h_T)^2;  cosine: 1 - <h_S, h_T> / (|h_S| |h_T|)
    """
    dtype = torch.promote_types(student.dtype, torch.float32)  # at least float32
    student, teacher = student.to(dtype), teacher.to(dtype)
    if kind == "distill_hidden":
        if hidden_type == "cosine":
            return 1.0 - (F.normalize(student, dim=-1) * F.normalize(teacher, dim=-1)).sum(-1)
        diff = student - teacher  # by hand: no F.mse_loss (DESIGN, environment facts)
        return (diff * diff).mean(-1)
    log_s = torch.log_softmax(student / temperature, dim=-1)
    log_t = torch.log_softmax(teacher / temperature, dim=-1)
    if kind == "distill":
        return (log_t.exp() * (log_t - log_s)).sum(-1)
    if kind == "distill_reverse":
        return (log_s.exp() * (log_s - log_t)).sum(-1)
    raise ValueError(f"inner loss {kind!r}: expected distill, distill_reverse or distill_hidden")


def _outputs(p, hidden, tokens):
    """What the distillation compares: logits, final features, or the early layers' features."""
    if p.inner_loss != "distill_hidden":
        return p.split.logits(hidden)
    if p.early_layers is None:
        return p.split.features(hidden)
    module = p.split.backbone.module  # the reference Transformer (`objective_options` checks)
    return module.norm(module.hidden_states(tokens, upto=p.early_layers))


def distill_loss(p, phi, state, weight) -> torch.Tensor:
    """The inner loss of `state` for the distillation objective of `p` (an `InnerProblem`):
    sum over loss-masked tokens of weight_b * divergence, per row (per_sample) or divided by
    the masked count."""
    with p.mem.bind(phi, at_init=state.at_init):
        with torch.no_grad():
            teacher = _outputs(p, state.teacher_hidden, state.teacher_tokens)
        student = _outputs(p, state.hidden, state.tokens)
    per_token = token_divergence(
        student, teacher.detach(), p.inner_loss, p.temperature, p.hidden_type
    )
    mask = state.loss_mask.to(per_token.dtype)
    total = (per_token * mask * weight.to(per_token.dtype)[:, None]).sum()
    return total if p.per_sample else total / mask.sum().clamp(min=1)
