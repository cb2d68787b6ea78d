"""Hugging Face backbones for the recipe (optional extra `hf`: transformers, safetensors, peft).

`--model.path FOLDER` replaces the reference Transformer with a local Hugging Face model and its
tokenizer: LLaDA-style masked diffusion models (`model.trust_remote_code=true`), BERT/ModernBERT
masked LMs, or a Llama/Qwen-style decoder whose attention is made bidirectional. `HFDenoiser`
gives any of them the interface the recipe uses (method.py, evaluate.py):

- `model(x) -> logits` (B, L, V), bidirectional attention;
- `model.layers`: the decoder/encoder layer stack, found in the module tree;
- `hidden_states(x, upto=k)` / `logits_from(h, start=k)`: the split forward that lets the inner
  loop run layers < k once per state without gradient. It drives the model's OWN forward with
  hooks (stop at layer k; resume at layer k with the layer stack cut to layers[k:] and the
  embedding output replaced by h), so it works for remote code it has never seen, and it is
  checked against the full forward when the model is wrapped. If the check fails (a model whose
  layers depend on their index, say), the wrapper falls back to full forwards: `hidden_states`
  returns the tokens and `logits_from` runs the whole model (correct, slower inner loop);
- `fast_weight_targets(fraction, modules)`: the FFN linears of the last `fraction` of layers
  (gate/up/down_proj or the architecture's equivalents; every routed expert of a MoE layer gets
  its own fast LoRA, and `mlp.shared_experts` too, as in the reference code). Experts stored as
  fused 3-D tensors (transformers >= 5) are first rewritten as one `nn.Linear` per projection and
  expert (`UnfusedExperts`), in those layers only.

The LLaDA family's remote code (transformers 4.57 line) is recognised by `config.model_type`
(`detect_family`): each family gets the mask it needs (`MASK_STYLE`: LLaDA2 and causal decoders
always an additive 4-D mask, so no causal mask is ever built; Dream a bool one), Dream's logits
are shifted back so that position i predicts token i, LLaDA2 (and any family taking a 4-D
mask) can sample block-causally (`attention="block_causal"`), and MoE blocks with an
`nn.ModuleList` of experts get the adapter's own dispatch in the fast-weight layers
(`take_over_routing`, checked against the block's own forward): each expert sees its tokens as
(B, n, H) rows grouped by sample, in train and eval mode. `HFDenoiser.describe()` /
`description()` say which path is taken.

Outer LoRA (`model.lora_rank > 0`) goes through `peft`; fast weights then sit on the frozen base
projection (`...gate_proj.base_layer`) under the outer LoRA, as in the reference code.
"""

from __future__ import annotations

import collections
import contextlib
import re
import types
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

DEFAULT_FFN = ("gate_proj", "up_proj", "down_proj")
# The FFN projections of a layer, relative to the layer, for the layouts we know: Llama, Qwen,
# Mistral, OLMoE, LLaDA-MoE (gate/up/down_proj); Mixtral's w1/w2/w3; LLaDA-8B / OLMo
# (ff_proj, up_proj, ff_out); ModernBERT (mlp.Wi, mlp.Wo); BERT (intermediate.dense, output.dense).
FFN_PATTERN = re.compile(
    r"(?:.*\.)?(?:gate_proj|up_proj|down_proj|w1|w2|w3|ff_proj|ff_out)"
    r"|(?:.*\.)?mlp\.(?:Wi|Wo)|intermediate\.dense|output\.dense"
)
MASK_TOKENS = ("<|mdm_mask|>", "<|mask|>", "[MASK]", "<mask>")


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the wanted hidden states are captured."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden


def _require_transformers():
    try:
        import transformers
    except ImportError:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "Hugging Face backbones need the optional extra: pip install 'memdlm-toolkit[hf]' "
            "(transformers, safetensors, peft)"
        ) from None
    return transformers


# --------------------------------------------------------------------------- structure


def find_layer_stack(model: nn.Module) -> str:
    """Dotted path of the model's layer stack: the `nn.ModuleList` of same-class blocks that
    holds the most parameters (experts lists are inside it, so they never win)."""
    best, best_size = None, -1
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(block) for block in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > best_size:
            best, best_size = name, size
    if best is None:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of layers")
    return best


def make_bidirectional(model: nn.Module) -> None:
    """Full attention for a masked diffusion model: a causal decoder config (`is_causal`, used by
    transformers' mask builders) and attention modules' `is_causal` flags are turned off."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and getattr(config, "is_causal", None) is not False:
            with contextlib.suppress(AttributeError):  # a frozen or foreign config object
                config.is_causal = False
        if getattr(module, "is_causal", False) is True:
            module.is_causal = False


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


def _is_fused_experts(module: nn.Module) -> bool:
    gate_up = getattr(module, "gate_up_proj", None)
    return isinstance(gate_up, nn.Parameter) and gate_up.dim() == 3


def unfuse_experts(layers: nn.ModuleList, indices: Sequence[int]) -> int:
    """Rewrite fused experts in `layers[i]` for i in `indices` as `UnfusedExperts`; returns how
    many blocks were rewritten. Layouts other than concatenated [gate; up], untransposed and
    bias-free are refused (ValueError), since their weights would be split wrongly."""
    count = 0
    for index in indices:
        for name, module in list(layers[index].named_modules()):
            if not _is_fused_experts(module):
                continue
            layout = {k: getattr(module, k, d) for k, d in _FUSED_LAYOUT.items()}
            if layout != _FUSED_LAYOUT or not hasattr(module, "act_fn"):
                raise ValueError(
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


def first_fast_index(num_layers: int, fraction: float) -> int:
    """The reference code's first fast-weight layer, int(L (1 - fraction)), at most L - 1."""
    return min(int(num_layers * (1 - fraction)), num_layers - 1)


# --------------------------------------------------------------------------- routed experts


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


@dataclass(frozen=True)
class Routing:
    """How a MoE block with an `nn.ModuleList` of experts routes, as found by `take_over_routing`.

    router: "softmax" (`gate` is an nn.Linear: top-k of the softmax, LLaDA-MoE / Qwen2-MoE /
    OLMoE) or "module" (`gate(hidden)` returns (index, weights, logits) itself, LLaDA2.x).
    normalize: divide the top-k softmax weights by their sum. bias: add `expert_bias` to the
    softmax before the top-k (and keep it in the weights, as LLaDA-MoE). shared: "none",
    "gated" (Qwen2-MoE's `shared_expert` times sigmoid(`shared_expert_gate`)) or "plain"
    (LLaDA2's `shared_experts`). output: what the block returns: "tensor", "logits"
    ((y, router logits)) or "llada2" ((y, (router logits, index))).
    """

    router: str
    normalize: bool = False
    bias: bool = False
    shared: str = "none"
    output: str = "tensor"


def _route(block: nn.Module, routing: Routing, hidden: torch.Tensor):
    """(index (T, k), weights (T, k), router logits) of hidden (B, L, H) under `routing`."""
    if routing.router == "module":
        index, weights, logits = block.gate(hidden)
        return index.reshape(-1, index.shape[-1]), weights.reshape(index.shape), logits
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

    Same value as the block's own forward (checked by `take_over_routing`), but every expert
    sees (B, n, H) rows grouped by sample, in train and eval mode alike (LLaDA2's eval-mode
    dispatch runs under no_grad, which would cut the inner loop's gradient to the experts).
    """
    index, weights, logits = _route(block, routing, hidden)
    y = routed_sum(block.experts, hidden, index, weights).reshape(hidden.shape)
    if routing.shared == "gated":
        y = y + torch.sigmoid(block.shared_expert_gate(hidden)) * block.shared_expert(hidden)
    elif routing.shared == "plain":
        y = y + block.shared_experts(hidden)
    if routing.output == "logits":
        return y, logits
    if routing.output == "llada2":
        return y, (logits.reshape(*hidden.shape[:-1], -1), index)
    return y


def _routing_candidates(block: nn.Module, output: str) -> list[Routing]:
    """The routings a block's structure allows, most likely first."""
    if isinstance(getattr(block, "shared_expert_gate", None), nn.Module):
        shared = "gated"
    elif isinstance(getattr(block, "shared_experts", None), nn.Module):
        shared = "plain"
    else:
        shared = "none"
    if not isinstance(block.gate, nn.Linear):
        return [Routing("module", shared=shared, output=output)]
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
        return "llada2" if isinstance(out[1], tuple) else "logits"
    return None


def _same(a, b, dtype) -> bool:
    if isinstance(a, tuple):
        return (
            isinstance(b, tuple)
            and len(a) == len(b)
            and all(_same(x, y, dtype) for x, y in zip(a, b))
        )
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or a.shape != b.shape:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    tol = 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2
    return torch.allclose(a.float(), b.float(), rtol=tol, atol=tol)


def find_routing(block: nn.Module) -> Routing | None:
    """The `Routing` whose `routed_forward` reproduces `block`'s own forward on a random probe
    (eval mode, no gradient), or None (then the block is left as it is)."""
    experts = getattr(block, "experts", None)
    gate = getattr(block, "gate", None)
    if not isinstance(experts, nn.ModuleList) or not isinstance(gate, nn.Module):
        return None
    weight = next(block.parameters())
    generator = torch.Generator().manual_seed(0)
    width = experts[0].gate_proj.in_features if hasattr(experts[0], "gate_proj") else None
    if width is None:
        return None
    probe = torch.randn(2, 7, width, generator=generator).to(weight.device, weight.dtype)
    was_training = block.training
    block.eval()
    try:
        with torch.no_grad():
            expected = block(probe)
            kind = _output_kind(expected)
            if kind is None:
                return None
            for routing in _routing_candidates(block, kind):
                try:
                    if _same(expected, routed_forward(block, routing, probe), weight.dtype):
                        return routing
                except Exception:  # a candidate that does not fit this block's structure
                    continue
        return None
    finally:
        block.train(was_training)


def take_over_routing(layers: nn.ModuleList, indices: Sequence[int]) -> list[int]:
    """Give the MoE blocks (`mlp` with an `nn.ModuleList` of experts) of `layers[i]`, i in
    `indices`, the adapter's dispatch (`routed_forward`) when it reproduces their own forward;
    returns the indices of the layers taken over. Module names and weights do not change."""
    taken = []
    for index in indices:
        block = getattr(layers[index], "mlp", None)
        if block is None or isinstance(getattr(block, "experts", None), UnfusedExperts):
            continue
        routing = find_routing(block)
        if routing is None:
            continue
        block.memdlm_routing = routing
        block.forward = types.MethodType(_routed_block_forward, block)
        taken.append(index)
    return taken


def _routed_block_forward(block: nn.Module, hidden_states: torch.Tensor, *args, **kwargs):
    """The forward installed on a taken-over block (MoE blocks take the hidden states only)."""
    del args, kwargs
    return routed_forward(block, block.memdlm_routing, hidden_states)


# --------------------------------------------------------------------------- families

FAMILIES = ("llada", "llada_moe", "llada2", "dream", "decoder", "encoder")
ATTENTION = ("bidirectional", "block_causal")


def detect_family(model: nn.Module) -> str:
    """The backbone family, from `config.model_type` (the LLaDA family's remote code) or the
    architecture: "decoder" for a causal LM made bidirectional, else "encoder" (masked LM)."""
    config = getattr(model, "config", None)
    kind = str(getattr(config, "model_type", "") or "").lower().replace("-", "_")
    if kind.startswith("llada2"):
        return "llada2"
    if kind in ("lladamoe", "llada_moe"):
        return "llada_moe"
    if kind == "llada":
        return "llada"
    if kind == "dream":
        return "dream"
    names = [type(m).__name__ for m in model.modules()][:3]  # a peft wrapper, then the model
    return "decoder" if any(n.endswith("ForCausalLM") for n in names) else "encoder"


# How each family takes an attention mask (llada-family-backbones.md section 2):
# "padding": a 2-D (B, L) 0/1 mask or None (LLaDA, LLaDA-MoE, BERT-likes);
# "bool": None, or a 4-D bool (B, 1, L, L) of allowed keys (Dream casts any 3-D/4-D mask to bool,
#   so an additive mask would be inverted; from a 2-D mask it would also hide pad queries);
# "additive": a 4-D additive float mask (B, 1, L, L), always given, so that the model never
#   builds its own mask (LLaDA2 turns a 2-D mask with padding into a causal one; transformers
#   4.57's decoders build a causal mask whatever `is_causal` says).
MASK_STYLE = {
    "llada": "padding",
    "llada_moe": "padding",
    "llada2": "additive",
    "dream": "bool",
    "decoder": "additive",
    "encoder": "padding",
}


def allowed_keys(
    attention_mask: torch.Tensor | None, shape, *, attention: str, block_size: int, device
) -> torch.Tensor | None:
    """(B, L, L) bool: query i may attend to key j; None when everything is visible.

    attention_mask (B, L) 1 = real token, or None. "block_causal": bidirectional inside blocks
    of `block_size` positions, causal across blocks (key block <= query block)."""
    rows, length = shape
    allowed = None
    if attention == "block_causal":
        block = torch.arange(length, device=device) // block_size
        allowed = (block[None, :] <= block[:, None]).expand(rows, length, length)
    if attention_mask is not None and not bool(attention_mask.bool().all()):
        keys = attention_mask.bool()[:, None, :].expand(rows, length, length)
        allowed = keys if allowed is None else allowed & keys
    return allowed


def additive_mask(allowed: torch.Tensor | None, shape, dtype, device) -> torch.Tensor:
    """(B, 1, L, L) additive float mask: 0 where allowed, the dtype's minimum elsewhere."""
    rows, length = shape
    if allowed is None:
        return torch.zeros(rows, 1, length, length, dtype=dtype, device=device)
    zero = torch.zeros((), dtype=dtype, device=device)
    low = torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=device)
    return torch.where(allowed[:, None], zero, low)


# --------------------------------------------------------------------------- the wrapper


class HFDenoiser(nn.Module):
    """A Hugging Face model as a denoiser, tokens (B, L) -> logits (B, L, V); see module doc.

    Position i's logits predict token i for every family: Dream's logits (position i - 1
    predicts token i) are shifted back here, in `forward` and hence in `logits_from`.

    Args:
        model: a loaded model (masked LM, bidirectional decoder, the LLaDA family's remote code,
            or a `peft` model of either) whose output has `.logits`.
        verify_split: check the split forward against the full forward now (one short forward
            per checked split point); if it does not match, use full forwards (`split` False).
        attention: "bidirectional" (training, and LLaDA/LLaDA-MoE/Dream sampling) or
            "block_causal" (LLaDA2.x's sampler: bidirectional inside blocks of `block_size`,
            causal across blocks), for the families that take a 4-D mask.
        block_size: positions per block of "block_causal".
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        verify_split: bool = True,
        attention: str = "bidirectional",
        block_size: int = 32,
    ):
        super().__init__()
        if any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()):
            raise ValueError(
                "the model has activation checkpointing on; fast weights are bound only during "
                "the forward pass, so a recomputation in backward would not see them: call "
                "model.gradient_checkpointing_disable() first"
            )
        self.hf = model
        config = getattr(model, "config", None)
        if getattr(config, "use_cache", None):  # LLaDA2's default True builds a cache per call
            config.use_cache = False
        self.family = detect_family(model)
        self.mask_style = MASK_STYLE[self.family]
        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}")
        if attention == "block_causal" and self.mask_style == "padding":
            raise ValueError(
                f"attention='block_causal' needs a model that takes a 4-D mask; the {self.family} "
                "family takes only a 2-D padding mask (use attention='bidirectional')"
            )
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
        self.attention, self.block_size = attention, block_size
        self.shift = self.family == "dream"  # its logits at i - 1 predict token i
        self.layers_path = find_layer_stack(model)
        self.split = False
        self.split_note = "not verified (verify_split=False)"
        self._embedding: nn.Module | None = None
        if verify_split:
            self.split = self._setup_split()

    @property
    def layers(self) -> nn.ModuleList:
        return self.hf.get_submodule(self.layers_path)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """Logits (B, L, V) of tokens x (B, L); attention_mask (B, L), 1 = real token."""
        out = self.hf(input_ids=x, **self.model_inputs(x, attention_mask))
        logits = out.logits if hasattr(out, "logits") else out[0]
        if self.shift:  # Dream: the output at i - 1 predicts token i; position 0 keeps its own
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        return logits

    def model_inputs(self, x: torch.Tensor, attention_mask: torch.Tensor | None) -> dict:
        """The keyword arguments that give the model this wrapper's attention (`mask_style`)."""
        inputs: dict[str, Any] = {}
        if self.mask_style == "padding":
            inputs["attention_mask"] = attention_mask
            return inputs
        allowed = allowed_keys(
            attention_mask,
            x.shape,
            attention=self.attention,
            block_size=self.block_size,
            device=x.device,
        )
        if self.mask_style == "bool":
            inputs["attention_mask"] = None if allowed is None else allowed[:, None]
        else:
            dtype = self._compute_dtype()
            inputs["attention_mask"] = additive_mask(allowed, x.shape, dtype, x.device)
        return inputs

    @contextlib.contextmanager
    def attention_mode(self, attention: str, block_size: int | None = None):
        """Within the block, forwards use `attention` (e.g. "block_causal" for LLaDA2's
        sampler while training stays bidirectional); the previous mode is restored after."""
        previous = (self.attention, self.block_size)
        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}")
        if attention == "block_causal" and self.mask_style == "padding":
            raise ValueError(f"attention='block_causal' is not available for {self.family}")
        if block_size is not None and (isinstance(block_size, bool) or block_size < 1):
            raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
        self.attention = attention
        self.block_size = previous[1] if block_size is None else block_size
        try:
            yield self
        finally:
            self.attention, self.block_size = previous

    def _compute_dtype(self) -> torch.dtype:
        """The attention's dtype: the autocast dtype when autocast is on, else the weights'."""
        device = next(self.hf.parameters()).device
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
        return next(p.dtype for p in self.hf.parameters() if p.is_floating_point())

    # ----------------------------------------------------------------- split forward
    def hidden_states(self, x, attention_mask=None, *, upto: int):
        """Input of `layers[upto]` (B, L, D); without a verified split, the tokens themselves."""
        if not self.split:
            return x
        self._check_index("upto", upto)
        return self._capture(x, attention_mask, upto)

    def logits_from(self, h, attention_mask=None, *, start: int):
        """`layers[start:]` and the head applied to `h`; without a split, `h` are tokens."""
        if not self.split:
            return self(h, attention_mask)
        self._check_index("start", start)
        parent_path, _, name = self.layers_path.rpartition(".")
        parent = self.hf.get_submodule(parent_path) if parent_path else self.hf
        full = self.layers
        dummy = torch.zeros(h.shape[:2], dtype=torch.long, device=h.device)
        handle = self._embedding.register_forward_hook(lambda m, a, out: h)
        setattr(parent, name, nn.ModuleList(list(full)[start:]))
        try:
            return self(dummy, attention_mask)
        finally:
            setattr(parent, name, full)
            handle.remove()

    def _capture(self, x, attention_mask, index: int) -> torch.Tensor:
        def stop(module, args, kwargs):
            raise _Stop(args[0] if args else kwargs["hidden_states"])

        handle = self.layers[index].register_forward_pre_hook(stop, with_kwargs=True, prepend=True)
        try:
            self(x, attention_mask)
        except _Stop as stopped:
            return stopped.hidden
        finally:
            handle.remove()
        raise RuntimeError(f"layer {index} of {self.layers_path} was never called")

    def _check_index(self, name: str, value: int) -> None:
        if not 0 <= value < len(self.layers):
            raise ValueError(f"{name} must be in [0, {len(self.layers)}), got {value}")

    def _setup_split(self) -> bool:
        """Find the module whose output enters layer 0, then compare split and full forwards;
        `split_note` says what was found (or why the full forward is used)."""
        was_training = self.training
        self.eval()
        try:
            probe = self._probe_input()
            with torch.no_grad():
                self._embedding = self._embedding_module(probe)
                if self._embedding is None:
                    self.split_note = "no module's output is exactly layer 0's input"
                    return False
                self.split = True
                full = self(probe)
                points = sorted({len(self.layers) // 2, len(self.layers) - 1})
                for start in points:
                    hidden = self.hidden_states(probe, upto=start)
                    if not torch.allclose(
                        self.logits_from(hidden, start=start), full, rtol=1e-3, atol=1e-4
                    ):
                        self.split_note = f"resuming at layer {start} changed the logits"
                        return False
                self.split_note = f"checked against the full forward at layers {points}"
                return True
        except Exception as error:  # a model the hooks cannot drive: full forwards are correct
            self.split_note = f"the split forward raised {type(error).__name__}: {error}"[:200]
            return False
        finally:
            self.split = False
            self.train(was_training)

    def _probe_input(self) -> torch.Tensor:
        """(1, 12) random tokens below the vocabulary size (config's, else the embedding's)."""
        vocab = getattr(getattr(self.hf, "config", None), "vocab_size", None)
        if not isinstance(vocab, int) or vocab < 1:
            vocab = self.hf.get_input_embeddings().num_embeddings
        device = next(self.hf.parameters()).device
        generator = torch.Generator().manual_seed(0)
        return torch.randint(0, vocab, (1, 12), generator=generator).to(device)

    def _embedding_module(self, probe) -> nn.Module | None:
        """The last module to finish before layer 0 starts whose output is layer 0's input."""
        stack = self.layers
        inside = {id(m) for m in stack.modules()}
        finished: list[tuple[nn.Module, Any]] = []
        handles = [
            m.register_forward_hook(lambda mod, args, out: finished.append((mod, out)))
            for m in self.hf.modules()
            if id(m) not in inside and m is not self.hf
        ]
        try:
            first_input = self._capture(probe, None, 0)
        finally:
            for handle in handles:
                handle.remove()
        for module, out in reversed(finished):
            if (
                isinstance(out, torch.Tensor)
                and out.shape == first_input.shape
                and torch.equal(out, first_input)
            ):
                return module
        return None

    # ----------------------------------------------------------------- fast-weight targets
    def fast_weight_targets(self, fraction: float, modules: Sequence[str] = DEFAULT_FFN):
        """Names (from this wrapper) of the FFN linears in the last `fraction` of layers.

        `modules` equal to the default (gate/up/down_proj) means "the FFN projections" of any
        known layout (FFN_PATTERN); other names are matched against the last name component.
        In a MoE layer only `mlp.experts.*` and `mlp.shared_experts.*` are taken (the reference
        code's rule). Outer-LoRA layers are looked through to their `base_layer`.
        """
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        stack = self.layers
        start = first_fast_index(len(stack), fraction)
        default = tuple(modules) == DEFAULT_FFN
        names = []
        for index in range(start, len(stack)):
            layer = stack[index]
            if any(_is_fused_experts(m) for m in layer.modules()):
                raise ValueError(
                    f"layer {index} still holds fused experts; wrap the model with "
                    f"layer_fraction >= {fraction} (hf.load_model / hf.wrap unfuse them)"
                )
            moe = _has_expert_list(layer)
            for name, module in layer.named_modules():
                if not isinstance(module, nn.Linear) or "lora_" in name:
                    continue  # peft's own adapter matrices are not targets
                logical = name.removesuffix(".base_layer")  # the frozen linear under peft
                if moe and not logical.startswith(("mlp.experts.", "mlp.shared_experts.")):
                    continue
                wanted = (
                    FFN_PATTERN.fullmatch(logical)
                    if default
                    else logical.rsplit(".", 1)[-1] in modules
                )
                if wanted:
                    names.append(f"hf.{self.layers_path}.{index}.{name}")
        if not names:
            raise ValueError(
                f"no FFN linear matches modules={tuple(modules)} in layers {start}.."
                f"{len(stack) - 1} of {self.layers_path}; set memdlm.targets to the model's names"
            )
        return names

    # ----------------------------------------------------------------- description
    def describe(self, fraction: float = 0.1, modules: Sequence[str] = DEFAULT_FFN) -> dict:
        """What the recipe runs on: family, forward path, attention, fast-weight modules.

        Returns {"family", "forward", "split", "split_note", "attention", "logit_shift",
        "mask_style", "fast_weights": count, "fast_weight_layers": [indices],
        "fast_weight_kinds": {relative name pattern: count}, "routing": {layer: router}}.
        """
        targets = self.fast_weight_targets(fraction, modules)
        prefix = f"hf.{self.layers_path}."
        layers, kinds = [], collections.Counter()
        for name in targets:
            index, _, rest = name[len(prefix) :].partition(".")
            if int(index) not in layers:
                layers.append(int(index))
            kinds[re.sub(r"\.\d+\.", ".*.", rest)] += 1
        routing = {
            i: layer.mlp.memdlm_routing.router
            for i, layer in enumerate(self.layers)
            if hasattr(getattr(layer, "mlp", None), "memdlm_routing")
        }
        first = first_fast_index(len(self.layers), fraction)
        forward = (
            f"split at layer {first} (layers < {first} once per inner state)"
            if self.split
            else f"full forward ({self.split_note})"
        )
        return {
            "family": self.family,
            "forward": forward,
            "split": self.split,
            "split_note": self.split_note,
            "attention": self.attention
            + (f" (blocks of {self.block_size})" if self.attention == "block_causal" else ""),
            "logit_shift": self.shift,
            "mask_style": self.mask_style,
            "fast_weights": len(targets),
            "fast_weight_layers": layers,
            "fast_weight_kinds": dict(kinds),
            "routing": routing,
        }

    def description(self, fraction: float = 0.1, modules: Sequence[str] = DEFAULT_FFN) -> str:
        """`describe` as one line, for the recipe to print at start."""
        d = self.describe(fraction, modules)
        kinds = ", ".join(f"{n} {k}" for k, n in d["fast_weight_kinds"].items())
        routed = f"; adapter MoE dispatch in layers {sorted(d['routing'])}" if d["routing"] else ""
        shift = "; logits shifted back by one (Dream)" if d["logit_shift"] else ""
        return (
            f"backbone {d['family']} ({type(self.hf).__name__}): {d['forward']}; "
            f"attention {d['attention']}{shift}; {d['fast_weights']} fast-weight modules in "
            f"layers {d['fast_weight_layers']} of {self.layers_path} ({kinds}){routed}"
        )


def broadcast_state(mem, state: dict[str, torch.Tensor], rows: int) -> dict[str, torch.Tensor]:
    """A per-sample fast-weight state of ONE sample (leading dim 1) for `rows` rows of it
    (e.g. the B x mc rows of `diffusion.elbo_log_likelihood` for one adapted prompt): every
    tensor expanded (a view, no copy) to leading dim `rows`, so each row, and each routed
    expert row of it, meets the same fast weights. mem: the `memory.FastWeights` the state
    belongs to (its `state_shapes`). A shared state (no batch dim) needs none."""
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise ValueError(f"rows must be an int >= 1, got {rows!r}")
    out = {}
    shapes = mem.state_shapes
    for key, value in state.items():
        if key not in shapes or tuple(value.shape) != (1, *shapes[key]):
            raise ValueError(
                f"state[{key!r}] has shape {tuple(value.shape)}; broadcast_state takes the "
                f"per-sample state of one sample, (1, *{shapes.get(key)})"
            )
        out[key] = value.expand(rows, *value.shape[1:])
    return out


def _has_expert_list(layer: nn.Module) -> bool:
    mlp = getattr(layer, "mlp", None)
    return isinstance(getattr(mlp, "experts", None), (nn.ModuleList, UnfusedExperts))


def wrap(model: nn.Module, *, layer_fraction: float = 0.1, verify_split: bool = True, **options):
    """An already loaded Hugging Face model as an `HFDenoiser`: bidirectional attention, fused
    experts of the last `layer_fraction` of layers unfused and ModuleList experts given the
    adapter's per-sample dispatch (`take_over_routing`), for per-expert fast weights.
    options: `HFDenoiser`'s (attention, block_size)."""
    make_bidirectional(model)
    stack = model.get_submodule(find_layer_stack(model))
    fast = range(first_fast_index(len(stack), layer_fraction), len(stack))
    unfuse_experts(stack, fast)
    take_over_routing(stack, fast)
    return HFDenoiser(model, verify_split=verify_split, **options)


# --------------------------------------------------------------------------- tokenizer


@dataclass(frozen=True)
class HFTokenizer:
    """A Hugging Face tokenizer with the recipe's tokenizer interface (see data.ByteTokenizer)."""

    tokenizer: Any
    mask_id: int
    eos_id: int
    pad_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids) -> str:
        """Text up to the first EOS, special tokens dropped."""
        ids = list(ids)
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def load_tokenizer(
    path: str | Path,
    *,
    mask_token: str | None = None,
    eos_token: str | None = None,
    trust_remote_code: bool = False,
    vocab_size: int | None = None,
) -> HFTokenizer:
    """The folder's tokenizer. Mask: `mask_token`, the tokenizer's mask token, or one of
    MASK_TOKENS in its vocabulary (LLaDA's `<|mdm_mask|>`, LLaDA-MoE's `<|mask|>`); EOS:
    `eos_token`, the tokenizer's EOS, else its SEP (BERT); padding: PAD, else EOS."""
    transformers = _require_transformers()
    tok = transformers.AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    vocab = tok.get_vocab()

    def token_id(name: str, token: str) -> int:
        if token not in vocab:
            raise ValueError(f"model.{name}={token!r} is not in the tokenizer's vocabulary")
        return vocab[token]

    if mask_token is not None:
        mask_id = token_id("mask_token", mask_token)
    elif tok.mask_token_id is not None:
        mask_id = tok.mask_token_id
    else:
        found = [vocab[t] for t in MASK_TOKENS if t in vocab]
        if not found:
            raise ValueError(
                f"the tokenizer in {str(path)!r} has no mask token (looked for {MASK_TOKENS}); "
                "set model.mask_token"
            )
        mask_id = found[0]
    if eos_token is not None:
        eos_id = token_id("eos_token", eos_token)
    else:
        eos_id = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
        if eos_id is None:
            raise ValueError(
                f"the tokenizer in {str(path)!r} has no EOS or SEP; set model.eos_token"
            )
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else eos_id
    return HFTokenizer(tok, int(mask_id), int(eos_id), int(pad_id), vocab_size or len(tok))


# --------------------------------------------------------------------------- loading


def _auto_class(config):
    transformers = _require_transformers()
    auto_map = getattr(config, "auto_map", None) or {}
    for name in ("AutoModelForMaskedLM", "AutoModelForCausalLM", "AutoModel"):
        if name in auto_map:
            return getattr(transformers, name)
    architecture = (getattr(config, "architectures", None) or [""])[0]
    if "MaskedLM" not in architecture and architecture.endswith("LM"):
        return transformers.AutoModelForCausalLM
    return transformers.AutoModelForMaskedLM


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(cfg, *, device) -> HFDenoiser:
    """The recipe's model from `cfg.model.path` (see module doc). `cfg`: recipe `Config`."""
    transformers = _require_transformers()
    transformers.utils.logging.disable_progress_bar()  # the recipe reports its own progress
    m = cfg.model
    path = Path(m.path)
    if not path.is_dir():
        raise ValueError(f"model.path {m.path!r} is not a folder")
    config = transformers.AutoConfig.from_pretrained(
        str(path), trust_remote_code=m.trust_remote_code
    )
    config.use_cache = False
    options: dict[str, Any] = {"dtype": DTYPES[m.dtype], "trust_remote_code": m.trust_remote_code}
    if m.load_in_4bit:
        options["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        options["device_map"] = {"": torch.device(device).index or 0}
    model = _auto_class(config).from_pretrained(str(path), config=config, **options)
    if not m.load_in_4bit:
        model = model.to(device)
    make_bidirectional(model)
    stack = model.get_submodule(find_layer_stack(model))
    fast = range(first_fast_index(len(stack), cfg.memdlm.layer_fraction), len(stack))
    unfuse_experts(stack, fast)
    take_over_routing(stack, fast)
    if m.lora_rank > 0:
        model = add_outer_lora(
            model,
            rank=m.lora_rank,
            alpha=m.lora_alpha,
            dropout=m.lora_dropout,
            targets=m.lora_targets,
            kbit=m.load_in_4bit,
        )
    # Bidirectional for training and likelihoods; `model.sample_attention` applies while
    # sampling only (`HFBackbone.sampling_attention`).
    return HFDenoiser(model, block_size=m.sample_block_size)


def add_outer_lora(model, *, rank: int, alpha: float, dropout: float, targets, kbit=False):
    """Trainable LoRA on `targets` (peft names; ["all-linear"] = every linear but the head);
    everything else frozen. kbit: prepare a 4-bit model for training first (QLoRA)."""
    try:
        import peft
    except ImportError:  # pragma: no cover - exercised only without the extra
        raise ImportError("model.lora_rank > 0 needs peft (the optional extra 'hf')") from None
    if kbit:
        # No activation checkpointing: fast weights are bound only during the forward pass, so a
        # recomputation in backward would run without them (silently wrong gradients).
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    target_modules = "all-linear" if list(targets) == ["all-linear"] else list(targets)
    config = peft.LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, bias="none"
    )
    return peft.get_peft_model(model, config)


# --------------------------------------------------------------------------- data


class HFBackbone:
    """`Backbone` (base.py) view of an `HFDenoiser`: the split forward lives on the denoiser,
    the fused loss does not apply (logits path), and routed experts may stay unused in a step."""

    def __init__(self, denoiser: HFDenoiser):
        self.module = denoiser

    def fast_weight_targets(self, fraction: float, modules: Sequence[str]) -> tuple[str, ...]:
        return tuple(self.module.fast_weight_targets(fraction, tuple(modules)))

    def num_layers(self) -> int:
        return len(self.module.layers)

    def head_weight(self, loss_backend: str | None) -> torch.Tensor | None:
        del loss_backend
        return None

    def can_split_mid_layer(self, layer: int, targets: Sequence[str]) -> bool:
        del layer, targets
        return False

    def uses_every_parameter(self) -> bool:
        return False

    def sampling_attention(self, attention: str, block_size: int):
        return self.module.attention_mode(attention, block_size)

    def describe(self, fraction: float, modules: Sequence[str]) -> dict[str, Any]:
        info = self.module.describe(fraction, tuple(modules))
        info["fast_weight_modules"] = info["fast_weights"]
        info["line"] = self.module.description(fraction, tuple(modules))
        return info
