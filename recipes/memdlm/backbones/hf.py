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

Outer LoRA (`model.lora_rank > 0`) goes through `peft`; fast weights then sit on the frozen base
projection (`...gate_proj.base_layer`) under the outer LoRA, as in the reference code.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from recipes.memdlm.data.batches import Encoded, collate, encode
from recipes.memdlm.data.tasks import DataError, Example

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


# --------------------------------------------------------------------------- the wrapper


class HFDenoiser(nn.Module):
    """A Hugging Face model as a denoiser, tokens (B, L) -> logits (B, L, V); see module doc.

    Args:
        model: a loaded model (masked LM, bidirectional decoder, or a `peft` model of either)
            whose output has `.logits`.
        verify_split: check the split forward against the full forward now (one short forward
            per checked split point); if it does not match, use full forwards (`split` False).
    """

    def __init__(self, model: nn.Module, *, verify_split: bool = True):
        super().__init__()
        if any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()):
            raise ValueError(
                "the model has activation checkpointing on; fast weights are bound only during "
                "the forward pass, so a recomputation in backward would not see them: call "
                "model.gradient_checkpointing_disable() first"
            )
        self.hf = model
        self.layers_path = find_layer_stack(model)
        self.split = False
        self._embedding: nn.Module | None = None
        if verify_split:
            self.split = self._setup_split()

    @property
    def layers(self) -> nn.ModuleList:
        return self.hf.get_submodule(self.layers_path)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None):
        out = self.hf(input_ids=x, attention_mask=attention_mask)
        return out.logits if hasattr(out, "logits") else out[0]

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
        """Find the module whose output enters layer 0, then compare split and full forwards."""
        was_training = self.training
        self.eval()
        try:
            probe = self._probe_input()
            with torch.no_grad():
                self._embedding = self._embedding_module(probe)
                if self._embedding is None:
                    return False
                self.split = True
                full = self(probe)
                for start in sorted({len(self.layers) // 2, len(self.layers) - 1}):
                    hidden = self.hidden_states(probe, upto=start)
                    if not torch.allclose(
                        self.logits_from(hidden, start=start), full, rtol=1e-3, atol=1e-4
                    ):
                        return False
                return True
        except Exception:
            return False
        finally:
            self.split = False
            self.train(was_training)

    def _probe_input(self) -> torch.Tensor:
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


def _has_expert_list(layer: nn.Module) -> bool:
    mlp = getattr(layer, "mlp", None)
    return isinstance(getattr(mlp, "experts", None), (nn.ModuleList, UnfusedExperts))


def wrap(model: nn.Module, *, layer_fraction: float = 0.1, verify_split: bool = True):
    """An already loaded Hugging Face model as an `HFDenoiser`: bidirectional attention, fused
    experts of the last `layer_fraction` of layers unfused (for per-expert fast weights)."""
    make_bidirectional(model)
    stack = model.get_submodule(find_layer_stack(model))
    unfuse_experts(stack, range(first_fast_index(len(stack), layer_fraction), len(stack)))
    return HFDenoiser(model, verify_split=verify_split)


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
    start = first_fast_index(len(stack), cfg.memdlm.layer_fraction)
    unfuse_experts(stack, range(start, len(stack)))
    if m.lora_rank > 0:
        model = add_outer_lora(
            model,
            rank=m.lora_rank,
            alpha=m.lora_alpha,
            dropout=m.lora_dropout,
            targets=m.lora_targets,
            kbit=m.load_in_4bit,
        )
    return HFDenoiser(model)


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


def _prompt_text(tok: HFTokenizer, prompt: str) -> str:
    """The prompt as the user turn of the tokenizer's chat template, ready for the answer."""
    messages = [{"role": "user", "content": prompt}]
    return tok.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def prepare_data(cfg):
    """`runner.Data` for a Hugging Face tokenizer (runner.prepare_data calls this).

    Same examples as the byte-level recipe, encoded with the model's tokenizer. Generation cells
    are keyed by the prompt length in tokens, and a cell keeps the examples whose answer has the
    cell's most common token length (the sampler decodes one length per batch). Exposure-bias
    examples are cut to a common token shape.
    """
    from recipes.memdlm.data import prepare as runner

    tok = runner.tokenizer_for(cfg)
    raw = runner._user_examples(cfg) if cfg.data.train_file else runner._builtin_examples(cfg)
    if cfg.model.chat_template:
        raw = {
            name: [dataclasses.replace(e, prompt=_prompt_text(tok, e.prompt)) for e in examples]
            for name, examples in raw.items()
        }
    max_len, policy = cfg.model.max_seq_len, cfg.data.max_len_policy
    encoded, reports = {}, {}
    for name in ("pretrain", "train", "loss_eval"):
        encoded[name], reports[name] = encode(raw[name], tok, max_len=max_len, policy=policy)
    accuracy = token_cells(raw["accuracy_eval"], tok, max_len)
    exposure = common_token_shape(raw["exposure_eval"], tok)
    if not exposure:
        raise DataError("no exposure-bias example keeps its token shape after cutting")
    return runner.Data(
        tok,
        encoded["pretrain"],
        encoded["train"],
        encoded["loss_eval"],
        accuracy,
        exposure,
        reports,
    )


def token_cells(examples: Sequence[Example], tok: HFTokenizer, max_len: int) -> list[Example]:
    """Examples relabelled with their prompt length in tokens; per (task, prompt length) cell,
    only those whose answer has the cell's most common token length."""
    cells: dict[tuple[str, int], list[tuple[Example, int]]] = collections.defaultdict(list)
    for e in examples:
        p, r = len(tok.encode(e.prompt)), len(tok.encode(e.response)) + 1
        if p + r <= max_len:
            cells[(e.task, p)].append((e, r))
    kept = []
    for (task, p), members in sorted(cells.items()):
        modal = collections.Counter(r for _, r in members).most_common(1)[0][0]
        kept += [Example(e.prompt, e.response, task, p) for e, r in members if r == modal]
    return kept


def common_token_shape(examples: Sequence[Example], tok: HFTokenizer, response_cap: int = 16):
    """Examples cut to the last P prompt tokens and the first R answer tokens (P, R the minima,
    R <= response_cap), kept only when the cut text re-encodes to exactly those tokens."""
    pairs = [(tok.encode(e.prompt), tok.encode(e.response)) for e in examples]
    pairs = [(p, r) for p, r in pairs if p and r]
    if not pairs:
        return []
    prompt_len = min(len(p) for p, _ in pairs)
    response_len = min(response_cap, min(len(r) for _, r in pairs))
    out = []
    for p, r in pairs:
        prompt, response = p[len(p) - prompt_len :], r[:response_len]
        text_p = tok.tokenizer.decode(prompt)
        text_r = tok.tokenizer.decode(response)
        if tok.encode(text_p) == prompt and tok.encode(text_r) == response:
            out.append(Example(text_p, text_r))
    return out


def loss_set(rows: Sequence[Encoded], batch_size: int, tok: HFTokenizer, device):
    """`evaluate.LossSet` whose batches share one prompt length (prompt-only adaptation needs it)
    and one total length; anchors from the evaluation seed, as `evaluate.make_loss_set`."""
    from recipes.memdlm.eval.metrics import EVAL_SEED, LossSet
    from recipes.memdlm.method import sample_anchor

    groups: dict[tuple[int, int], list[Encoded]] = collections.defaultdict(list)
    for row in rows:
        groups[(len(row.prompt), len(row))].append(row)
    batches = []
    for key in sorted(groups):
        group = groups[key]
        for i in range(0, len(group), batch_size):
            batches.append(collate(group[i : i + batch_size], tok.eos_id).to(device))
    generator = torch.Generator(device=device).manual_seed(EVAL_SEED)
    anchors = [
        sample_anchor(b, mask_id=tok.mask_id, eps=1e-3, generator=generator) for b in batches
    ]
    return LossSet(batches, anchors)
