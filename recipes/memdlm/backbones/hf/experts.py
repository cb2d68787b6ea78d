"""MoE experts as the fast weights need them: fused 3-D experts unfused into `nn.Linear`s, and
`routed_sum`, the dispatch that gives each expert its tokens grouped by sample, (B, n, H).
How a MoE block is made to use it (or, failing that, run once per sample) is `routing.py`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from recipes.memdlm.errors import UserError


class UnfusedExperts(nn.Module):
    """A MoE layer's routed experts as separate `gate_proj`/`up_proj`/`down_proj` linears.

    Same computation as transformers' fused experts (weights `gate_up_proj` (E, 2I, H),
    `down_proj` (E, H, I)) in their eager form: for each expert e and the tokens routed to it,
    down_e(act(gate_e x) * up_e x) times the routing weight, summed over the top-k experts.
    forward(hidden (T, H), top_k_index (T, k), top_k_weights (T, k)) -> (T, H).

    The MoE block flattens its (B, L, H) input to T = B L tokens; a pre-hook on the block records
    B (`rows`), and each expert sees its tokens as (B, n, H), zero-padded to the sample with the
    most tokens routed to it. That leading batch dim is what per-sample fast weights need (sample
    b's tokens meet sample b's LoRA); the padded rows are computed and dropped.
    """

    def __init__(self, fused: nn.Module):
        gate_up, down = fused.gate_up_proj, fused.down_proj
        experts, inner, hidden = gate_up.shape[0], gate_up.shape[1] // 2, gate_up.shape[2]
        super().__init__()
        self.num_experts = experts
        for e in range(experts):  # children "0", "1", ...: names like mlp.experts.3.gate_proj
            self.add_module(str(e), _ExpertMLP(hidden, inner, gate_up.dtype).to(gate_up.device))
        with torch.no_grad():
            for e, expert in enumerate(self.experts()):
                expert.gate_proj.weight.copy_(gate_up[e, :inner])
                expert.up_proj.weight.copy_(gate_up[e, inner:])
                expert.down_proj.weight.copy_(down[e])
        self.act_fn = fused.act_fn
        self.rows = 1

    def experts(self) -> list[nn.Module]:
        return [self._modules[str(e)] for e in range(self.num_experts)]

    def remember_rows(self, block: nn.Module, args) -> None:
        """Forward pre-hook of the MoE block: its input's batch size."""
        del block
        hidden = args[0] if args else None
        self.rows = hidden.shape[0] if isinstance(hidden, torch.Tensor) and hidden.dim() == 3 else 1

    def forward(self, hidden_states, top_k_index, top_k_weights):
        tokens = hidden_states.shape[0]
        rows = self.rows if tokens % self.rows == 0 else 1
        sample_of = torch.arange(tokens, device=hidden_states.device) // (tokens // rows)
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self.experts()):
            token, slot = torch.where(top_k_index == e)  # token ids ascending
            if token.numel() == 0:
                continue
            sample = sample_of[token]
            counts = torch.bincount(sample, minlength=rows)
            position = torch.arange(len(token), device=token.device)
            position = position - (counts.cumsum(0) - counts)[sample]  # index within its sample
            x = hidden_states.new_zeros(rows, int(counts.max()), hidden_states.shape[1])
            x[sample, position] = hidden_states[token]
            y = expert.down_proj(self.act_fn(expert.gate_proj(x)) * expert.up_proj(x))
            routed = y[sample, position] * top_k_weights[token, slot, None]
            out.index_add_(0, token, routed.to(out.dtype))
        return out


class _ExpertMLP(nn.Module):
    def __init__(self, hidden: int, inner: int, dtype):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False, dtype=dtype)
        self.up_proj = nn.Linear(hidden, inner, bias=False, dtype=dtype)
        self.down_proj = nn.Linear(inner, hidden, bias=False, dtype=dtype)


def is_fused_experts(module: nn.Module) -> bool:
    gate_up = getattr(module, "gate_up_proj", None)
    return isinstance(gate_up, nn.Parameter) and gate_up.dim() == 3


def unfuse_experts(layers: nn.ModuleList, indices: Sequence[int]) -> int:
    """Rewrite fused experts in `layers[i]` for i in `indices` as `UnfusedExperts`; returns how
    many blocks were rewritten. Layouts other than concatenated [gate; up], untransposed and
    bias-free are refused (ValueError), since their weights would be split wrongly."""
    count = 0
    for index in indices:
        for name, module in list(layers[index].named_modules()):
            if not is_fused_experts(module):
                continue
            layout = {k: getattr(module, k, d) for k, d in _FUSED_LAYOUT.items()}
            if layout != _FUSED_LAYOUT or not hasattr(module, "act_fn"):
                raise UserError(
                    f"layer {index}: experts {name!r} have layout {layout}; only "
                    f"{_FUSED_LAYOUT} with act_fn can be given one fast LoRA per expert"
                )
            parent_name, _, attr = name.rpartition(".")
            parent = layers[index].get_submodule(parent_name) if parent_name else layers[index]
            experts = UnfusedExperts(module)
            setattr(parent, attr, experts)
            parent.register_forward_pre_hook(experts.remember_rows)
            count += 1
    return count


_FUSED_LAYOUT = {"is_concatenated": True, "is_transposed": False, "has_bias": False}


def routed_sum(experts, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor):
    """sum_k weights[t, k] expert_{index[t, k]}(hidden_t) for every token t, by sample.

    hidden (B, L, H); index, weights (B L, k). Each expert e is called once, on its tokens
    grouped by sample as (B, n, H) (zero-padded to the sample with the most tokens routed to
    e), so a per-sample fast weight at any linear inside an expert meets sample b's tokens in
    row b, whatever the batch size. Experts that get no token are not called (the padded rows
    are computed and dropped). Returns (B L, H) in hidden's dtype.
    """
    rows, length, width = hidden.shape
    flat = hidden.reshape(rows * length, width)
    out = torch.zeros_like(flat)
    for e, expert in enumerate(experts):
        token, slot = torch.where(index == e)  # token ids ascending
        if token.numel() == 0:
            continue
        sample = token // length
        counts = torch.bincount(sample, minlength=rows)
        position = torch.arange(len(token), device=token.device)
        position = position - (counts.cumsum(0) - counts)[sample]  # index within its sample
        x = flat.new_zeros(rows, int(counts.max()), width)
        x[sample, position] = flat[token]
        y = expert(x)[sample, position] * weights[token, slot, None].to(flat.dtype)
        out.index_add_(0, token, y.to(out.dtype))
    return out
