"""The run's model from its configuration (the reference Transformer, or a Hugging Face model,
`model.path`, through `backbones.hf`), its device, its weights from a checkpoint, and the line
that announces it. Above `backbones/`, `data/` and `loop/`, so that none of them imports the
others back through it."""

from __future__ import annotations

import json
from pathlib import Path

import torch

import diffusion as dd
from recipes.memdlm.backbones import adapter, describe_line
from recipes.memdlm.config import Config
from recipes.memdlm.errors import UserError
from recipes.memdlm.loop import checkpoint as ckpt


def resolve_device(name: str, kernels: str = "auto") -> torch.device:
    """The run's device; also checks that `kernels` can run on it, so that a run that would
    fail at its first step fails before its run folder is written."""
    if name == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise UserError(
                f"device {name!r} is not a device; use auto, cpu, cuda or cuda:N"
            ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(
            f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist"
        )
    if kernels == "triton":
        from diffusion.kernels import triton_available
        from diffusion.kernels.dispatch import interpreter_enabled

        if not triton_available():
            raise UserError(
                "kernels='triton' needs the optional package triton, which is not installed: "
                "pip install triton, or use --kernels auto"
            )
        if device.type != "cuda" and not interpreter_enabled():
            raise UserError(
                f"kernels='triton' runs on CUDA, not on {device}; use --kernels auto (or set "
                "TRITON_INTERPRET=1 for Triton's slow CPU interpreter)"
            )
    return device


def new_model(cfg: Config, tok, *, seed: int, device) -> torch.nn.Module:
    """The run's model on `device`, initialised from `seed`; tok: the run's tokenizer
    (`data.prepare.tokenizer_for`: its size is the reference model's vocabulary, and a Hugging
    Face model's logits are cut to it)."""
    torch.manual_seed(seed)
    if cfg.model.path:
        from recipes.memdlm.backbones import hf

        return hf.load_model(cfg, device=device, vocab_size=tok.vocab_size)
    m = cfg.model
    model = dd.Transformer(
        tok.vocab_size,
        d_model=m.d_model,
        n_layers=m.n_layers,
        n_heads=m.n_heads,
        d_ff=m.d_ff,
        max_seq_len=m.max_seq_len,
    )
    return model.to(device)


def load_weights(model: torch.nn.Module, path: Path) -> None:
    if not path.is_file():
        raise UserError(f"checkpoint {str(path)!r} does not exist")
    state = ckpt.load(path)
    try:  # a LoRA run's checkpoint holds the adapter only and names its base (loop/checkpoint)
        ckpt.load_model_state(model, state, path)
    except (KeyError, RuntimeError) as error:  # PyTorch's message is one line per tensor
        problem = fit_problem(model.state_dict(), state["model"])
        problem = problem or (str(error).strip().splitlines() or [""])[0]
        raise UserError(
            f"checkpoint {str(path)!r} does not fit this model: {problem}; pass the same "
            "--preset/--config/model options it was trained with"
        ) from None


def fit_problem(expected: dict, saved) -> str | None:
    """One line on why the tensors `saved` cannot be loaded into a model whose state is
    `expected` (missing, unexpected or differently shaped tensors); None when they fit."""
    if not isinstance(saved, dict):
        return f"its 'model' entry is a {type(saved).__name__}, not a state dict"
    parts = []
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    shaped = [
        k
        for k in expected
        if k in saved
        and hasattr(saved[k], "shape")
        and tuple(saved[k].shape) != tuple(expected[k].shape)
    ]
    if shaped:
        k = shaped[0]
        parts.append(
            f"{len(shaped)} tensor(s) differ in shape (first: {k} "
            f"{tuple(saved[k].shape)} in the checkpoint vs {tuple(expected[k].shape)} here)"
        )
    if missing:
        parts.append(f"{len(missing)} tensor(s) missing (first: {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected tensor(s) (first: {unexpected[0]})")
    return ", ".join(parts) or None


def announce(model, cfg: Config, reporter) -> dict:
    """Say at start what the run trains on (family, forward path, fast-weight modules and where:
    `Backbone.describe`) and return the same facts, JSON-ready, for `summary.json`."""
    info = adapter(model).describe(cfg.memdlm.layer_fraction, tuple(cfg.memdlm.targets))
    reporter.note(describe_line(info))
    return json.loads(json.dumps(info, default=str))
