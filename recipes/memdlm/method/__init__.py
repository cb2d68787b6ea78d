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
    objective_options,
    solve_inner,
    token_divergence,
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
)
from recipes.memdlm.method.split import Split, first_fast_layer, split_point
from recipes.memdlm.method.step import (
    Draws,
    compile_steps,
    draw,
    memdlm_core,
    memdlm_step,
    standard_step,
    step_loss,
    step_record,
)
from recipes.memdlm.method.trajectory import (
    loss_masks,
    outer_positions,
    progressive_ratios,
    realised_ratio,
    state_times,
    teacher_masks,
    trajectory_masks,
    without_outer,
)

__all__ = [
    "SCHEDULE",
    "Adaptation",
    "Draws",
    "Anchor",
    "InnerProblem",
    "InnerState",
    "Split",
    "StepOutput",
    "adapt",
    "adapt_on_trajectory",
    "adapt_to_prompt",
    "compile_steps",
    "draw",
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
    "objective_options",
    "outer_positions",
    "progressive_ratios",
    "outer_loss",
    "realised_ratio",
    "sample_anchor",
    "solve_inner",
    "split_point",
    "state_times",
    "teacher_masks",
    "token_divergence",
    "standard_loss",
    "standard_step",
    "step_loss",
    "step_record",
    "trajectory_masks",
    "without_outer",
]
