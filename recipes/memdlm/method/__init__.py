"""The MemDLM method (arXiv 2603.22241), one concept per module:

- `losses`: the anchor x_t and the standard masked-diffusion loss (the outer objective).
- `split`: where the fast-weight-dependent part of the network begins (the split forward).
- `trajectory`: the nested inner-step masks of the simulated denoising trajectory.
- `inner`: the inner loop on phi through `bilevel.solve`, and its prompt-only form.
- `step`: one MemDLM training step, top to bottom.
"""

from recipes.memdlm.method.inner import (
    Adaptation,
    InnerProblem,
    InnerState,
    adapt,
    adapt_on_trajectory,
    adapt_to_prompt,
    init_fast_weights,
    inner_optimizer,
    inner_states,
    make_fast_weights,
    make_inner_loss,
    solve_inner,
)
from recipes.memdlm.method.losses import (
    SCHEDULE,
    Anchor,
    StepOutput,
    fused_head,
    head_loss,
    outer_loss,
    sample_anchor,
    standard_loss,
    standard_step,
)
from recipes.memdlm.method.split import Split, first_fast_layer, split_point
from recipes.memdlm.method.step import compile_steps, memdlm_core, memdlm_step
from recipes.memdlm.method.trajectory import loss_masks, realised_ratio, trajectory_masks

__all__ = [
    "SCHEDULE",
    "Adaptation",
    "Anchor",
    "InnerProblem",
    "InnerState",
    "Split",
    "StepOutput",
    "adapt",
    "adapt_on_trajectory",
    "adapt_to_prompt",
    "compile_steps",
    "first_fast_layer",
    "fused_head",
    "head_loss",
    "init_fast_weights",
    "loss_masks",
    "inner_optimizer",
    "inner_states",
    "make_fast_weights",
    "make_inner_loss",
    "memdlm_core",
    "memdlm_step",
    "outer_loss",
    "realised_ratio",
    "sample_anchor",
    "solve_inner",
    "split_point",
    "standard_loss",
    "standard_step",
    "trajectory_masks",
]
