"""`HFDenoiser`: any Hugging Face model behind the recipe's split-forward interface, and its
`Backbone` view (`HFBackbone`)."""

from __future__ import annotations

import collections
import contextlib
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from recipes.memdlm.backbones.hf.attention import (
    ATTENTION,
    MASK_STYLE,
    additive_mask,
    allowed_keys,
    detect_family,
    find_layer_stack,
    first_fast_index,
    make_bidirectional,
)
from recipes.memdlm.backbones.hf.experts import (
    UnfusedExperts,
    is_fused_experts,
    take_over_routing,
    unfuse_experts,
)
from recipes.memdlm.errors import UserError

DEFAULT_FFN = ("gate_proj", "up_proj", "down_proj")
# The FFN projections of a layer, relative to the layer, for the layouts we know: Llama, Qwen,
# Mistral, OLMoE, LLaDA-MoE (gate/up/down_proj); Mixtral's w1/w2/w3; LLaDA-8B / OLMo
# (ff_proj, up_proj, ff_out); ModernBERT (mlp.Wi, mlp.Wo); BERT (intermediate.dense, output.dense).


FFN_PATTERN = re.compile(
    r"(?:.*\.)?(?:gate_proj|up_proj|down_proj|w1|w2|w3|ff_proj|ff_out)"
    r"|(?:.*\.)?mlp\.(?:Wi|Wo)|intermediate\.dense|output\.dense"
)


class StopForward(Exception):
    """Raised by a hook to end a forward pass once the wanted hidden states are captured."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden


class SplitUnsupported(RuntimeError):
    """The hooks cannot drive this model: layer `index` of the stack is never called through
    its `__call__`, or is called without its hidden states as first argument or keyword."""


# What the split check may meet on a model the hooks cannot drive; the full forward is then
# used, and `split_note` (printed in the backbone line, kept in summary.json) says why. An
# IndexError comes from a model that indexes its layer stack by absolute position, which
# `logits_from`'s shortened stack breaks. Any other exception is a bug and propagates.
SPLIT_FAILURES = (SplitUnsupported, IndexError)


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
        vocab_size: the tokenizer's size: logits keep only ids below it (None = all rows of
            the head). Dream's head has more rows (152064) than its tokenizer has tokens
            (151665 with specials); an id past the tokenizer cannot be decoded, so no sampler
            and no loss should see it.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        verify_split: bool = True,
        attention: str = "bidirectional",
        block_size: int = 32,
        vocab_size: int | None = None,
    ):
        super().__init__()
        if vocab_size is not None and (isinstance(vocab_size, bool) or vocab_size < 1):
            raise UserError(f"vocab_size must be None or an int >= 1, got {vocab_size!r}")
        self.vocab_size = vocab_size
        if any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()):
            raise UserError(
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
            raise UserError(f"attention must be one of {ATTENTION}, got {attention!r}")
        if attention == "block_causal" and self.mask_style == "padding":
            raise UserError(
                f"attention='block_causal' needs a model that takes a 4-D mask; the {self.family} "
                "family takes only a 2-D padding mask (use attention='bidirectional')"
            )
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise UserError(f"block_size must be an int >= 1, got {block_size!r}")
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
        logits = self.cut_vocab(out.logits if hasattr(out, "logits") else out[0])
        if self.shift:  # Dream: the output at i - 1 predicts token i; position 0 keeps its own
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        return logits

    def cut_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (..., V) without the head rows past the tokenizer (`vocab_size`)."""
        if self.vocab_size is not None and logits.shape[-1] > self.vocab_size:
            return logits[..., : self.vocab_size]
        return logits

    def forward_with_cache(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """`forward` plus every layer's keys and values (`diffusion.CachedDenoiser`; LLaDA
        family only, hf/cache.py)."""
        from recipes.memdlm.backbones.hf import cache

        return cache.forward_with_cache(self, x, attention_mask)

    def forward_from_cache(self, tokens, kv_cache, *, start: int, attention_mask=None):
        """Logits of `tokens` at positions [start, start + w) against `kv_cache` (hf/cache.py)."""
        from recipes.memdlm.backbones.hf import cache

        return cache.forward_from_cache(
            self, tokens, kv_cache, start=start, attention_mask=attention_mask
        )

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
            raise UserError(f"attention must be one of {ATTENTION}, got {attention!r}")
        if attention == "block_causal" and self.mask_style == "padding":
            raise UserError(f"attention='block_causal' is not available for {self.family}")
        if block_size is not None and (isinstance(block_size, bool) or block_size < 1):
            raise UserError(f"block_size must be an int >= 1, got {block_size!r}")
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
            if args:
                raise StopForward(args[0])
            if "hidden_states" in kwargs:
                raise StopForward(kwargs["hidden_states"])
            raise SplitUnsupported(
                f"layer {index} of {self.layers_path} is called without its hidden states "
                f"(keywords {sorted(kwargs)})"
            )

        handle = self.layers[index].register_forward_pre_hook(stop, with_kwargs=True, prepend=True)
        try:
            self(x, attention_mask)
        except StopForward as stopped:
            return stopped.hidden
        finally:
            handle.remove()
        raise SplitUnsupported(f"layer {index} of {self.layers_path} was never called")

    def _check_index(self, name: str, value: int) -> None:
        if not 0 <= value < len(self.layers):
            raise UserError(f"{name} must be in [0, {len(self.layers)}), got {value}")

    def _setup_split(self) -> bool:
        """Find the module whose output enters layer 0, then compare split and full forwards;
        `split_note` says what was found (or why the full forward is used). Only a mismatch or
        one of SPLIT_FAILURES selects the full forward; any other exception propagates."""
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
        except SPLIT_FAILURES as error:  # the hooks cannot drive it: full forwards are correct
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
            raise UserError(f"fraction must be in (0, 1], got {fraction}")
        stack = self.layers
        start = first_fast_index(len(stack), fraction)
        default = tuple(modules) == DEFAULT_FFN
        names = []
        for index in range(start, len(stack)):
            layer = stack[index]
            if any(is_fused_experts(m) for m in layer.modules()):
                raise UserError(
                    f"layer {index} still holds fused experts; wrap the model with "
                    f"layer_fraction >= {fraction} (hf.load_model / hf.wrap unfuse them)"
                )
            moe = has_expert_list(layer)
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
            raise UserError(
                f"no FFN linear matches modules={tuple(modules)} in layers {start}.."
                f"{len(stack) - 1} of {self.layers_path}; set memdlm.targets to the model's names"
            )
        return names

    # ----------------------------------------------------------------- description
    def describe(self, fraction: float = 0.1, modules: Sequence[str] = DEFAULT_FFN) -> dict:
        """What the recipe runs on: family, forward path, attention, fast-weight modules.

        Returns {"family", "forward", "split", "split_note", "attention", "logit_shift",
        "mask_style", "fast_weights": count, "fast_weight_layers": [indices],
        "fast_weight_kinds": {relative name pattern: count}, "routing": {MoE layer: how it
        serves per-sample fast weights, "softmax" or "module" (the adapter's dispatch) or
        "per_sample" (the block once per sample)}}.
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
            i: layer.mlp.memdlm_dispatch
            for i, layer in enumerate(self.layers)
            if hasattr(getattr(layer, "mlp", None), "memdlm_dispatch")
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
        fast = sorted(i for i, how in d["routing"].items() if how != "per_sample")
        looped = sorted(i for i, how in d["routing"].items() if how == "per_sample")
        routed = f"; adapter MoE dispatch in layers {fast}" if fast else ""
        if looped:
            routed += f"; MoE blocks run once per sample (exact, slower) in layers {looped}"
        shift = "; logits shifted back by one (Dream)" if d["logit_shift"] else ""
        return (
            f"backbone {d['family']} ({type(self.hf).__name__}): {d['forward']}; "
            f"attention {d['attention']}{shift}; {d['fast_weights']} fast-weight modules in "
            f"layers {d['fast_weight_layers']} of {self.layers_path} ({kinds}){routed}"
        )


def has_expert_list(layer: nn.Module) -> bool:
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
