"""``solve``: run a differentiable inner loop; the differentiation mode is an argument.

Inner gradients are taken with ``torch.autograd.grad`` in plain eager code (measurably cheaper
than ``torch.func.grad`` per step, see ``benchmarks/bench_bilevel_maml.py``) and with
``torch.func.grad_and_value`` inside ``vmap``/``torch.func.grad``/``torch.compile``, where only
the functional transform composes with the enclosing ones.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from bilevel._tree import Tree, check_tree, detach, global_norm, is_empty_tree
from bilevel._warn import is_concrete, under_functorch_transform, warn
from bilevel.implicit import as_tree, attach_implicit_gradient
from bilevel.linsolve import LinsolveInfo
from bilevel.modes import FirstOrder, Implicit, Mode, Truncated, Unrolled
from bilevel.transform import GradientTransformation, apply_updates

InnerLoss = Callable[[Tree, Any, Any], Tensor]
_UNROLLED = Unrolled()


class PerStep:
    """Data that changes at every inner step: step ``i`` receives ``items[i]``.

    ``solve(..., steps=2, data=bl.PerStep([batch_1, batch_2]))`` calls
    ``inner_loss(params, meta, batch_1)`` at the first step and ``batch_2`` at the second.
    Plain ``data`` (anything that is not a ``PerStep``) is passed unchanged to every step.
    ``len(items)`` must equal ``steps``.
    """

    def __init__(self, items: Sequence[Any]):
        if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
            raise TypeError(
                f"PerStep needs a sequence with one entry per step (a list or tuple), got "
                f"{type(items).__name__}"
            )
        self.items = tuple(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, step: int) -> Any:
        return self.items[step]

    def __repr__(self) -> str:
        return f"PerStep(<{len(self.items)} steps>)"


class NonFiniteReport:
    """Deprecated (use :func:`solve_with_info` and ``info.nonfinite``): the old out-parameter
    that turns :func:`solve`'s non-finite-loss error off and records the step instead::

        report = bl.NonFiniteReport()
        params_K = bl.solve(..., nonfinite=report)
        if report.found:
            ...  # params_K is not usable (non-finite values propagate); skip this step

    ``solve`` resets the report when it starts and hands it the inner losses when the loop is
    done; nothing is read from the device until you read ``found``, ``step`` or ``value``
    (each read is one host sync, yours). Attributes:

    - ``checked``: True when the losses can be inspected. False under ``vmap`` and while
      ``torch.compile`` traces, where a tensor cannot steer Python control flow; there, use
      ``solve_with_info`` and ``info.nonfinite``, which is batched per task.
    - ``step``: index of the first inner step whose loss was not finite, else None.
    - ``value``: that loss as a float (``nan``, ``inf`` or ``-inf``), else None.

    Only the ``steps`` losses the loop evaluates are checked, not ``params_K`` after the last
    update. Results are identical with and without a report.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget the previous solve: ``checked=False``, ``step=None``, ``value=None``."""
        self.checked = False
        self._losses: Tensor | None = None

    def _record(self, losses: Tensor) -> None:
        self.checked = is_concrete()
        self._losses = losses if self.checked else None

    @property
    def step(self) -> int | None:
        """The first inner step whose loss was not finite (a host read), else None."""
        if self._losses is None:
            return None
        bad = (~torch.isfinite(self._losses)).nonzero()
        return int(bad[0]) if len(bad) else None

    @property
    def value(self) -> float | None:
        """That step's loss as a float, else None."""
        step = self.step
        return None if step is None else float(self._losses[step])

    @property
    def found(self) -> bool:
        """Whether the last solve met a non-finite inner loss."""
        return self.step is not None

    def __repr__(self) -> str:
        return f"NonFiniteReport(checked={self.checked}, step={self.step}, value={self.value})"


class SolveInfo(NamedTuple):
    """The diagnostics of one :func:`solve_with_info` call: tensors only, never read back to
    the host, so it passes through ``vmap`` (one entry per task) and
    ``torch.func.grad(..., has_aux=True)``. Every tensor is detached.

    - ``loss`` (K,): the inner loss at the iterate each gradient is taken at.
    - ``grad_norm`` (K,): the global norm of the raw inner gradient at each step.
    - ``grad_norms`` ``{key: (K,)}``: the per-tensor norms of that gradient.
    - ``nonfinite`` 0-d bool: some inner loss was not finite (``~isfinite(loss).all()``).
    - ``final_grad_norm`` 0-d or None: ``||grad f(w_K)||`` with the last step's data
      (Implicit mode always; other modes with ``final_grad_norm=True``, one more gradient).
    - ``stationary`` 0-d bool or None: Implicit's stationarity check passed.
    - ``linsolve`` dict: Implicit mode's linear solve (``iterations``, ``residual``,
      ``converged``, and for CG ``nonpositive_curvature``, 0-d each), filled in when the
      backward pass runs the solve; empty before and in other modes.
    """

    loss: Tensor
    grad_norm: Tensor
    grad_norms: dict[str, Tensor]
    nonfinite: Tensor
    final_grad_norm: Tensor | None
    stationary: Tensor | None
    linsolve: dict[str, Tensor]


def _check_loss(loss: Any, step: int) -> None:
    if not isinstance(loss, Tensor):
        raise TypeError(
            f"inner_loss must return a Tensor, got {type(loss).__name__} at step {step}"
        )
    if loss.dim() != 0:
        raise ValueError(
            f"inner_loss must return a scalar (0-d) Tensor, got shape {tuple(loss.shape)} at "
            f"step {step}; reduce it (e.g. .mean())"
        )


def _autograd_grad(loss: Tensor, inputs: list[Tensor], *, create_graph: bool) -> list[Tensor]:
    """``torch.autograd.grad`` with zeros for inputs the loss does not use (what
    ``materialize_grads=True`` does, without its per-call cost)."""
    grads = torch.autograd.grad(loss, inputs, create_graph=create_graph, allow_unused=True)
    if any(g is None for g in grads):
        return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs)]
    return list(grads)


class _InnerLoop:
    """The optimizer loop, and a record of the loss and gradient norms at each step."""

    def __init__(
        self, inner_loss, meta, optimizer, data_at, *, record_norms: bool, first_norm: bool
    ):
        self.inner_loss = inner_loss
        self.meta = meta
        self.optimizer = optimizer
        self.data_at = data_at
        self.record_norms = record_norms
        self.record_first_norm = first_norm and not record_norms
        self.functional = under_functorch_transform()
        self.losses: list[Tensor] = []
        self.grad_norms: list[Tensor] = []
        self.tensor_norms: list[dict[str, Tensor]] = []
        self.checked_updates = False

    def loss_of(self, step: int) -> Callable[[Tree], Tensor]:
        data = self.data_at(step)

        def loss(params: Tree) -> Tensor:
            value = self.inner_loss(params, self.meta, data)
            _check_loss(value, step)
            return value

        return loss

    def gradient(self, params: Tree, step: int, *, differentiable: bool) -> tuple[Tree, Tensor]:
        """``(grad_w f(params, meta, data_step), f)``, with or without a graph to the inputs."""
        if self.functional:
            loss_fn = self.loss_of(step)
            if differentiable:
                return torch.func.grad_and_value(loss_fn)(params)
            with torch.no_grad():  # torch.func.grad still differentiates at its own level
                return torch.func.grad_and_value(loss_fn)(params)
        with torch.enable_grad():
            # Differentiable: keep the graph back to params0/meta; first-order: cut it.
            leaves = {
                k: p if differentiable and p.requires_grad else p.detach().requires_grad_()
                for k, p in params.items()
            }
            loss = self.inner_loss(leaves, self.meta, self.data_at(step))
            _check_loss(loss, step)
            grads = _autograd_grad(loss, list(leaves.values()), create_graph=differentiable)
        # First-order: drop the loss graph now. Branches that do not lead to params (e.g. through
        # closed-over weights) were not run by autograd.grad and would otherwise stay alive.
        return dict(zip(leaves, grads)), loss if differentiable else loss.detach()

    def record(self, loss: Tensor, grads: Tree) -> None:
        self.losses.append(loss.detach() if loss.requires_grad else loss)
        if self.record_first_norm and not self.grad_norms:  # Implicit's reference, step 0 only
            with torch.no_grad():
                self.grad_norms.append(global_norm(grads))
        elif self.record_norms:
            with torch.no_grad():
                norms = {k: torch.linalg.vector_norm(g) for k, g in grads.items()}
                self.tensor_norms.append(norms)
                self.grad_norms.append(global_norm(norms))

    def run(self, params: Tree, state: Any, steps: range, *, differentiable: bool):
        track = differentiable and torch.is_grad_enabled()
        for step in steps:
            grads, loss = self.gradient(params, step, differentiable=differentiable)
            self.record(loss, grads)
            with torch.set_grad_enabled(track):
                updates, state = self.optimizer.update(grads, state, params)
                if self.checked_updates:  # keys and shapes cannot change between steps
                    params = {k: p + updates[k] for k, p in params.items()}
                else:
                    params = apply_updates(params, updates)
                    self.checked_updates = True
        return params, state

    def raise_if_nonfinite(self) -> None:
        """Raise on a non-finite inner loss: one host read per solve (a non-finite loss
        anywhere makes the sum non-finite). Skipped where values cannot steer Python
        (``vmap``, compile)."""
        if not is_concrete():
            return
        losses = torch.stack(self.losses)
        if math.isfinite(float(losses.sum())):
            return
        step = int((~torch.isfinite(losses)).nonzero()[0])
        raise ValueError(
            f"inner_loss returned {float(losses[step])} at step {step}; expected a finite "
            "value (lower the inner learning rate, clip gradients, or check the data)"
        )


def _check_inner_loss(inner_loss: Any) -> None:
    """``inner_loss`` must accept ``(params, meta, data)`` positionally; say so by name."""
    if not callable(inner_loss):
        raise TypeError(f"inner_loss must be callable, got {type(inner_loss).__name__}")
    if torch.compiler.is_compiling():  # checked when the code ran eagerly; dynamo cannot trace it
        return
    try:
        signature = inspect.signature(inner_loss)
    except (TypeError, ValueError):  # builtins and some C callables have none: call and see
        return
    try:
        signature.bind(None, None, None)
    except TypeError:
        name = getattr(inner_loss, "__name__", type(inner_loss).__name__)
        raise TypeError(
            f"inner_loss must take three positional arguments, inner_loss(params, meta, data), "
            f"but {name}{signature} does not (write e.g. lambda params, meta, data: ...; "
            "ignore the arguments you do not need)"
        ) from None


def _check_params0(params0: Any) -> None:
    if isinstance(params0, torch.nn.Module):
        raise TypeError(
            f"params0 must be a dict[str, Tensor], got the module {type(params0).__name__}; "
            "pass dict(module.named_parameters()) and run the module inside inner_loss with "
            "torch.func.functional_call(module, params, ...)"
        )
    if isinstance(params0, (list, tuple, Iterator)) and not isinstance(params0, Mapping):
        raise TypeError(
            f"params0 must be a dict[str, Tensor], got {type(params0).__name__} (e.g. from "
            "module.parameters()); pass dict(module.named_parameters()), so that every tensor "
            "has a name"
        )
    check_tree(params0, "params0")


def _check_arguments(inner_loss, params0, meta, optimizer, steps, mode, data, nonfinite) -> None:
    _check_inner_loss(inner_loss)
    _check_params0(params0)
    if _outer_variables(meta) is not None and not isinstance(meta, Tensor):
        if not isinstance(meta, Mapping):
            raise TypeError(
                "meta must be None, a Tensor or a dict[str, Tensor] (an empty container such "
                f"as {{}}, (), [] also means no outer variables), got {type(meta).__name__}"
            )
        check_tree(meta, "meta")
    if nonfinite is not None and not isinstance(nonfinite, NonFiniteReport):
        raise TypeError(
            f"nonfinite must be None (raise on a non-finite inner loss) or a "
            f"bl.NonFiniteReport(), got {type(nonfinite).__name__}"
        )
    if not isinstance(optimizer, GradientTransformation):
        raise TypeError(
            f"optimizer must be a GradientTransformation such as bl.sgd(0.1), got "
            f"{type(optimizer).__name__}"
        )
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise TypeError(f"steps must be an int, got {type(steps).__name__}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not isinstance(mode, (Unrolled, Truncated, FirstOrder, Implicit)):
        raise TypeError(
            "mode must be bl.Unrolled(), bl.Truncated(T), bl.FirstOrder() or bl.Implicit(...), "
            f"got {mode!r}"
        )
    if isinstance(mode, Truncated) and steps < mode.T:
        raise ValueError(f"Truncated T must be <= steps, got T={mode.T} with steps={steps}")
    if isinstance(data, PerStep) and len(data) != steps:
        raise ValueError(
            f"PerStep data has {len(data)} entries but steps={steps}; expected one per step"
        )


def _outer_variables(meta: Any) -> Any:
    """``meta``, or None when it holds no outer variable: None or an empty container."""
    if meta is None or (not isinstance(meta, Tensor) and is_empty_tree(meta)):
        return None
    return meta


def _meta_tensors(meta: Any) -> list[Tensor]:
    """The tensors of an already checked ``meta`` (none for None or an empty container)."""
    outer = _outer_variables(meta)
    if outer is None:
        return []
    return [outer] if isinstance(outer, Tensor) else list(outer.values())


def _straight_through(params_K: Tree, params0: Tree) -> Tree:
    """``params_K`` whose Jacobian with respect to ``params0`` is the identity (FOMAML)."""
    return {
        k: w + (params0[k] - params0[k].detach()) if params0[k].requires_grad else w
        for k, w in params_K.items()
    }


def _implicit(
    loop: _InnerLoop, params_K: Tree, meta: Any, mode: Implicit, steps: int, info: dict, sinks,
    depth: int,
) -> Tree:  # fmt: skip
    """Attach IFT gradients at ``params_K`` for the stationarity condition of the last step.

    Writes ``final_grad_norm`` and ``stationary`` into ``info``; the linear solve's record goes
    into each ``(dict, key prefix)`` of ``sinks`` when the backward pass runs it. ``depth``:
    the user's frame for warnings, counted from here.
    """
    data = loop.data_at(steps - 1)
    inner_loss = loop.inner_loss
    linearization = None
    if (
        not loop.functional
        and torch.is_grad_enabled()
        and any(t.requires_grad for t in _meta_tensors(meta))
    ):
        # Eagerly, the gradient at w_K is taken once with a graph: the stationarity check
        # reads its norm and an eager backward reuses it for the linear solve.
        meta_tree, to_meta = as_tree(meta, "meta")
        with torch.enable_grad():
            w = {k: v.detach().requires_grad_() for k, v in params_K.items()}
            m = {k: v.detach().requires_grad_() for k, v in meta_tree.items()}
            loss = inner_loss(w, to_meta(m), data)
            _check_loss(loss, steps - 1)
            residual = _autograd_grad(loss, list(w.values()), create_graph=True)
        linearization = (w, m, dict(zip(w, residual)))
        grads = {k: g.detach() for k, g in linearization[2].items()}
    else:
        grads, _ = loop.gradient(params_K, steps - 1, differentiable=False)
    with torch.no_grad():
        final_norm = global_norm(grads)
        if mode.stationarity_scale is None:
            reference, what = loop.grad_norms[0], "||grad f(params0)||"
        else:
            reference, what = final_norm.new_tensor(mode.stationarity_scale), "stationarity_scale"
        threshold = torch.clamp(mode.stationarity_rtol * reference, min=mode.stationarity_atol)
        stationary = final_norm <= threshold
    info["final_grad_norm"] = final_norm
    info["stationary"] = stationary
    if is_concrete() and not bool(stationary) and math.isfinite(float(final_norm)):
        warn(
            f"Implicit mode assumes params_K is stationary, but ||grad f(params_K)|| = "
            f"{float(final_norm):.3e} exceeds stationarity_rtol * {what} = "
            f"{mode.stationarity_rtol:g} * {float(reference):.3e} and stationarity_atol = "
            f"{mode.stationarity_atol:g}; the implicit gradient may be wrong (run more "
            "steps or raise the inner learning rate; with a warm start, set "
            "Implicit(stationarity_scale=...) to the gradient norm of a cold start)",
            depth=depth,
        )
    if _outer_variables(meta) is None:
        warn(
            "Implicit mode with no outer variables (meta=None or empty): nothing can receive "
            "an implicit gradient",
            depth=depth,
        )
        return params_K

    def stationarity(w: Tree, m: Any) -> Tree:
        if under_functorch_transform() or not all(t.requires_grad for t in w.values()):
            return torch.func.grad(lambda q: inner_loss(q, m, data))(w)
        # eager backward: one graph that the linear solve's reverse passes reuse
        grads = torch.autograd.grad(
            inner_loss(w, m, data), list(w.values()), create_graph=True, materialize_grads=True
        )
        return dict(zip(w, grads))

    def on_solve(result: LinsolveInfo) -> None:  # tensors only, eagerly as under vmap
        residual = result.residual
        record = {
            "iterations": torch.as_tensor(result.iterations, device=residual.device),
            "residual": residual,
        }
        if result.converged is not None:
            record["converged"] = torch.as_tensor(result.converged, device=residual.device)
        if result.nonpositive_curvature is not None:
            record["nonpositive_curvature"] = torch.as_tensor(
                result.nonpositive_curvature, device=residual.device
            )
        for sink, prefix in sinks:
            sink.update({prefix + k: v for k, v in record.items()})

    return attach_implicit_gradient(
        stationarity, params_K, meta, mode.linsolve, on_solve, linearization
    )


def _run(
    inner_loss, params0, meta, optimizer, steps, mode, data, *, record_norms, check_finite, sinks,
    depth,
) -> tuple[Tree, _InnerLoop, dict[str, Any]]:  # fmt: skip
    """The inner loop of every mode: ``(params_K, the loop and its record, Implicit's info)``.

    One host read when ``check_finite`` (the non-finite error), none otherwise. ``depth``: the
    user's frame for warnings, as ``warn(depth=)`` counts it from here (2: the caller of
    ``_run``'s caller).
    """
    data_at = data.__getitem__ if isinstance(data, PerStep) else (lambda step: data)
    implicit = isinstance(mode, Implicit)
    first_norm = implicit and mode.stationarity_scale is None
    loop = _InnerLoop(
        inner_loss, meta, optimizer, data_at, record_norms=record_norms, first_norm=first_norm
    )
    if isinstance(mode, (Unrolled, Truncated)):
        exact = steps if isinstance(mode, Unrolled) else mode.T
        params, state = dict(params0), optimizer.init(params0)
        if exact < steps:  # detached prefix: a constant for the differentiated suffix
            params, state = detach((params, state))
            params, state = loop.run(params, state, range(steps - exact), differentiable=False)
            params, state = detach((params, state))
        params_K, _ = loop.run(params, state, range(steps - exact, steps), differentiable=True)
    else:
        if isinstance(mode, FirstOrder) and any(t.requires_grad for t in _meta_tensors(meta)):
            warn(
                "FirstOrder mode gives meta no gradient through the inner loop (params_K does "
                "not depend on it); use Unrolled, Truncated or Implicit to learn meta",
                depth=depth,
            )
        start = detach(dict(params0))
        params_K, _ = loop.run(start, optimizer.init(start), range(steps), differentiable=False)
    if check_finite:
        loop.raise_if_nonfinite()
    info: dict[str, Any] = {}
    if isinstance(mode, FirstOrder):
        params_K = _straight_through(params_K, params0)
    elif implicit:
        params_K = _implicit(loop, params_K, meta, mode, steps, info, sinks, depth + 1)
    return params_K, loop, info


def _final_grad_norm(loop: _InnerLoop, params_K: Tree, steps: int) -> Tensor:
    grads, _ = loop.gradient(detach(params_K), steps - 1, differentiable=False)
    with torch.no_grad():
        return global_norm(grads)


def solve(
    inner_loss: InnerLoss,
    params0: Tree,
    meta: Tensor | Tree | None = None,
    *,
    optimizer: GradientTransformation,
    steps: int,
    mode: Mode = _UNROLLED,
    data: Any = None,
    check_finite: bool = True,
    return_info: bool = False,
    final_grad_norm: bool = False,
    nonfinite: NonFiniteReport | None = None,
) -> Tree | tuple[Tree, dict[str, Any]]:
    """Run ``steps`` optimizer steps on ``inner_loss`` from ``params0``; differentiate per ``mode``.

    Args:
        inner_loss: ``inner_loss(params, meta, data) -> scalar Tensor``. It may run an
            ``nn.Module`` through ``torch.func.functional_call`` or hooks that read ``params``,
            and may close over outer tensors (then pass ``meta=None``).
        params0: ``dict[str, Tensor]``, the initial inner variables ``w_0``.
        meta: the outer variables ``theta``: ``None``, a Tensor or ``dict[str, Tensor]``. An
            empty container (``{}``, ``()``, ``[]``, nested ones) means "no outer variables"
            exactly as ``None`` does, in every mode; ``inner_loss`` receives it as given.
        optimizer: a ``GradientTransformation`` (``bl.sgd(0.1)``, ``bl.chain(...)``).
        steps: ``K >= 1``.
        mode: ``Unrolled()``, ``Truncated(T)``, ``FirstOrder()`` or ``Implicit(linsolve=...)``;
            see :mod:`bilevel.modes` for each exact gradient.
        data: passed to every step, or ``PerStep([d_0, ..., d_{K-1}])`` for one batch per step.
        check_finite: True (default) raises ``ValueError`` on a non-finite inner loss, which
            costs one host read per call (skipped under ``vmap`` and ``torch.compile``).
            False: no host read at all; non-finite values propagate into ``params_K``
            (:func:`solve_with_info` returns the flag as a tensor).
        return_info, final_grad_norm, nonfinite: deprecated, kept for older callers; use
            :func:`solve_with_info`. ``return_info=True`` returns ``(params_K, info)`` with
            ``info`` the dict of :class:`SolveInfo`'s fields (``loss``, ``grad_norm``,
            ``grad_norms``, ``final_grad_norm`` and ``stationary`` where present, and Implicit's
            ``linsolve_<name>`` entries once the backward pass has run the linear solve).
            ``nonfinite=bl.NonFiniteReport()`` means ``check_finite=False`` and hands the
            report the losses (read lazily, see :class:`NonFiniteReport`).

    Returns:
        ``params_K`` (same keys as ``params0``), or, deprecated, ``(params_K, info)``.

    Raises:
        TypeError, ValueError: bad arguments, a non-scalar loss, mismatched keys or shapes,
        or (``check_finite``) a non-finite inner loss, outside ``vmap`` and ``torch.compile``.
    """
    _check_arguments(inner_loss, params0, meta, optimizer, steps, mode, data, nonfinite)
    if final_grad_norm and not return_info:
        raise ValueError("final_grad_norm=True only has an effect with return_info=True")
    if not return_info and nonfinite is None:
        params_K, _, _ = _run(
            inner_loss, params0, meta, optimizer, steps, mode, data,
            record_norms=False, check_finite=check_finite, sinks=[], depth=2,
        )  # fmt: skip
        return params_K
    # The deprecated routes, over the typed one.
    legacy: dict[str, Any] = {}
    params_K, info = _solve_with_info(
        inner_loss, params0, meta, optimizer, steps, mode, data,
        final_grad_norm=final_grad_norm, check_finite=check_finite and nonfinite is None,
        record_norms=return_info, sinks=[(legacy, "linsolve_")], depth=2,
    )  # fmt: skip
    if nonfinite is not None:
        nonfinite.reset()
        nonfinite._record(info.loss)
    if not return_info:
        return params_K
    legacy.update({"loss": info.loss})
    if info.grad_norms is not None:
        legacy.update({"grad_norm": info.grad_norm, "grad_norms": info.grad_norms})
    for name in ("final_grad_norm", "stationary"):
        if getattr(info, name) is not None:
            legacy[name] = getattr(info, name)
    return params_K, legacy


def solve_with_info(
    inner_loss: InnerLoss,
    params0: Tree,
    meta: Tensor | Tree | None = None,
    *,
    optimizer: GradientTransformation,
    steps: int,
    mode: Mode = _UNROLLED,
    data: Any = None,
    check_finite: bool = True,
    final_grad_norm: bool = False,
) -> tuple[Tree, SolveInfo]:
    """:func:`solve`, and its diagnostics as one typed record: ``(params_K, SolveInfo)``.

    The arguments are :func:`solve`'s. The diagnostics cost no extra model evaluation (except
    ``final_grad_norm=True``: one more gradient) and no host read: with
    ``check_finite=False`` the call reads nothing back from the device, and
    ``info.nonfinite`` (a 0-d bool tensor) says whether some inner loss was not finite, for
    the caller to act on by its own policy (e.g. skip the training step without a sync, with
    ``torch.where``). With ``check_finite=True`` (default) a non-finite inner loss raises, as
    in :func:`solve` (one host read). Implicit mode also reads one value, for its
    stationarity warning.
    """
    _check_arguments(inner_loss, params0, meta, optimizer, steps, mode, data, None)
    params_K, info = _solve_with_info(
        inner_loss, params0, meta, optimizer, steps, mode, data,
        final_grad_norm=final_grad_norm, check_finite=check_finite, record_norms=True,
        sinks=[], depth=2,
    )  # fmt: skip
    return params_K, info


def _solve_with_info(
    inner_loss, params0, meta, optimizer, steps, mode, data, *,
    final_grad_norm, check_finite, record_norms, sinks, depth,
) -> tuple[Tree, SolveInfo]:  # fmt: skip
    linsolve: dict[str, Tensor] = {}
    params_K, loop, extra = _run(
        inner_loss, params0, meta, optimizer, steps, mode, data,
        record_norms=record_norms, check_finite=check_finite, sinks=[(linsolve, ""), *sinks],
        depth=depth + 1,
    )  # fmt: skip
    losses = torch.stack(loop.losses)
    final = extra.get("final_grad_norm")
    if final_grad_norm and final is None:
        final = _final_grad_norm(loop, params_K, steps)
    norms = loop.tensor_norms
    info = SolveInfo(
        loss=losses,
        grad_norm=torch.stack(loop.grad_norms) if record_norms else None,
        grad_norms={k: torch.stack([n[k] for n in norms]) for k in norms[0]} if norms else None,
        nonfinite=~torch.isfinite(losses).all(),
        final_grad_norm=final,
        stationary=extra.get("stationary"),
        linsolve=linsolve,
    )
    return params_K, info
