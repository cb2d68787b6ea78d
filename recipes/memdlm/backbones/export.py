"""A trained run in the field's formats (`python -m recipes.memdlm export RUN --out DIR`).

- outer-LoRA run of a Hugging Face model: a PEFT adapter folder (`adapter_config.json`,
  `adapter_model.safetensors`) that `peft.PeftModel.from_pretrained(base, DIR)` loads;
  its `base_model_name_or_path` is the run's `model.path` (a folder or a hub id);
- with `merged=True`, and for full fine-tuning: a `save_pretrained` folder (safetensors, the
  base's config.json, its tokenizer and the remote-code `.py` files it had) that
  `AutoModel*.from_pretrained(DIR, trust_remote_code=True)` loads; LoRA is merged into the weights
  (W + (alpha/r) B A, rounded once to the weights' dtype);
- the reference Transformer: `model.safetensors` and `config.json` (its sizes), which
  `load_reference(DIR)` turns back into a `diffusion.Transformer`.

Loading the export gives the run's own logits: exactly for the adapter and the reference
Transformer, to the rounding of the merge for a merged folder (tests/recipes/backbones/
test_export.py). In `backbones/`: what is written depends on the model's type.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import diffusion as dd
from recipes.memdlm.errors import MissingExtraError, UserError

REFERENCE_FORMAT = "memdlm-reference-transformer"
REFERENCE_WEIGHTS = "model.safetensors"


def require_safetensors():
    try:
        import safetensors.torch
    except ImportError:  # pragma: no cover - exercised only without the extra
        raise MissingExtraError(
            "export writes safetensors, in the optional extra 'hf': pip install -e \".[hf]\""
        ) from None
    return safetensors.torch


def export_run(model, cfg, tokenizer, out: Path, *, merged: bool = False) -> str:
    """Write trained `model` (its run's `cfg`, `tokenizer`) to folder `out`; returns the format
    written: "peft-adapter", "transformers" or "reference"."""
    if not cfg.model.path:
        save_reference(model, out)
        return "reference"
    from recipes.memdlm.backbones import hf

    inner = model.hf
    if any(isinstance(m, hf.UnfusedExperts) for m in inner.modules()):
        raise UserError(
            "export: this run's fused MoE experts were unfused into per-expert linears for the "
            "fast weights; their weights have no place in the base's fused layout"
        )
    is_lora = hasattr(inner, "peft_config")
    if is_lora and not merged:
        save_adapter(inner, cfg.model.path, out)
        return "peft-adapter"
    if is_lora:
        inner = inner.merge_and_unload()
    save_transformers(inner, hf.resolve(cfg.model.path), tokenizer, out)
    return "transformers"


def save_adapter(peft_model, base_name: str, out: Path) -> None:
    """The PEFT adapter folder of `peft_model`, naming `base_name` (the run's model.path)."""
    for config in peft_model.peft_config.values():
        config.base_model_name_or_path = base_name
    peft_model.save_pretrained(str(out), safe_serialization=True)


def save_transformers(model, base: Path, tokenizer, out: Path) -> None:
    """`model.save_pretrained(out)` (safetensors), with the base folder's own config.json (the
    loader switched `is_causal`/`use_cache` on the loaded copy; the weights' dtype is kept),
    the tokenizer, and the `.py` files (remote code) the base had."""
    model.save_pretrained(str(out), safe_serialization=True)
    saved = json.loads((out / "config.json").read_text(encoding="utf-8"))
    config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    for key in ("torch_dtype", "dtype"):
        if key in saved:
            config[key] = saved[key]
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    tokenizer.tokenizer.save_pretrained(str(out))
    for path in [*base.glob("*.py"), base / "generation_config.json"]:
        if path.is_file() and not (out / path.name).exists():
            shutil.copy(path, out / path.name)


def save_reference(model: dd.Transformer, out: Path) -> None:
    """The reference Transformer as `model.safetensors` plus `config.json` (its sizes)."""
    st = require_safetensors()
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "format": REFERENCE_FORMAT,
        "vocab_size": model.vocab_size,
        "d_model": model.embed.embedding_dim,
        "n_layers": len(model.layers),
        "n_heads": model.layers[0].attn.n_heads,
        "d_ff": model.layers[0].mlp.gate_proj.out_features,
        "max_seq_len": model.max_seq_len,
        "tie_embeddings": model.lm_head.weight is model.embed.weight,
    }
    st.save_model(model, str(out / REFERENCE_WEIGHTS))  # tied weights stored once
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def load_reference(folder: str | Path, *, device="cpu") -> dd.Transformer:
    """A `diffusion.Transformer` from a folder `save_reference` wrote (config.json, weights)."""
    st = require_safetensors()
    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file() or not (folder / REFERENCE_WEIGHTS).is_file():
        raise UserError(f"{str(folder)!r} has no config.json and {REFERENCE_WEIGHTS}")
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.pop("format", None) != REFERENCE_FORMAT:
        raise UserError(f"{str(path)!r} is not a {REFERENCE_FORMAT} export")
    model = dd.Transformer(**config)
    st.load_model(model, str(folder / REFERENCE_WEIGHTS), device=str(device))
    return model.to(device)
