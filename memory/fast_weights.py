"""Fast weights attached to a model's `nn.Linear` layers through forward hooks.

A fast-weight memory adds a correction to the output of selected linear layers,

    y = W x + b + delta(x; state[target]),

whose parameters ("state") are not in the model: they are a `dict[str, Tensor]` the caller
owns and passes to `bind`. The model's code and parameters are never changed, so nothing is
needed from the model beyond `nn.Linear` targets called as modules.

Binding is a scoped, explicit value (equinox's explicit state, in a `with` block): the hooks
hold no state of their own, only a slot that `with mem.bind(state):` fills on entering and
empties on leaving, also through an exception. Attaching is scoped to the memory object: the
hooks are made with it and taken off the model when it is garbage-collected (or by the
optional `remove()`), so no caller needs `try/finally: remove()`. There is no module-level
registry: which state a forward uses is read from the model's own hooks (`bindings`).
(Installing the hooks on entering `bind` instead would make every traced function that binds
inside a `torch.func` transform break its `torch.compile` graph: dynamo cannot trace a write
into a module's hook dict there.)

A state tensor either has its per-target shape (one set of fast weights shared by the whole
batch, as in the MemDLM reference code) or an extra leading batch dimension B (per-sample fast
weights: sample b of the input uses state b, through batched matmuls).

Subclasses (`FastLoRA`, `FullFastWeights`) define the state layout and the correction.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Iterator, Mapping
from typing import NamedTuple

import torch
from torch import nn
from torch.nn.modules import module as torch_module

from memory.at_init import plain_autograd

Shape = tuple[int, ...]


class Target(NamedTuple):
    """One target of `FastWeights.init`: its linear and where/how its state is made."""

    linear: nn.Linear
    device: torch.device
    dtype: torch.dtype


class FastWeights:
    """Base class: target bookkeeping, the hooks, `bind` (the scoped binding) and state
    validation.

    Subclasses set `_suffixes` (the state key suffixes per target, e.g. `("A", "B")`) and
    implement `_param_shapes`, `_init_state`, `_output_delta` and `_weight_delta`.
    """

    _suffixes: tuple[str, ...] = ()

    def __init__(self, model: nn.Module, targets: Iterable[str]) -> None:
        self._linears = _resolve_targets(model, targets)
        self.targets: tuple[str, ...] = tuple(self._linears)
        self._shapes: dict[str, Shape] = {
            f"{name}.{suffix}": shape
            for name, linear in self._linears.items()
            for suffix, shape in zip(self._suffixes, self._param_shapes(linear))
        }
        self._slot = _Slot()  # the open binding, read by the hooks; None outside `bind`
        handles = [
            linear.register_forward_hook(_Hook(self._slot, name), with_kwargs=True)
            for name, linear in self._linears.items()
        ]
        # The hooks reference the slot, not this object: dropping the last reference to the
        # memory takes them off the model (the attachment lives as long as the memory).
        self._detach = weakref.finalize(self, _remove_handles, handles)
        self._removed = False

    # ----------------------------------------------------------------- subclass interface
    def _param_shapes(self, linear: nn.Linear) -> tuple[Shape, ...]:
        """Per-sample shape of each state tensor of one target, in `_suffixes` order."""
        raise NotImplementedError

    def _init_state(
        self, targets: list[Target], batch: Shape, generator
    ) -> list[tuple[torch.Tensor, ...]]:
        """Fresh state tensors of every target, in `targets` order (random draws consume
        `generator` in that order): per target, one tensor per suffix of shape
        `batch + per-sample shape`. One call for all targets, so `init` crosses into the
        subclass once per state, not once per target."""
        raise NotImplementedError

    def _output_delta(
        self, linear: nn.Linear, x: torch.Tensor, params: tuple[torch.Tensor, ...]
    ) -> torch.Tensor:
        """The correction added to `linear(x)`; `x` and `params` are already in one dtype."""
        raise NotImplementedError

    def _output_at_init(
        self, linear: nn.Linear, x: torch.Tensor, params: tuple[torch.Tensor, ...], output
    ) -> torch.Tensor:
        """`output + _output_delta(...)` for a state that is `init`'s (`bind(at_init=True)`),
        where the correction is zero: subclasses skip it (`memory.at_init`); this default
        computes it."""
        return output + self._output_delta(linear, x, params)

    def _weight_delta(self, params: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The correction as a weight matrix, (out, in) or (B, out, in)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------- public API
    @property
    def state_shapes(self) -> dict[str, Shape]:
        """Per-sample shape of every state key (a batched state adds a leading B)."""
        return dict(self._shapes)

    @property
    def is_bound(self) -> bool:
        """Whether a state is bound right now (inside a `with mem.bind(state)` block)."""
        return self._slot.binding is not None

    def init(
        self,
        batch_size: int | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> dict[str, torch.Tensor]:
        """A fresh state: one tensor per key of `state_shapes`.

        Args:
            batch_size: None for one state shared by the batch, B >= 1 for per-sample states
                (every tensor gets a leading dim B; samples are drawn independently).
            generator: random source for random parts (LoRA's A); draws happen on its device.
            device: where the state lives; by default each target weight's device.
            dtype: a floating dtype for every state tensor. By default (None), per target, the
                target weight's dtype promoted to at least float32 (`default_dtype`): bf16 and
                float16 weights get float32 fast weights, so they stay accurate under low
                precision; float32 stays float32; float64 gets float64, so a float64 gradient
                check keeps its precision.
        """
        if batch_size is not None and (
            isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
        ):
            raise ValueError(f"batch_size must be None or an int >= 1, got {batch_size!r}")
        if dtype is not None and (
            not isinstance(dtype, torch.dtype) or not dtype.is_floating_point
        ):
            raise TypeError(f"dtype must be None or a floating-point torch.dtype, got {dtype!r}")
        batch = () if batch_size is None else (batch_size,)
        targets = [
            Target(
                linear,
                linear.weight.device if device is None else torch.device(device),
                default_dtype(linear.weight.dtype) if dtype is None else dtype,
            )
            for linear in self._linears.values()
        ]
        state = {}
        for name, params in zip(self._linears, self._init_state(targets, batch, generator)):
            state.update({f"{name}.{s}": p for s, p in zip(self._suffixes, params)})
        return state

    def batch_size(self, state: Mapping[str, torch.Tensor]) -> int | None:
        """B of a per-sample `state` (leading batch dim), None for a shared one; validates the
        state as `bind` does and reads shapes only (no device sync)."""
        return self._check_state(state)[1]

    def bind(self, state: Mapping[str, torch.Tensor], *, at_init: bool = False) -> Binding:
        """Context manager: inside the `with` block the targets use `state`.

        The state is validated here (keys, shapes, dtypes, devices, batch dims). Entering
        puts the binding into the hooks' slot, leaving empties it (also through an
        exception). Tensors are used as given, never
        copied or modified, so gradients flow from the model output back to them
        (`torch.func.grad` over a function that binds its argument works). `with ... as b`
        gives the `Binding` (its `batch_size`).

        at_init: the caller states that `state` holds `init`'s values (LoRA's B = 0, full
        deltas = 0; e.g. the first step of an inner loop), where the correction is exactly
        zero. The targets then return their own output and, in the backward pass, compute only
        the gradients that are not zero there (LoRA: B's; A's is exactly zero and returned as
        zeros), each as the ordinary path computes it (`memory.at_init`): the same values,
        bit for bit, for less work. First-order only (its backward is not differentiable
        again); under `torch.compile` or a `torch.func` transform the ordinary path runs. A
        state that is not at init gives wrong results here: pass it only when it is.
        """
        if self._removed:
            raise RuntimeError(
                f"bind() after remove(): this {type(self).__name__} is detached from its "
                "model; create a new one"
            )
        if not isinstance(at_init, bool):
            raise TypeError(f"at_init must be True or False, got {at_init!r}")
        params, batch_size = self._check_state(state)
        return Binding(self, params, batch_size, at_init=at_init)

    def merged_weight(self, name: str, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The effective weight of target `name` under `state`: W + correction.

        Shape (out, in), or (B, out, in) for a per-sample state. Differentiable, for
        inspection and tests; the forward pass never materialises it.
        """
        if name not in self._linears:
            raise ValueError(f"unknown target {name!r}; targets are {self.targets}")
        params, _ = self._check_state(state)
        return self._linears[name].weight + self._weight_delta(params[name])

    def remove(self) -> None:
        """Take the hooks off the model now (idempotent; optional: dropping the memory does
        it too). Later binds raise. Not allowed while bound."""
        if self._slot.binding is not None:
            raise RuntimeError("remove() inside a bind() block; leave the block first")
        self._detach()
        self._removed = True

    def __repr__(self) -> str:
        return f"{type(self).__name__}(targets={len(self.targets)}, {self._extra_repr()})"

    def _extra_repr(self) -> str:
        return ""

    # ------------------------------------------------------------------------ internals
    def _check_state(
        self, state: Mapping[str, torch.Tensor]
    ) -> tuple[dict[str, tuple[torch.Tensor, ...]], int | None]:
        """Validate `state` against this memory; return per-target tuples and the batch size."""
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a mapping of str to Tensor, got {type(state).__name__}")
        missing = [k for k in self._shapes if k not in state]
        unexpected = [k for k in state if k not in self._shapes]
        if missing or unexpected:
            raise ValueError(
                f"state does not belong to this {type(self).__name__}: missing keys "
                f"{_preview(missing)}, unexpected keys {_preview(unexpected)}"
            )
        batch_sizes = {}
        for key, shape in self._shapes.items():
            batch_sizes[key] = _check_tensor(key, state[key], shape)
            linear = self._linears[key.rsplit(".", 1)[0]]
            if state[key].device != linear.weight.device:
                raise ValueError(
                    f"state[{key!r}] is on {state[key].device} but the target weight is on "
                    f"{linear.weight.device}"
                )
        distinct = set(batch_sizes.values())
        if len(distinct) > 1:
            raise ValueError(
                "state tensors disagree on the batch dimension (None = shared): "
                f"{_preview([f'{k}: {b}' for k, b in batch_sizes.items()])}"
            )
        params = {
            name: tuple(state[f"{name}.{s}"] for s in self._suffixes) for name in self._linears
        }
        return params, distinct.pop()


class Binding:
    """One state bound to one memory: what `mem.bind(state)` returns (an explicit value).

    Inside its `with` block the memory's hooks add the correction under `params`; outside,
    they return None. `batch_size` is B for a per-sample state, else None; `at_init`: the
    state is `init`'s (`FastWeights.bind`). A memory holds one open binding at a time.
    """

    def __init__(
        self, memory: FastWeights, params, batch_size: int | None, *, at_init: bool = False
    ) -> None:
        self.memory = memory
        self.params: dict[str, tuple[torch.Tensor, ...]] = params
        self.batch_size = batch_size
        self.at_init = at_init

    def __enter__(self) -> Binding:
        memory = self.memory
        if memory._slot.binding is not None:
            raise RuntimeError(
                f"nested bind(): this {type(memory).__name__} is already bound to a state; "
                "leave the first `with` block before binding another state (for several "
                "states at once, bind one state with a leading batch dimension)"
            )
        memory._slot.binding = self
        return self

    def __exit__(self, *exc_info) -> bool:
        self.memory._slot.binding = None
        return False  # never swallow the exception

    def __repr__(self) -> str:
        return f"Binding({self.memory!r}, batch_size={self.batch_size}, at_init={self.at_init})"


class _Slot:
    """Where a memory's hooks find its open binding (None outside `bind`)."""

    def __init__(self) -> None:
        self.binding: Binding | None = None


class _Hook:
    """The forward hook of one target: `output + delta(x; params[name])` under the open
    binding, `None` (the output untouched) outside `bind`."""

    def __init__(self, slot: _Slot, name: str) -> None:
        self.slot, self.name = slot, name

    def __call__(self, module, args, kwargs, output):
        binding = self.slot.binding
        if binding is None:  # unbound: leave the output object untouched
            return None
        x = args[0] if args else kwargs["input"]
        if binding.batch_size is not None:
            _check_input_batch(self.name, x, binding.batch_size)
        # Compute in the activation dtype (bf16 under autocast); the state stays as is and
        # receives its gradient in its own dtype through the cast.
        dtype = output.dtype
        params = tuple(p.to(dtype) for p in binding.params[self.name])
        if binding.at_init and plain_autograd():  # the correction is zero: `memory.at_init`
            return binding.memory._output_at_init(module, x.to(dtype), params, output)
        return output + binding.memory._output_delta(module, x.to(dtype), params)


def output_of(linear: nn.Module, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """What `linear(x)` returns right now, given `output`, the linear's own result for `x`
    (`F.linear(x, weight, bias)`, computed once elsewhere and shared by several forwards):
    `output` with the correction of every open binding on `linear` added (`output` itself
    when none is open), exactly as the hooks add it after the linear's own forward.

    For code that reuses one product of a target's base weight across forwards under different
    states (or none): each forward pays only for its correction. When `linear` carries any
    other hook (`only_fast_weights` is False: a user's hook, a global module hook such as
    `FlopCounterMode`'s), that hook must see the call, so the module itself is called and
    `output` is not used: the same value, without the saving.
    """
    if not only_fast_weights(linear):
        return linear(x)
    for hook in linear._forward_hooks.values():
        corrected = hook(linear, (x,), {}, output)
        output = output if corrected is None else corrected
    return output


def only_fast_weights(module: nn.Module) -> bool:
    """Whether `module`'s own hooks are fast weights' forward hooks only (or none): then its
    output is its own forward plus their corrections (`output_of`). Global module hooks
    (`torch.nn.modules.module.register_module_forward_hook`) count as other hooks."""
    if module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks:
        return False
    global_hooks = ("forward_hooks", "forward_pre_hooks", "backward_hooks", "backward_pre_hooks")
    if any(getattr(torch_module, f"_global_{kind}") for kind in global_hooks):
        return False
    return all(isinstance(hook, _Hook) for hook in module._forward_hooks.values())


def _remove_handles(handles: list) -> None:
    for handle in handles:
        handle.remove()


def bindings(module: nn.Module) -> tuple[Binding, ...]:
    """The bindings whose hooks sit on `module` or its submodules right now, in module order.

    Outside every `bind` block this is empty. Code deep inside a model (a block that must run
    samples one at a time) asks the module it owns, so no global registry is needed.
    """
    found: dict[int, Binding] = {}
    for sub in module.modules():
        for hook in sub._forward_hooks.values():
            if isinstance(hook, _Hook) and hook.slot.binding is not None:
                found.setdefault(id(hook.slot.binding), hook.slot.binding)
    return tuple(found.values())


def per_sample_size(module: nn.Module) -> int | None:
    """B of the per-sample states bound on `module`'s targets (`bindings`), or None when every
    one bound there is shared or none is bound (shape bookkeeping only, no device sync)."""
    sizes = {b.batch_size for b in bindings(module) if b.batch_size is not None}
    if len(sizes) > 1:
        raise ValueError(f"per-sample states of different batch sizes are bound: {sorted(sizes)}")
    return sizes.pop() if sizes else None


@contextlib.contextmanager
def one_sample(module: nn.Module, index: int) -> Iterator[None]:
    """Inside, every per-sample binding (leading dim B) on `module`'s targets uses row `index`
    of its state as a shared state (no batch dim); leaving restores the per-sample state.

    For code that runs one sample at a time through modules that flatten the batch, where the
    rows a target sees no longer carry a sample index: the routed experts of a mixture-of-
    experts block get (tokens, hidden) rows. Running such a block on sample b's input inside
    `one_sample(block, b)` gives sample b's output under sample b's fast weights, exactly,
    whatever the block's routing code; gradients reach row b of the state through the indexing.
    """
    batch = per_sample_size(module)
    if batch is None:
        raise RuntimeError("one_sample() needs a per-sample state bound (a bind() block)")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < batch:
        raise ValueError(f"index must be an int in [0, {batch}), got {index!r}")
    swapped = [b for b in bindings(module) if b.batch_size is not None]
    saved = [(b.params, b.batch_size) for b in swapped]
    try:
        for binding, (params, _) in zip(swapped, saved):
            binding.params = {n: tuple(p[index] for p in ps) for n, ps in params.items()}
            binding.batch_size = None
        yield
    finally:
        for binding, (params, batch_size) in zip(swapped, saved):
            binding.params, binding.batch_size = params, batch_size


def batched_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-sample `F.linear` without bias: out[b] = x[b] @ weight[b]^T.

    x (B, ..., in), weight (B, out, in) -> (B, ..., out), as one `bmm` over (B, N, in).
    """
    flat = x.reshape(x.shape[0], -1, x.shape[-1])
    out = torch.bmm(flat, weight.transpose(1, 2))
    return out.reshape(*x.shape[:-1], weight.shape[1])


def default_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """The state dtype `init` picks for a target weight of `weight_dtype`: at least float32.

    bfloat16, float16 -> float32; float32 -> float32; float64 -> float64. A weight that is not
    floating point (a quantized or integer layout) gets float32.
    """
    if not weight_dtype.is_floating_point:
        return torch.float32
    return torch.promote_types(weight_dtype, torch.float32)


def _resolve_targets(model: nn.Module, targets: Iterable[str]) -> dict[str, nn.Linear]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(targets, str):
        raise TypeError(
            f"targets must be a sequence of module names, got the string {targets!r}; "
            "pass [name], or mm.select(model, pattern) for a regex"
        )
    names = list(targets)
    if not names:
        raise ValueError("targets is empty: name at least one nn.Linear submodule")
    linears: dict[str, nn.Linear] = {}
    owner: dict[int, str] = {}
    for name in names:
        if not isinstance(name, str) or not name:
            raise ValueError(f"target names must be non-empty strings, got {name!r}")
        if name in linears:
            raise ValueError(f"target {name!r} is listed twice")
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"unknown target {name!r}: {type(model).__name__} has no submodule of that name"
            ) from None
        if not isinstance(module, nn.Linear):
            raise ValueError(f"target {name!r} is a {type(module).__name__}, not an nn.Linear")
        if id(module) in owner:
            raise ValueError(f"targets {owner[id(module)]!r} and {name!r} are the same module")
        owner[id(module)] = name
        linears[name] = module
    return linears


def _check_tensor(key: str, tensor: torch.Tensor, shape: Shape) -> int | None:
    """Check one state tensor; return its batch size (None when it has no batch dim)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"state[{key!r}] must be a Tensor, got {type(tensor).__name__}")
    if not tensor.dtype.is_floating_point:
        raise TypeError(
            f"state[{key!r}] has dtype {tensor.dtype}; expected a floating-point dtype "
            "(by default fast weights take the target weight's dtype, at least float32)"
        )
    actual = tuple(tensor.shape)
    if actual == shape:
        return None
    if len(actual) == len(shape) + 1 and actual[1:] == shape:
        return actual[0]
    raise ValueError(
        f"state[{key!r}] has shape {actual}; expected {shape} (shared) or "
        f"(batch, {', '.join(map(str, shape))}) (per-sample)"
    )


def _check_input_batch(name: str, x: torch.Tensor, batch_size: int) -> None:
    if x.dim() < 2 or x.shape[0] != batch_size:
        raise ValueError(
            f"target {name!r} got input of shape {tuple(x.shape)}, but the bound state is "
            f"per-sample with batch size {batch_size}: the input's leading dim must be "
            f"{batch_size}"
        )


def _preview(items: list[str], limit: int = 4) -> str:
    shown = ", ".join(repr(i) for i in items[:limit])
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return f"[{shown}{more}]"
