"""`HFDenoiser`: any Hugging Face model behind the recipe's split-forward interface, and its
`Backbone` view (`HFBackbone`)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from recipes.memdlm.backbones.hf import describe as placement
from recipes.memdlm.backbones.hf import tail
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
from recipes.memdlm.backbones.hf.describe import DEFAULT_FFN
from recipes.memdlm.backbones.hf.experts import unfuse_experts
from recipes.memdlm.backbones.hf.hooks import SPLIT_FAILURES, SplitUnsupported, StopForward
from recipes.memdlm.backbones.hf.routing import take_over_routing
from recipes.memdlm.errors import UserError


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
        self.tail: tail.Tail | None = None  # proven head and final norm: the fused loss applies
        self.tail_rows = False  # proven position-wise after the last attention (`tail.py`)
        self.tail_shared = False  # the last FFN's base products shareable (`tail.FFNEntry`)
        self.tail_note = "not checked (no verified split)"
        if verify_split:
            self.split = self._setup_split()
        if self.split:
            self._setup_tail()

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
    def hidden_states(self, x, attention_mask=None, *, upto: int, mid_layer: bool = False):
        """Input of `layers[upto]` (B, L, D); with `mid_layer`, the last layer's post-attention
        residual (a proven `tail`; Dream's moved one position on, as its logits are). Without
        a verified split, the tokens themselves."""
        if not self.split:
            return x
        self._check_index("upto", upto)
        if mid_layer:
            return tail.mid_hidden(self, x, attention_mask, upto)
        return self._capture(x, attention_mask, upto)

    def logits_from(self, h, attention_mask=None, *, start: int, mid_layer: bool = False):
        """`layers[start:]` and the head applied to `h`; without a split, `h` are tokens."""
        if mid_layer:
            return self.project(self.features_from(h, start=start, mid_layer=True))
        if not self.split:
            return self(h, attention_mask)
        self._check_index("start", start)
        with self.resumed(h, start) as dummy:
            return self(dummy, attention_mask)

    def features_from(self, h, *, start: int, mid_layer: bool = False):
        """The head's input (B, L, D) from `hidden_states(..., upto=start)` (`tail.features`):
        `project` of it is `logits_from`'s logits. Needs a proven `tail`."""
        return tail.features(self, h, start, mid_layer)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Logits (..., V) of the head's input (..., D): W_head features, vocabulary cut."""
        return torch.nn.functional.linear(features, self.head_weight())

    def head_weight(self) -> torch.Tensor:
        """The head's (V, D) weight, rows past the tokenizer dropped (`cut_vocab`); needs a
        proven `tail` (whose head is a bias-free linear map of the final norm's output)."""
        if self.tail is None:
            raise TypeError(f"the {self.family} backbone has no proven head ({self.tail_note})")
        weight = self.hf.get_submodule(self.tail.head).weight
        cut = self.vocab_size is not None and weight.shape[0] > self.vocab_size
        return weight[: self.vocab_size] if cut else weight

    @contextlib.contextmanager
    def resumed(self, h: torch.Tensor, start: int):
        """Within the block, a forward of the yielded dummy tokens (B, L) runs `layers[start:]`
        on h (B, L, D): the embedding's output is replaced by h and the stack cut."""
        parent_path, _, name = self.layers_path.rpartition(".")
        parent = self.hf.get_submodule(parent_path) if parent_path else self.hf
        full = self.layers
        handle = self._embedding.register_forward_hook(lambda m, a, out: h)
        setattr(parent, name, nn.ModuleList(list(full)[start:]))
        try:
            yield torch.zeros(h.shape[:2], dtype=torch.long, device=h.device)
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

    def _setup_tail(self) -> None:
        """Find the position-wise tail and prove it on a probe (`tail.prove_tail`): the fused
        loss needs the head proven, the scored-rows tail the whole tail; `tail_note` says
        what holds. Only a mismatch or one of SPLIT_FAILURES turns it off."""
        spec = tail.find_tail(self.hf, self.layers_path)
        if spec is None:
            self.tail_note = "no known layout of the last layer, final norm and head"
            return
        was_training = self.training
        self.eval()
        self.tail, self.tail_rows = spec, True
        shared = False
        try:
            with torch.no_grad():
                probe = self._probe_input(rows=2)
                level, self.tail_note = tail.prove_tail(self, probe)
                shared = level >= 2 and self._prove_shared_ffn(probe)
        except SPLIT_FAILURES as error:
            level, self.tail_note = 0, f"the tail raised {type(error).__name__}: {error}"[:200]
        finally:
            self.train(was_training)
        self.tail = spec if level >= 1 else None
        self.tail_rows = level >= 2
        self.tail_shared = shared

    def _prove_shared_ffn(self, probe: torch.Tensor) -> bool:
        """`tail.prove_shared_ffn`. Sharing is only a saving: a last FFN that the shared
        computation cannot drive (the layout's names, other modules behind them: a missing
        attribute, another signature or shape) keeps its own module, and the proven rows tail
        stays."""
        try:
            return tail.prove_shared_ffn(self, probe)
        except (*SPLIT_FAILURES, AttributeError, TypeError, RuntimeError):
            return False

    def _probe_input(self, rows: int = 1) -> torch.Tensor:
        """(rows, 12) random tokens below the vocabulary size (config's, else the embedding's)."""
        vocab = getattr(getattr(self.hf, "config", None), "vocab_size", None)
        if not isinstance(vocab, int) or vocab < 1:
            vocab = self.hf.get_input_embeddings().num_embeddings
        device = next(self.hf.parameters()).device
        generator = torch.Generator().manual_seed(0)
        return torch.randint(0, vocab, (rows, 12), generator=generator).to(device)

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

    # ----------------------------------------------------------------- fast weights, description
    def fast_weight_targets(self, fraction: float, modules: Sequence[str] = DEFAULT_FFN):
        """Names (from this wrapper) of the FFN linears in the last `fraction` of layers
        (`describe.py`)."""
        return placement.fast_weight_targets(self, fraction, modules)

    def describe(self, fraction: float = 0.1, modules: Sequence[str] = DEFAULT_FFN) -> dict:
        """Family, forward path, attention, fast-weight modules (`describe.py`)."""
        return placement.describe(self, fraction, modules)

    def description(self, fraction: float = 0.1, modules: Sequence[str] = DEFAULT_FFN) -> str:
        """`describe` as one line, for the recipe to print at start."""
        return placement.description(self, fraction, modules)


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
