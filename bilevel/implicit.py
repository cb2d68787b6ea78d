"""Implicit differentiation of a root: gradients without back-propagating through the solver.

If ``w*`` solves ``F(w*, theta) = 0`` and ``dF/dw`` is invertible there, the implicit function
theorem gives ``dw*/dtheta = -(dF/dw)^-1 dF/dtheta``. For a cotangent ``v = dL/dw*`` the
backward pass therefore solves ``(dF/dw)^T u = v`` with a matrix-free linear solver (the
operator ``u -> (dF/dw)^T u`` is one vector-Jacobian product of ``F``) and returns
``dL/dtheta = -(dF/dtheta)^T u`` (Krantz & Parks 2002; Blondel et al. 2022, "Efficient and
Modular Implicit Differentiation", whose ``custom_root`` this mirrors as a function).

``w*`` may come from any solver, differentiable or not: its own graph is ignored.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from bilevel._tree import Tree, check_matching, check_tree, flatten, unflatten
from bilevel._warn import under_functorch_transform
from bilevel.linsolve import LinsolveInfo, NormalCG

Structure = Tensor | dict[str, Tensor]


def as_tree(value: Any, name: str) -> tuple[Tree, Callable[[Tree], Structure]]:
    """View a Tensor or a ``dict[str, Tensor]`` as a tree, with the inverse conversion."""
    if isinstance(value, Tensor):
        return {"": value}, lambda tree: tree[""]
    check_tree(value, name)
    return dict(value), lambda tree: tree


@dataclass(frozen=True)
class _Problem:
    """Everything the backward pass needs besides the saved tensors.

    ``linearization``, when given, is ``(w, theta, F)``: leaf copies of the solution and meta
    and ``F(w, theta)`` computed from them with a graph (``create_graph``), which an eager
    backward reuses instead of evaluating ``F`` again (``bl.solve`` has it from its
    stationarity check).
    """

    optimality_fn: Callable
    linsolve: Any
    solution_keys: tuple[str, ...]
    meta_keys: tuple[str, ...]
    to_solution: Callable[[Tree], Structure]
    to_meta: Callable[[Tree], Structure]
    on_solve: Callable[[LinsolveInfo], None] | None
    linearization: tuple[Tree, Tree, Tree] | None = None

    def residual(self, solution: Tree, meta: Tree) -> Tree:
        """``F(w, theta)`` as a tree shaped like ``solution``."""
        out = self.optimality_fn(self.to_solution(solution), self.to_meta(meta))
        out, _ = as_tree(out, "optimality_fn output")
        check_matching(out, solution, "optimality_fn output", "solution")
        return out


def _detached(info: LinsolveInfo) -> LinsolveInfo:
    return LinsolveInfo(*(v.detach() if isinstance(v, Tensor) else v for v in info))


def _zeros_for_none(grads, like: list[Tensor]) -> list[Tensor]:
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, like)]


def _meta_cotangent_eager(problem: _Problem, solution: Tree, meta: Tree, cotangent: Tree) -> Tree:
    """:func:`_meta_cotangent` with ``torch.autograd``: ``F`` is evaluated once with a graph, and
    each operator application is one reverse pass through it (no functorch wrapping). For a
    plain ``backward()`` outside any ``torch.func`` transform; same numbers as the other path."""
    if problem.linearization is not None:
        w, m, residual = problem.linearization
    else:
        with torch.enable_grad():
            w = {k: v.detach().requires_grad_() for k, v in solution.items()}
            m = {k: v.detach().requires_grad_() for k, v in meta.items()}
            residual = problem.residual(w, m)
    with torch.enable_grad():  # one flat output: a cotangent needs no splitting per product
        flat_residual = flatten({k: residual[k] for k in solution})
    w_list, m_list = list(w.values()), list(m.values())

    def pullback(u: Tensor, inputs: list[Tensor]) -> list[Tensor]:
        # retain_graph: every application reuses F's graph (and so may a second backward)
        grads = torch.autograd.grad(flat_residual, inputs, u, retain_graph=True, allow_unused=True)
        return _zeros_for_none(grads, inputs)

    def matvec(u: Tensor) -> Tensor:  # u -> (dF/dw)^T u
        return torch.cat([g.reshape(-1) for g in pullback(u, w_list)])

    def rmatvec(x: Tensor) -> Tensor:  # x -> (dF/dw) x, forward mode
        tangent = unflatten(x, solution)
        _, out = torch.func.jvp(lambda q: problem.residual(q, meta), (solution,), (tangent,))
        return flatten(out)

    u, info = problem.linsolve(matvec, flatten(cotangent), rmatvec=rmatvec)
    if problem.on_solve is not None:
        problem.on_solve(_detached(info))
    return dict(zip(m, pullback(-u, m_list)))


def _meta_cotangent(problem: _Problem, solution: Tree, meta: Tree, cotangent: Tree) -> Tree:
    """``-(dF/dtheta)^T u`` with ``(dF/dw)^T u = cotangent``, solved by ``problem.linsolve``."""
    if not torch.is_grad_enabled() and not under_functorch_transform():
        return _meta_cotangent_eager(problem, solution, meta, cotangent)
    _, vjp_solution = torch.func.vjp(lambda w: problem.residual(w, meta), solution)

    def matvec(u: Tensor) -> Tensor:  # u -> (dF/dw)^T u
        return flatten(vjp_solution(unflatten(u, solution))[0])

    def rmatvec(x: Tensor) -> Tensor:  # x -> (dF/dw) x, forward mode
        tangent = unflatten(x, solution)
        _, out = torch.func.jvp(lambda w: problem.residual(w, meta), (solution,), (tangent,))
        return flatten(out)

    u, info = problem.linsolve(matvec, flatten(cotangent), rmatvec=rmatvec)
    if problem.on_solve is not None:  # eagerly Python values, under vmap per-system tensors
        problem.on_solve(_detached(info))
    _, vjp_meta = torch.func.vjp(lambda m: problem.residual(solution, m), meta)
    (meta_grad,) = vjp_meta(unflatten(-u, solution))
    return meta_grad


class _AttachImplicitGradient(torch.autograd.Function):
    """Identity on the solution tensors; the backward sends the IFT gradient to meta."""

    generate_vmap_rule = True

    @staticmethod
    def forward(problem: _Problem, *tensors: Tensor) -> tuple[Tensor, ...]:
        return tuple(t.clone() for t in tensors[: len(problem.solution_keys)])

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        problem, *tensors = inputs
        ctx.problem = problem
        ctx.save_for_backward(*tensors)

    @staticmethod
    def backward(ctx, *grad_outputs: Tensor):
        problem: _Problem = ctx.problem
        saved = ctx.saved_tensors
        n = len(problem.solution_keys)
        solution = dict(zip(problem.solution_keys, saved[:n]))
        meta = dict(zip(problem.meta_keys, saved[n:]))
        cotangent = {
            k: torch.zeros_like(solution[k]) if g is None else g
            for k, g in zip(problem.solution_keys, grad_outputs)
        }
        meta_grad = _meta_cotangent(problem, solution, meta, cotangent)
        return (None, *(None for _ in range(n)), *(meta_grad[k] for k in problem.meta_keys))


def implicit_root(
    optimality_fn: Callable[[Structure, Structure], Structure],
    solution: Structure,
    meta: Structure,
    *,
    linsolve: Any = None,
    symmetric: bool = False,
    on_solve: Callable[[LinsolveInfo], None] | None = None,
) -> Structure:
    """Return ``solution`` (same values) carrying implicit gradients with respect to ``meta``.

    Args:
        optimality_fn: ``F(solution, meta)``, zero at the root, returning the structure and
            shapes of ``solution``. For a minimiser it is the gradient of the inner objective
            (then ``dF/dw`` is the Hessian, symmetric); for a fixed point ``w = T(w, meta)`` it
            is ``T(w, meta) - w`` (non-symmetric, see :func:`implicit_fixed_point`).
        solution: the root ``w*``, a Tensor (0-d allowed) or ``dict[str, Tensor]``; detached.
        meta: the outer variables, a Tensor or ``dict[str, Tensor]``.
        linsolve: a solver from :mod:`bilevel.linsolve`; default ``NormalCG()``. Its
            ``damping`` mu gives ``-(dF/dtheta)^T ((dF/dw)^T + mu*I)^-1 v``.
        symmetric: declare ``dF/dw`` symmetric. :class:`~bilevel.CG` is refused unless it is,
            because CG silently returns wrong answers on non-symmetric systems.
        on_solve: called with the :class:`~bilevel.LinsolveInfo` of each backward solve
            (detached): Python values eagerly, per-system tensors under ``vmap``, where they
            are usable inside the vmapped function (the backward must run there, e.g.
            ``vmap(grad(f, has_aux=True))``).

    Gradients reach ``meta`` only, not tensors that ``optimality_fn`` closes over, and not
    ``solution`` (whatever produced it). The backward is differentiable once.
    """
    if not callable(optimality_fn):
        raise TypeError(f"optimality_fn must be callable, got {type(optimality_fn).__name__}")
    linsolve = NormalCG() if linsolve is None else linsolve
    if not callable(linsolve):
        raise TypeError(f"linsolve must be a solver such as bl.CG(), got {linsolve!r}")
    if getattr(linsolve, "requires_symmetric", False) and not symmetric:
        raise ValueError(
            f"{type(linsolve).__name__} assumes a symmetric positive-definite Jacobian dF/dw, "
            "but symmetric=False; pass symmetric=True if F is the gradient of an objective, "
            "or use bl.NormalCG() / bl.Neumann() for non-symmetric conditions such as fixed points"
        )
    if meta is None:
        raise ValueError("implicit_root needs meta (a Tensor or dict of Tensors) to differentiate")
    return attach_implicit_gradient(optimality_fn, solution, meta, linsolve, on_solve)


def attach_implicit_gradient(
    optimality_fn: Callable,
    solution: Structure,
    meta: Structure,
    linsolve: Any,
    on_solve: Callable[[LinsolveInfo], None] | None,
    linearization: tuple[Tree, Tree, Tree] | None = None,
) -> Structure:
    """:func:`implicit_root` after its checks, with an optional precomputed linearization
    (see :class:`_Problem`); for :func:`bilevel.solve`."""
    solution_tree, to_solution = as_tree(solution, "solution")
    meta_tree, to_meta = as_tree(meta, "meta")
    problem = _Problem(
        optimality_fn,
        linsolve,
        tuple(solution_tree),
        tuple(meta_tree),
        to_solution,
        to_meta,
        on_solve,
        linearization,
    )
    tensors = [t.detach() for t in solution_tree.values()] + list(meta_tree.values())
    outputs = _AttachImplicitGradient.apply(problem, *tensors)
    return to_solution(dict(zip(problem.solution_keys, outputs)))


def implicit_fixed_point(
    map_fn: Callable[[Structure, Structure], Structure],
    solution: Structure,
    meta: Structure,
    *,
    linsolve: Any = None,
    on_solve: Callable[[LinsolveInfo], None] | None = None,
) -> Structure:
    """:func:`implicit_root` for a fixed point ``w* = T(w*, meta)``: ``F = w - T(w, meta)``.

    The Jacobian ``dF/dw = I - J`` (``J = dT/dw``) is not symmetric, so the default solver is
    ``NormalCG()``; ``Neumann(alpha=1)`` is then the classic adjoint iteration
    ``u <- J^T u + v``, which converges when ``T`` is a contraction. The gradient
    ``dw*/dmeta = (I - J)^-1 dT/dmeta`` is the same for either sign of ``F``.
    """
    if not callable(map_fn):
        raise TypeError(f"map_fn must be callable, got {type(map_fn).__name__}")

    def optimality_fn(w: Structure, m: Structure) -> Structure:
        mapped = map_fn(w, m)
        if isinstance(w, Tensor) or not isinstance(mapped, dict):
            return w - mapped
        return {k: w[k] - v if k in w else v for k, v in mapped.items()}

    return implicit_root(optimality_fn, solution, meta, linsolve=linsolve, on_solve=on_solve)
