"""MoE blocks with an `nn.ModuleList` of experts made to serve per-sample fast weights: the
adapter's own dispatch (`routed_forward`, built on `experts.routed_sum`), where it reproduces the
block's own forward, else the block run once per sample under that sample's fast weights."""

from __future__ import annotations

import contextlib
import types
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

import memory as mm
from recipes.memdlm.backbones.hf.experts import routed_sum
from recipes.memdlm.errors import UserError


@dataclass(frozen=True)
class Routing:
    """How a MoE block with an `nn.ModuleList` of experts routes, as found by `find_routing`.

    router: "softmax" (`gate` is an nn.Linear: top-k of the softmax, LLaDA-MoE / Qwen2-MoE /
    OLMoE) or "module" (`gate(hidden)` returns (index, weights, logits) itself, LLaDA2.x).
    normalize: divide the top-k softmax weights by their sum. bias: add `expert_bias` to the
    softmax before the top-k (and keep it in the weights, as LLaDA-MoE). shared: "none",
    "gated" (Qwen2-MoE's `shared_expert` times sigmoid(`shared_expert_gate`)) or "plain"
    (LLaDA2's `shared_experts`). output: what the block returns: "tensor", "logits"
    ((y, router logits)) or "llada2" ((y, (router logits (B, L, E), index))). batched_index:
    the "llada2" index is (B, L, k) (LLaDA2.1) rather than (B L, k) (LLaDA2.0).
    """

    router: str
    normalize: bool = False
    bias: bool = False
    shared: str = "none"
    output: str = "tensor"
    batched_index: bool = False


def _route(block: nn.Module, routing: Routing, hidden: torch.Tensor):
    """(index (T, k), weights (T, k), router logits) of hidden (B, L, H) under `routing`."""
    if routing.router == "module":
        index, weights, logits = block.gate(hidden)
        return index.reshape(-1, index.shape[-1]), weights.reshape(-1, index.shape[-1]), logits
    flat = hidden.reshape(-1, hidden.shape[-1])
    logits = block.gate(flat)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    if routing.bias:
        probs = probs + block.expert_bias
    weights, index = torch.topk(probs, block.top_k, dim=-1)
    if routing.normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return index, weights.to(hidden.dtype), logits


def routed_forward(block: nn.Module, routing: Routing, hidden: torch.Tensor):
    """The MoE block's forward with the adapter's own dispatch (`routed_sum`); hidden (B, L, H).

    Same value as the block's own forward (checked by `find_routing`), and the auxiliary
    outputs in the block's own shapes, but every expert sees (B, n, H) rows grouped by sample,
    in train and eval mode alike (LLaDA2's eval-mode dispatch runs under no_grad, which would
    cut the inner loop's gradient to the experts).
    """
    index, weights, logits = _route(block, routing, hidden)
    y = routed_sum(block.experts, hidden, index, weights).reshape(hidden.shape)
    if routing.shared == "gated":
        y = y + torch.sigmoid(block.shared_expert_gate(hidden)) * block.shared_expert(hidden)
    elif routing.shared == "plain":
        y = y + block.shared_experts(hidden)
    if routing.output == "logits":
        return y, logits
    if routing.output == "llada2":  # explicit widths: a loss may score no row at all
        if routing.batched_index:
            index = index.reshape(*hidden.shape[:-1], index.shape[-1])
        return y, (logits.reshape(*hidden.shape[:-1], logits.shape[-1]), index)
    return y


def _routing_candidates(block: nn.Module, expected) -> list[Routing]:
    """The routings a block's structure and its output `expected` allow, most likely first."""
    output = _output_kind(expected)
    if output is None:
        return []
    batched = output == "llada2" and expected[1][1].dim() == 3
    if isinstance(getattr(block, "shared_expert_gate", None), nn.Module):
        shared = "gated"
    elif isinstance(getattr(block, "shared_experts", None), nn.Module):
        shared = "plain"
    else:
        shared = "none"
    if not isinstance(block.gate, nn.Linear):
        return [Routing("module", shared=shared, output=output, batched_index=batched)]
    if not isinstance(getattr(block, "top_k", None), int):
        return []
    flag = bool(getattr(block, "norm_topk_prob", False))
    has_bias = isinstance(getattr(block, "expert_bias", None), torch.Tensor)
    biases = [True, False] if has_bias else [False]
    return [
        Routing("softmax", normalize=n, bias=b, shared=shared, output=output)
        for b in biases
        for n in (flag, not flag)
    ]


def _output_kind(out) -> str | None:
    if isinstance(out, torch.Tensor):
        return "tensor"
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], torch.Tensor):
        if isinstance(out[1], tuple):
            aux = out[1]
            ok = len(aux) == 2 and all(isinstance(a, torch.Tensor) for a in aux)
            return "llada2" if ok else None
        return "logits"
    return None


def _shapes(out):
    """The nested shapes of a block's output, to check that auxiliary outputs keep them."""
    if isinstance(out, tuple):
        return tuple(_shapes(o) for o in out)
    return tuple(out.shape) if isinstance(out, torch.Tensor) else type(out)


def _same_output(expected, got, dtype) -> bool:
    """`got` reproduces `expected`: the same hidden states (what the decoder layer uses) and
    auxiliary outputs of the same shapes (returned to the caller as the block returns them)."""
    if _shapes(expected) != _shapes(got):
        return False
    a = expected[0] if isinstance(expected, tuple) else expected
    b = got[0] if isinstance(got, tuple) else got
    tol = 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2
    return torch.allclose(a.float(), b.float(), rtol=tol, atol=tol)


def _hidden_width(block: nn.Module) -> int | None:
    """The block's input width: that of the first linear layer of its first expert."""
    linear = next((m for m in block.experts[0].modules() if isinstance(m, nn.Linear)), None)
    return None if linear is None else linear.in_features


def _probe(block: nn.Module) -> torch.Tensor:
    """A fixed random (2, 7, H) input in the block's dtype and device."""
    weight = next(block.parameters())
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(2, 7, _hidden_width(block), generator=generator)
    return probe.to(weight.device, weight.dtype)


def has_routed_experts(block: nn.Module | None) -> bool:
    """A MoE block this module can serve: an `nn.ModuleList` of experts with a linear layer,
    and a `gate` module."""
    experts = getattr(block, "experts", None)
    return (
        isinstance(experts, nn.ModuleList)
        and len(experts) > 0
        and isinstance(getattr(block, "gate", None), nn.Module)
        and _hidden_width(block) is not None
    )


def find_routing(block: nn.Module) -> Routing | None:
    """The `Routing` whose `routed_forward` reproduces `block`'s own forward on a random probe
    (eval mode, no gradient), or None (the block then gets the per-sample loop)."""
    if not has_routed_experts(block):
        return None
    probe, dtype = _probe(block), next(block.parameters()).dtype
    was_training = block.training
    block.eval()
    try:
        with torch.no_grad():
            expected = block(probe)
            for routing in _routing_candidates(block, expected):
                try:
                    if _same_output(expected, routed_forward(block, routing, probe), dtype):
                        return routing
                except (AttributeError, TypeError, ValueError, RuntimeError, IndexError):
                    # a candidate that does not fit this block's structure
                    continue
        return None
    finally:
        block.train(was_training)


def take_over_routing(layers: nn.ModuleList, indices: Sequence[int]) -> dict[int, str]:
    """Make the MoE blocks (`mlp` with an `nn.ModuleList` of experts) of `layers[i]`, i in
    `indices`, serve per-sample fast weights; returns {layer index: how} for each block.

    "softmax" / "module": the adapter's dispatch (`routed_forward`), where it reproduces the
    block's own forward (`find_routing`): one call per expert for the whole batch.
    "per_sample": any other routing code: the block's own forward, run once per sample with
    that sample's fast weights bound (`per_sample_forward`); exact, B times the calls.
    Module names and weights do not change.
    """
    how = {}
    for index in indices:
        block = getattr(layers[index], "mlp", None)
        if not has_routed_experts(block):
            continue
        routing = find_routing(block)
        if routing is not None:
            block.memdlm_routing = routing
            block.forward = types.MethodType(_routed_block_forward, block)
            how[index] = routing.router
        else:
            block.memdlm_own_forward = block.forward
            block.memdlm_train_for_grad = _eval_mode_cuts_gradient(block)
            block.forward = types.MethodType(per_sample_forward, block)
            how[index] = "per_sample"
        block.memdlm_dispatch = how[index]
    return how


def _routed_block_forward(block: nn.Module, hidden_states: torch.Tensor, *args, **kwargs):
    """The forward installed on a taken-over block (MoE blocks take the hidden states only)."""
    del args, kwargs
    return routed_forward(block, block.memdlm_routing, hidden_states)


def per_sample_forward(block: nn.Module, hidden_states: torch.Tensor, *args, **kwargs):
    """The block's own forward, once per sample under that sample's fast weights.

    With a per-sample fast-weight state of batch B bound (`memory.per_sample_size`), sample b's
    rows (and any tensor argument with leading dim B) go through the block's own forward inside
    `memory.one_sample(block, b)`, so routed experts, which see flattened (tokens, H) rows, meet
    sample b's fast weights; outputs are concatenated along dim 0, which gives the block's own
    shapes for (B, ...) and flattened (B L, ...) outputs alike (0-dim outputs, auxiliary losses
    over tokens, are averaged). Without a per-sample state: one call, as the block is.
    While gradients are on, a block whose eval-mode dispatch cuts them (LLaDA2's no_grad
    `moe_infer`) runs its train-mode dispatch, which computes the same values.
    """
    own = block.memdlm_own_forward
    with _train_mode_for_grad(block):
        batch = mm.per_sample_size(block)
        if batch is None:
            return own(hidden_states, *args, **kwargs)
        if hidden_states.shape[0] != batch:
            raise UserError(
                f"MoE block got hidden states {tuple(hidden_states.shape)} but the bound "
                f"per-sample fast weights have batch size {batch}"
            )
        outs = []
        for b in range(batch):
            row = [_row(a, b, batch) for a in args]
            with mm.one_sample(block, b):
                outs.append(own(hidden_states[b : b + 1], *row, **kwargs))
        return _concat(outs)


def _row(value, b: int, batch: int):
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return value[b : b + 1]
    return value


def _concat(outs: list):
    """Per-sample outputs joined back: tensors along dim 0 (0-dim ones averaged), tuples and
    lists item by item, anything else taken from the first sample."""
    first = outs[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(outs).mean(0) if first.dim() == 0 else torch.cat(outs, dim=0)
    if isinstance(first, (tuple, list)):
        return type(first)(_concat([o[i] for o in outs]) for i in range(len(first)))
    return first


@contextlib.contextmanager
def _train_mode_for_grad(block: nn.Module):
    switch = block.memdlm_train_for_grad and torch.is_grad_enabled() and not block.training
    if switch:
        block.train()
    try:
        yield
    finally:
        if switch:
            block.eval()


def _eval_mode_cuts_gradient(block: nn.Module) -> bool:
    """Whether the block's eval-mode forward gives its routed experts no gradient (LLaDA2's
    `moe_infer` runs under no_grad), found on a probe."""
    was_training = block.training
    block.eval()
    try:
        with torch.enable_grad():
            out = block(_probe(block))
            y = out[0] if isinstance(out, tuple) else out
            params = [p for p in block.experts.parameters() if p.requires_grad]
            if not y.requires_grad or not params:
                return bool(params)
            grads = torch.autograd.grad(y.sum(), params, allow_unused=True)
        return all(g is None for g in grads)
    finally:
        block.train(was_training)
