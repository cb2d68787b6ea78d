"""bilevel: differentiable inner-loop optimization for PyTorch.

Optax-style optimizers over ``dict[str, Tensor]`` and one ``solve`` entry point whose
gradient mode (unrolled, truncated, first-order, implicit) is an argument.
"""
