"""A PEFT LoRA adapter folder (`adapter_config.json`, `adapter_model.safetensors`, as
`PeftModel.save_pretrained` writes it, e.g. the authors' released MemDLM models) loaded onto
`model.path`, its LoRA weights trainable, or refused in one line when it does not fit.

Fit is decided by the adapter's own tensors: every tensor in its file must name a LoRA weight
that peft created on this model (same module, same shape), and every LoRA weight peft created
must be in the file. A different `base_model_name_or_path` alone is not a misfit: a local copy of
the hub base is the common case.
"""

from __future__ import annotations

import json
from pathlib import Path

from recipes.memdlm.errors import MissingExtraError, UserError

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def require_peft():
    try:
        import peft
    except ImportError:  # pragma: no cover - exercised only without the extra
        raise MissingExtraError(
            "model.adapter and model.lora_rank > 0 need peft, in the optional extra 'hf': "
            'pip install -e ".[hf]"'
        ) from None
    return peft


def adapter_files(folder: Path, name: str) -> tuple[dict, Path]:
    """(adapter_config.json as a dict, the weights file) of adapter folder `folder`; UserError
    when it is not a LoRA adapter folder. `name`: the adapter as the user gave it."""
    config = folder / CONFIG_FILE
    if not config.is_file():
        raise UserError(f"model.adapter {name!r} has no {CONFIG_FILE}: not a PEFT adapter folder")
    try:
        settings = json.loads(config.read_text(encoding="utf-8"))
    except ValueError as error:
        raise UserError(f"model.adapter {name!r}: {CONFIG_FILE} is not JSON ({error})") from None
    if str(settings.get("peft_type", "")).upper() != "LORA":
        raise UserError(
            f"model.adapter {name!r} is a {settings.get('peft_type')!r} adapter; only LoRA loads"
        )
    weights = next((folder / f for f in WEIGHT_FILES if (folder / f).is_file()), None)
    if weights is None:
        raise UserError(f"model.adapter {name!r} has no {' or '.join(WEIGHT_FILES)}")
    return settings, weights


def adapter_tensors(weights: Path) -> dict:
    """The adapter file's tensors by name (safetensors, or a weights-only torch load)."""
    if weights.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(weights))
    import torch

    return torch.load(weights, map_location="cpu", weights_only=True)


def load_adapter(model, folder: Path, *, name: str, base: str, kbit: bool = False):
    """`peft.PeftModel` of `model` with the adapter in `folder`, its LoRA weights trainable.

    name / base: the adapter and `model.path` as the user gave them, for the error line.
    kbit: prepare a 4-bit model for training first (QLoRA, as `add_outer_lora`)."""
    peft = require_peft()
    settings, weights = adapter_files(folder, name)
    saved = adapter_tensors(weights)
    if kbit:  # no activation checkpointing: see add_outer_lora
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    try:
        wrapped = peft.PeftModel.from_pretrained(model, str(folder), is_trainable=True)
    except (ValueError, RuntimeError, KeyError, TypeError) as error:
        # peft: "Target modules {...} not found in the base model", or torch's size mismatch
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise UserError(_misfit(name, base, reason)) from None
    expected = peft.get_peft_model_state_dict(wrapped)
    problem = _tensor_problem(expected, saved, settings)
    if problem:
        raise UserError(_misfit(name, base, problem))
    return wrapped


def _misfit(name: str, base: str, reason: str) -> str:
    return f"model.adapter {name!r} does not fit model.path {base!r}: {reason}"


def _tensor_problem(expected: dict, saved: dict, settings: dict) -> str | None:
    """One line on how the file's tensors differ from the LoRA weights peft made; None if equal."""
    unexpected = [k for k in saved if k not in expected]
    missing = [k for k in expected if k not in saved]
    shaped = [k for k in saved if k in expected and saved[k].shape != expected[k].shape]
    targets = settings.get("target_modules")
    if shaped:
        k = shaped[0]
        return (
            f"{len(shaped)} LoRA tensor(s) differ in shape (first: {k} {tuple(saved[k].shape)} "
            f"in the adapter vs {tuple(expected[k].shape)} on the model)"
        )
    if unexpected:
        return (
            f"{len(unexpected)} adapter tensor(s) name modules the model lacks (first: "
            f"{unexpected[0]}; target_modules {targets})"
        )
    if missing:
        return (
            f"target_modules {targets} match {len(missing)} module(s) the adapter has no "
            f"weights for (first: {missing[0]})"
        )
    return None
