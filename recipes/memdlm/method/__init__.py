"""The MemDLM method (arXiv 2603.22241), one concept per module:

- `losses`: the anchor x_t and the standard masked-diffusion loss (the outer objective).
- `split`: where the fast-weight-dependent part of the network begins (the split forward).
- `trajectory`: everything random in one step, drawn before any model call (`Draws`): the
  anchor, the nested inner-step masks of the simulated denoising trajectory, phi_0, O.
- `inner`: the inner loop on phi through `bilevel.solve` (`adapt`: the step's inner half).
- `distill`: the inner distillation objectives.
- `step`: the two methods as objects, `Standard` and `MemDLM` (`draw`, `loss`), top to bottom;
  prompt adaptation.
"""

from recipes.memdlm.method.distill import token_divergence
from recipes.memdlm.method.inner import (
    InnerProblem,
    InnerState,
    adapt,
    fast_weight_dtype,
    inner_optimizer,
    inner_states,
    make_fast_weights,
    make_inner_loss,
    objective_options,
    solve_inner,
)
from recipes.memdlm.method.losses import fused_head, head_loss, outer_loss, standard_loss
from recipes.memdlm.method.split import Split, first_fast_layer, last_split, split_point
from recipes.memdlm.method.step import (
    MemDLM,
    Parts,
    Standard,
    adapt_to_prompt,
    memdlm_core,
    outer_losses,
    record_of,
    step_record,
)
from recipes.memdlm.method.trajectory import (
    SCHEDULE,
    Anchor,
    Draws,
    Generators,
    draw_memdlm,
    inner_draws,
    loss_masks,
    outer_positions,
    progressive_ratios,
    realised_ratio,
    sample_anchor,
    state_times,
    teacher_masks,
    trajectory_masks,
    without_outer,
)

__all__ = [
    "SCHEDULE",
    "Anchor",
    "Draws",
    "Generators",
    "InnerProblem",
    "InnerState",
    "MemDLM",
    "Parts",
    "Split",
    "Standard",
    "adapt",
    "adapt_to_prompt",
    "draw_memdlm",
    "fast_weight_dtype",
    "first_fast_layer",
    "fused_head",
    "head_loss",
    "inner_draws",
    "inner_optimizer",
    "inner_states",
    "last_split",
    "loss_masks",
    "make_fast_weights",
    "make_inner_loss",
    "memdlm_core",
    "objective_options",
    "outer_losses",
    "outer_loss",
    "outer_positions",
    "progressive_ratios",
    "realised_ratio",
    "record_of",
    "sample_anchor",
    "solve_inner",
    "split_point",
    "standard_loss",
    "state_times",
    "step_record",
    "teacher_masks",
    "token_divergence",
    "trajectory_masks",
    "without_outer",
]
