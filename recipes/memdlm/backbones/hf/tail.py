"""The position-wise end of a Hugging Face model, proven on a probe before it is used.

A pre-norm decoder's last layer ends, after its attention, in computation that acts on each
position alone: with h the post-attention residual (B, L, D),

    out = h + FFN(norm(h)),     logits = W_head final_norm(out)

(Llama and the Hugging Face decoders, Dream and LLaDA-MoE: `post_attention_layernorm` then `mlp`,
LLaDA-MoE adding `shared_expert(norm(h))`; LLaDA2.x: an `mlp` that returns (y, router info);
LLaDA-8B: `ff_norm`, then `ff_out(act(ff_proj(x)) * up_proj(x))` and the residual dropout).
A MoE `mlp` routes each token alone (top-k of its own scores, no capacity), so it is position-wise
too; its auxiliary outputs (router logits) are not part of the recipe's loss, which reads the
logits only. So a loss that scores few positions needs this tail on those rows only (the
scored-rows tail, `Backbone.position_wise_after`, `method.losses.tail_on_rows`).

Nothing here is assumed: `find_tail` names the modules by the family's layout, and `prove_tail`
runs the tail on a probe, on every row and on a subset of rows, against the model's own full
forward. A model whose tail differs (a post-norm layer, a norm after the FFN, logit scaling or
softcapping, MoE capacity that makes tokens compete) fails the probe and keeps the full tail.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import memory as mm
from recipes.memdlm.backbones.hf.hooks import stop_at

# The layouts of a last layer whose FFN sub-block follows its attention (module doc):
# kind -> (the norm whose input is the post-attention residual, the FFN's names in the layer).
LAYOUTS = {
    "pre_norm": ("post_attention_layernorm", ("mlp.", "shared_expert.")),
    "llada": ("ff_norm", ("ff_proj", "up_proj", "ff_out")),
}
FINAL_NORMS = ("norm", "ln_f", "final_layernorm", "norm_f")
# A dense gated FFN's two input-side linears (both read the entry norm's output), per layout.
FFN_INPUTS = {"pre_norm": ("mlp.gate_proj", "mlp.up_proj"), "llada": ("ff_proj", "up_proj")}


@dataclass(frozen=True)
class FFNEntry:
    """The start of the last layer's FFN on some rows, computed once and shared by forwards of
    the tail under different fast-weight states (or none): the post-attention residual rows
    (N, 1, D), the entry norm's output and the base products of the FFN's two input-side
    linears, (N, 1, F) each, without any fast-weight correction (`Tail.ffn_entry`)."""

    rows: torch.Tensor
    normed: torch.Tensor
    products: tuple[torch.Tensor, torch.Tensor]

    def detached(self) -> FFNEntry:
        gate, up = self.products
        return FFNEntry(self.rows.detach(), self.normed.detach(), (gate.detach(), up.detach()))


@dataclass(frozen=True)
class Tail:
    """Where a model's position-wise tail lives (names, so that a wrapper never holds modules).

    kind: a key of LAYOUTS; final_norm, head: dotted names in the Hugging Face model (`hf`); the
    head is the module whose (V, D) weight projects the final norm's output (an `nn.Linear`
    without bias, or the input embedding of a tied model such as LLaDA with `weight_tying`).
    """

    kind: str
    final_norm: str
    head: str

    def entry(self, layer: nn.Module) -> nn.Module:
        """The norm of `layer` whose input is the post-attention residual h."""
        return getattr(layer, LAYOUTS[self.kind][0])

    def is_ffn(self, name: str) -> bool:
        """Whether a module name relative to the layer lies in the FFN sub-block."""
        return name.startswith(LAYOUTS[self.kind][1])

    def layer_out(self, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        """The layer's output from its post-attention residual h (..., D): h + FFN(norm(h))."""
        normed = self.entry(layer)(h)
        if self.kind == "llada":
            ffn = layer.ff_out(layer.act(layer.ff_proj(normed)) * layer.up_proj(normed))
            return h + layer.dropout(ffn)
        out = layer.mlp(normed)
        out = out[0] if isinstance(out, tuple) else out  # LLaDA2.x: (y, router info)
        shared = getattr(layer, "shared_expert", None)  # LLaDA-MoE: on the layer, not in mlp
        if isinstance(shared, nn.Module):
            out = out + shared(normed)
        return h + out

    def ffn_inputs(self, layer: nn.Module) -> tuple[nn.Linear, nn.Linear] | None:
        """The two input-side linears of `layer`'s FFN when it is a dense gated one whose base
        products can be shared (`ffn_entry`): plain `nn.Linear`s carrying no hooks but fast
        weights' (`mm.only_fast_weights`; an adapter-wrapped or sharded one is not), and for
        the pre-norm layout an `mlp` with `down_proj` and `act_fn` and no shared expert; else
        None. What the FFN computes from them is proven on the probe (`prove_shared_ffn`)."""
        if self.kind == "pre_norm":
            mlp = getattr(layer, "mlp", None)
            if not all(hasattr(mlp, n) for n in ("down_proj", "act_fn")):
                return None
            if isinstance(getattr(layer, "shared_expert", None), nn.Module):
                return None
        linears = self._input_linears(layer)
        if not all(type(lin) is nn.Linear and mm.only_fast_weights(lin) for lin in linears):
            return None
        return linears

    def ffn_entry(self, layer: nn.Module, h: torch.Tensor) -> FFNEntry:
        """`FFNEntry` of the post-attention residual rows h (N, 1, D): the entry norm's output
        and `F.linear` of it by each input-side linear (what `nn.Linear.forward` computes).
        For a layer whose `ffn_inputs` are not None."""
        normed = self.entry(layer)(h)
        linears = self._input_linears(layer)
        gate, up = (F.linear(normed, lin.weight, lin.bias) for lin in linears)
        return FFNEntry(h, normed, (gate, up))

    def layer_out_from(self, layer: nn.Module, entry: FFNEntry) -> torch.Tensor:
        """`layer_out` of `entry.rows` from a shared `FFNEntry`: each input-side product with
        the open fast-weight bindings' corrections added (`mm.output_of`; a linear that has
        gained another hook since, e.g. `FlopCounterMode`'s, is called instead, so that the
        hook sees it), then the rest of the FFN and the residual, as the family's own modules
        compute them."""
        linears = self._input_linears(layer)
        gate, up = (mm.output_of(lin, entry.normed, p) for lin, p in zip(linears, entry.products))
        if self.kind == "llada":
            return entry.rows + layer.dropout(layer.ff_out(layer.act(gate) * up))
        return entry.rows + layer.mlp.down_proj(layer.mlp.act_fn(gate) * up)

    def _input_linears(self, layer: nn.Module) -> tuple[nn.Module | None, ...]:
        """The modules named as the FFN's input-side linears (`FFN_INPUTS`), None if absent."""
        found = []
        for name in FFN_INPUTS[self.kind]:
            try:
                found.append(layer.get_submodule(name))
            except AttributeError:
                found.append(None)
        return tuple(found)


def find_tail(model: nn.Module, layers_path: str) -> Tail | None:
    """The `Tail` that the layout of `model`'s last layer suggests, or None (then the full tail
    is used). Unproven: `prove_tail` decides."""
    stack = model.get_submodule(layers_path)
    last = stack[len(stack) - 1]
    kind = next((k for k, (entry, _) in LAYOUTS.items() if _has_layout(last, k, entry)), None)
    parent_path = layers_path.rpartition(".")[0]
    parent = model.get_submodule(parent_path) if parent_path else model
    norm = next((n for n in FINAL_NORMS if isinstance(getattr(parent, n, None), nn.Module)), None)
    head = head_name(model)
    if kind is None or norm is None or head is None:
        return None
    return Tail(kind, f"{parent_path}.{norm}" if parent_path else norm, head)


def _has_layout(layer: nn.Module, kind: str, entry: str) -> bool:
    if not isinstance(getattr(layer, entry, None), nn.Module):
        return False
    if kind == "llada":
        return all(isinstance(getattr(layer, n, None), nn.Module) for n in LAYOUTS[kind][1])
    return isinstance(getattr(layer, "mlp", None), nn.Module)


def head_name(model: nn.Module) -> str | None:
    """The dotted name of the head module: the output embeddings when they are a bias-free
    `nn.Linear`, else (a tied model with no head module) the input embeddings; None when the
    head is anything else."""
    for getter in ("get_output_embeddings", "get_input_embeddings"):
        try:
            module = getattr(model, getter)()
        except (AttributeError, NotImplementedError):
            continue
        if type(module) is nn.Linear and module.bias is not None:
            return None  # the fused loss has no bias term
        # Exact types with a float weight: a quantised head (a Linear subclass holding packed
        # integers) or an adapter-wrapped one is no plain (V, D) projection.
        plain = type(module) in (nn.Linear, nn.Embedding)
        if plain and module.weight.is_floating_point():
            return next((n for n, m in model.named_modules() if m is module), None)
    return None


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    """allclose tolerances of a probe in `dtype`: the order of a few roundings of it."""
    if dtype == torch.float64:
        return {"rtol": 1e-9, "atol": 1e-10}
    if dtype == torch.float32:
        return {"rtol": 1e-3, "atol": 1e-4}  # as the split check (`HFDenoiser._setup_split`)
    return {"rtol": 3e-2, "atol": 3e-2}


def mid_hidden(denoiser, x, attention_mask, layer: int) -> torch.Tensor:
    """The post-attention residual (B, L, D) of the last layer, `layer`: the input of its FFN's
    norm, captured in the model's own forward. Dream's is moved one position on (position i
    gets i - 1's, position 0 keeps its own), as `HFDenoiser.forward` moves its logits: the
    tail acts on each position alone, so it commutes with that move."""
    spec = _proven(denoiser, rows=True)
    if layer != len(denoiser.layers) - 1:
        raise ValueError(f"the mid-layer split is the last layer's, not layer {layer}")
    entry = spec.entry(denoiser.layers[layer])
    h = stop_at(entry, lambda: denoiser(x, attention_mask), before=True)
    return _shift(h) if denoiser.shift else h


def features(denoiser, h: torch.Tensor, start: int, mid_layer: bool) -> torch.Tensor:
    """The head's input (B, L, D) (the final norm's output, Dream's moved one position on) from
    `denoiser.hidden_states(..., upto=start, mid_layer=mid_layer)`: with `mid_layer`, only
    `Tail.layer_out` and the final norm, so (N, 1, D) rows from anywhere in the batch do;
    otherwise `layers[start:]` of the model's own forward, stopped after the final norm (h are
    the tokens when the split is off)."""
    spec = _proven(denoiser, rows=mid_layer)
    norm = denoiser.hf.get_submodule(spec.final_norm)
    if mid_layer:
        if start != len(denoiser.layers) - 1:
            raise ValueError(f"the mid-layer split is the last layer's, not layer {start}")
        return norm(spec.layer_out(denoiser.layers[start], h))
    if not denoiser.split:
        out = stop_at(norm, lambda: denoiser.hf(input_ids=h, **denoiser.model_inputs(h, None)))
    else:
        with denoiser.resumed(h, start) as dummy:
            inputs = denoiser.model_inputs(dummy, None)
            out = stop_at(norm, lambda: denoiser.hf(input_ids=dummy, **inputs))
    return _shift(out) if denoiser.shift else out


def shared_entry(denoiser, h: torch.Tensor) -> FFNEntry:
    """`Tail.ffn_entry` of the last layer's post-attention residual rows h (N, 1, D)."""
    return _shareable(denoiser).ffn_entry(denoiser.layers[len(denoiser.layers) - 1], h)


def shared_features(denoiser, entry: FFNEntry) -> torch.Tensor:
    """`features` of the rows (N, 1, D) of a shared `FFNEntry` (the mid-layer split of the last
    layer): `Tail.layer_out_from` and the final norm. (Dream's move by one position is the
    identity on (N, 1, D) rows.)"""
    spec = _shareable(denoiser)
    norm = denoiser.hf.get_submodule(spec.final_norm)
    return norm(spec.layer_out_from(denoiser.layers[len(denoiser.layers) - 1], entry))


def _shareable(denoiser) -> Tail:
    spec = _proven(denoiser, rows=True)
    if not denoiser.tail_shared:
        raise TypeError(f"the {denoiser.family} backbone's FFN is not proven shareable")
    return spec


def _proven(denoiser, *, rows: bool) -> Tail:
    if denoiser.tail is None or (rows and not denoiser.tail_rows):
        raise TypeError(f"the {denoiser.family} backbone's tail is unproven: {denoiser.tail_note}")
    return denoiser.tail


def _shift(h: torch.Tensor) -> torch.Tensor:
    return torch.cat([h[:, :1], h[:, :-1]], dim=1)


def prove_tail(denoiser, probe: torch.Tensor) -> tuple[int, str]:
    """Run `denoiser`'s tail (`denoiser.tail` set, `tail_rows` True) on `probe` (B, L) tokens
    against its full forward, in eval mode without gradient. Returns (level, note): level 0
    nothing holds, 1 the head holds (the head's weight applied to the final norm's output
    gives the logits: the fused loss applies), 2 the tail holds too (the last layer's
    post-attention residual through `Tail.layer_out`, the final norm and the head gives the
    logits, on every row at once (B, L, D) and on a third of the rows taken from anywhere in
    the batch (N, 1, D), as the scored-rows loss runs it, and it takes no rows at all).
    """
    full = denoiser(probe).float()
    options = tolerance(denoiser.head_weight().dtype)

    def close(logits: torch.Tensor, expected: torch.Tensor = full) -> bool:
        return torch.allclose(logits.float(), expected, **options)

    start = denoiser.hidden_states(probe, upto=0)  # the tokens when the split is off
    if not close(denoiser.project(denoiser.features_from(start, start=0))):
        return 0, "the head applied to the final norm's output is not the logits"
    last = len(denoiser.layers) - 1
    hidden = denoiser.hidden_states(probe, upto=last, mid_layer=True)
    if not close(denoiser.logits_from(hidden, start=last, mid_layer=True)):
        return 1, "the last layer's FFN, the final norm and the head do not give the logits"
    rows = torch.arange(probe.numel(), device=probe.device)[1::3]
    subset = denoiser.logits_from(hidden.flatten(0, 1)[rows, None], start=last, mid_layer=True)
    if not close(subset, full.flatten(0, 1)[rows, None]):
        return 1, "the tail on a subset of the rows differs from the full forward"
    try:  # a loss may score no row (an empty inner mask): the tail must take (0, 1, D)
        empty = denoiser.logits_from(hidden.flatten(0, 1)[:0, None], start=last, mid_layer=True)
    except (RuntimeError, ValueError, IndexError) as error:
        return 1, f"the tail fails on no rows: {type(error).__name__}: {error}"[:200]
    if empty.shape[:2] != (0, 1):
        return 1, f"the tail gives shape {tuple(empty.shape)} for no rows"
    return 2, "the last layer's FFN, final norm and head checked against the full forward"


def prove_shared_ffn(denoiser, probe: torch.Tensor) -> bool:
    """Whether the last layer's FFN computed from a shared `FFNEntry` (`Tail.layer_out_from`)
    equals, bit for bit, the family's own FFN (`Tail.layer_out`) on a third of `probe`'s rows
    at the last layer's mid-layer split: then forwards under different fast-weight states may
    share its base products. Run after `prove_tail` has proven the rows tail."""
    spec = denoiser.tail
    layer = denoiser.layers[len(denoiser.layers) - 1]
    if spec.ffn_inputs(layer) is None:
        return False
    hidden = denoiser.hidden_states(probe, upto=len(denoiser.layers) - 1, mid_layer=True)
    rows = hidden.flatten(0, 1)[1::3, None]
    shared = spec.layer_out_from(layer, spec.ffn_entry(layer, rows))
    return torch.equal(shared, spec.layer_out(layer, rows))
