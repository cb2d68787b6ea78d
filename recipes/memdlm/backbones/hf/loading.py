"""Loading a Hugging Face model folder as the recipe's backbone: tokenizer (mask and EOS tokens),
model (dtype, 4-bit, trust_remote_code), outer LoRA through peft."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from recipes.memdlm.backbones.hf.attention import (
    find_layer_stack,
    first_fast_index,
    make_bidirectional,
)
from recipes.memdlm.backbones.hf.denoiser import HFDenoiser
from recipes.memdlm.backbones.hf.experts import unfuse_experts
from recipes.memdlm.backbones.hf.hub import fingerprint, resolve
from recipes.memdlm.backbones.hf.peft_adapter import load_adapter, require_peft
from recipes.memdlm.backbones.hf.routing import take_over_routing
from recipes.memdlm.config import MissingExtraError
from recipes.memdlm.errors import UserError


def require_transformers():
    try:
        import transformers
    except ImportError:  # pragma: no cover - exercised only without the extra
        raise MissingExtraError(
            "Hugging Face backbones (model.path) need the optional extra 'hf' (transformers, "
            'safetensors, peft): pip install -e ".[hf]" in the repository '
            "(or pip install 'memdlm-toolkit[hf]')"
        ) from None
    return transformers


# --------------------------------------------------------------------------- structure


MASK_TOKENS = ("<|mdm_mask|>", "<|mask|>", "[MASK]", "<mask>")


@dataclass(frozen=True)
class HFTokenizer:
    """A Hugging Face tokenizer with the recipe's tokenizer interface (see data.ByteTokenizer)."""

    tokenizer: Any
    mask_id: int
    eos_id: int
    pad_id: int
    vocab_size: int
    bytes_are_tokens: bool = False  # subword tokens: examples are cut and batched by tokens

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids) -> str:
        """Text up to the first EOS, special tokens and ids the tokenizer does not have (a
        head larger than the tokenizer, as Dream's) dropped: decoding a model's output never
        raises."""
        ids = [int(i) for i in ids]
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        ids = [i for i in ids if 0 <= i < self.vocab_size]
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
    transformers = require_transformers()
    tok = transformers.AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    vocab = tok.get_vocab()

    def token_id(name: str, token: str) -> int:
        if token not in vocab:
            raise UserError(f"model.{name}={token!r} is not in the tokenizer's vocabulary")
        return vocab[token]

    if mask_token is not None:
        mask_id = token_id("mask_token", mask_token)
    elif tok.mask_token_id is not None:
        mask_id = tok.mask_token_id
    else:
        found = [vocab[t] for t in MASK_TOKENS if t in vocab]
        if not found:
            raise UserError(
                f"the tokenizer in {str(path)!r} has no mask token (looked for {MASK_TOKENS}); "
                "set model.mask_token"
            )
        mask_id = found[0]
    if eos_token is not None:
        eos_id = token_id("eos_token", eos_token)
    else:
        eos_id = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
        if eos_id is None:
            raise UserError(
                f"the tokenizer in {str(path)!r} has no EOS or SEP; set model.eos_token"
            )
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else eos_id
    return HFTokenizer(tok, int(mask_id), int(eos_id), int(pad_id), vocab_size or len(tok))


# --------------------------------------------------------------------------- loading


def auto_class(config):
    transformers = require_transformers()
    auto_map = getattr(config, "auto_map", None) or {}
    for name in ("AutoModelForMaskedLM", "AutoModelForCausalLM", "AutoModel"):
        if name in auto_map:
            return getattr(transformers, name)
    architecture = (getattr(config, "architectures", None) or [""])[0]
    if "MaskedLM" not in architecture and architecture.endswith("LM"):
        return transformers.AutoModelForCausalLM
    return transformers.AutoModelForMaskedLM


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(cfg, *, device, vocab_size: int | None = None) -> HFDenoiser:
    """The recipe's model from `cfg.model.path` (see module doc). `cfg`: recipe `Config`;
    vocab_size: the tokenizer's size, to which the logits are cut (`HFDenoiser`)."""
    transformers = require_transformers()
    transformers.utils.logging.disable_progress_bar()  # the recipe reports its own progress
    m = cfg.model
    path = resolve(m.path, what="model.path")  # a folder, or a hub id's snapshot in the cache
    adapter_folder = resolve(m.adapter, what="model.adapter") if m.adapter else None
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
    model = auto_class(config).from_pretrained(str(path), config=config, **options)
    if not m.load_in_4bit:
        model = model.to(device)
    make_bidirectional(model)
    stack = model.get_submodule(find_layer_stack(model))
    fast = range(first_fast_index(len(stack), cfg.memdlm.layer_fraction), len(stack))
    unfuse_experts(stack, fast)
    take_over_routing(stack, fast)
    if adapter_folder is not None:  # its own LoRA (rank, alpha, targets); model.lora_* unused
        model = load_adapter(
            model, adapter_folder, name=m.adapter, base=m.path, kbit=m.load_in_4bit
        )
    elif m.lora_rank > 0:
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
    denoiser = HFDenoiser(model, block_size=m.sample_block_size, vocab_size=vocab_size)
    # What a checkpoint of only the trainable weights is checked against (loop/checkpoint.py)
    denoiser.base_identity = {"path": m.path, "fingerprint": fingerprint(path)}
    return denoiser


def add_outer_lora(model, *, rank: int, alpha: float, dropout: float, targets, kbit=False):
    """Trainable LoRA on `targets` (peft names; ["all-linear"] = every linear but the head);
    everything else frozen. kbit: prepare a 4-bit model for training first (QLoRA)."""
    peft = require_peft()
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
