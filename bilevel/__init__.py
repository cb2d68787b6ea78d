"""bilevel: differentiable inner-loop optimization for PyTorch.

Optax-style optimizers over ``dict[str, Tensor]`` and one ``solve`` entry point whose
gradient mode (unrolled, truncated, first-order, implicit) is an argument::

    import bilevel as bl
    params_K = bl.solve(inner_loss, params0, meta, optimizer=bl.sgd(0.1), steps=5,
                        mode=bl.Implicit(linsolve=bl.CG(maxiter=50)))
"""

from bilevel._debug import debug_checks, debug_checks_enabled
from bilevel._warn import BilevelWarning
from bilevel.clipping import clip_by_global_norm, clip_per_tensor, normalize_per_tensor
from bilevel.implicit import implicit_fixed_point, implicit_root
from bilevel.linsolve import CG, LinsolveInfo, Neumann, NormalCG
from bilevel.modes import FirstOrder, Implicit, Truncated, Unrolled
from bilevel.optimizers import (
    AdamState,
    RmspropState,
    SgdState,
    adam,
    adamw,
    rmsprop,
    safe_sqrt,
    sgd,
)
from bilevel.solve import NonFiniteReport, PerStep, SolveInfo, solve, solve_with_info
from bilevel.transform import GradientTransformation, apply_updates, chain, scale

__all__ = [
    "CG",
    "AdamState",
    "BilevelWarning",
    "FirstOrder",
    "GradientTransformation",
    "Implicit",
    "LinsolveInfo",
    "Neumann",
    "NonFiniteReport",
    "NormalCG",
    "PerStep",
    "RmspropState",
    "SgdState",
    "SolveInfo",
    "Truncated",
    "Unrolled",
    "adam",
    "adamw",
    "apply_updates",
    "chain",
    "clip_by_global_norm",
    "clip_per_tensor",
    "debug_checks",
    "debug_checks_enabled",
    "implicit_fixed_point",
    "implicit_root",
    "normalize_per_tensor",
    "rmsprop",
    "safe_sqrt",
    "scale",
    "sgd",
    "solve",
    "solve_with_info",
]
