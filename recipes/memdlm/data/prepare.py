"""Glue between the configuration and the pieces: data sets, models and evaluation of a model."""

from __future__ import annotations

import collections
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import diffusion as dd
from recipes.memdlm.config import Config
from recipes.memdlm.data.batches import Encoded, LengthReport, encode
from recipes.memdlm.data.tasks import ByteTokenizer, DataError, Example, load_jsonl, make_split
from recipes.memdlm.eval.metrics import (
    LossSet,
    eval_loss,
    exposure_bias_curve,
    make_loss_set,
    niah_accuracy,
)
from recipes.memdlm.loop import checkpoint as ckpt
from recipes.memdlm.method import make_fast_weights

RETRIEVAL_TASKS = ("single", "multikey", "multivalue", "vt")


@dataclass
class Data:
    """Everything a run reads, validated before any folder is written."""

    tokenizer: ByteTokenizer
    pretrain: list[Encoded]
    train: list[Encoded]
    loss_eval: list[Encoded]
    accuracy_eval: list[Example]  # generation: retrieval cells, or the user's eval examples
    exposure_eval: list[Example]  # equal prompt and response lengths
    reports: dict[str, LengthReport]


def phase_options(cfg: Config, data: Data) -> dict[str, Any]:
    """The keyword arguments of `train.train_phase` that follow from the configuration."""
    return {
        "memdlm": cfg.memdlm,
        "mask_id": data.tokenizer.mask_id,
        "time_eps": cfg.time_eps,
        "loss_backend": cfg.loss_backend,
        "compiled": cfg.compile,
    }


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


def _builtin_examples(cfg: Config) -> dict[str, list[Example]]:
    d = cfg.data
    response_len = d.continuation_response_len
    common = {"seed": d.seed, "response_len": response_len, "value_len": d.value_len}
    retrieval = [t for t in d.eval_tasks if t in RETRIEVAL_TASKS]
    return {
        "pretrain": make_split(
            d.pretrain_tasks,
            d.pretrain_context_lengths,
            d.examples_per_cell,
            split="train",
            **common,
        ),
        "train": make_split(
            d.train_tasks, d.train_context_lengths, d.examples_per_cell, split="train", **common
        ),
        "loss_eval": make_split(
            d.train_tasks, d.train_context_lengths, d.eval_per_cell, split="eval", **common
        ),
        "accuracy_eval": make_split(
            retrieval, d.eval_context_lengths, d.eval_per_cell, split="eval", **common
        ),
        "exposure_eval": make_split(
            ["continuation"],
            [min(d.train_context_lengths)],
            cfg.eval.exposure_examples,
            split="eval",
            **common,
        ),
    }


def _user_examples(cfg: Config) -> dict[str, list[Example]]:
    train = load_jsonl(cfg.data.train_file)
    if cfg.data.eval_file:
        held_out = load_jsonl(cfg.data.eval_file)
    else:  # 5% held out with a fixed seed, as the reference code's 95/5 split
        shuffled = train[:]
        random.Random(cfg.data.seed).shuffle(shuffled)
        cut = max(1, len(shuffled) // 20)
        if len(shuffled) - cut < 1:
            raise DataError("train_file needs at least two examples (or give data.eval_file)")
        held_out, train = shuffled[:cut], shuffled[cut:]
    per_length = collections.defaultdict(list)
    for example in held_out:
        per_length[len(example.prompt.encode())].append(example)
    accuracy = [
        Example(e.prompt, e.response, "custom", length)
        for length, group in per_length.items()
        for e in group[: cfg.data.eval_per_cell]
    ]
    return {
        "pretrain": train,
        "train": train,
        "loss_eval": held_out,
        "accuracy_eval": accuracy,
        "exposure_eval": _common_shape(held_out[: cfg.eval.exposure_examples]),
    }


def _common_shape(examples: list[Example]) -> list[Example]:
    """Cut examples to one shape: the last bytes of the prompt, the first of the response."""
    prompt_len = min(len(e.prompt.encode()) for e in examples)
    response_len = min(16, min(len(e.response.encode()) for e in examples))
    cut = []
    for e in examples:
        p, r = e.prompt.encode(), e.response.encode()
        cut.append(
            Example(p[len(p) - prompt_len :].decode("latin-1"), r[:response_len].decode("latin-1"))
        )
    return cut


def prepare_data(cfg: Config) -> Data:
    if cfg.model.path:  # a Hugging Face backbone brings its tokenizer (hf.py)
        from recipes.memdlm.backbones import hf

        return hf.prepare_data(cfg)
    tok = ByteTokenizer()
    raw = _user_examples(cfg) if cfg.data.train_file else _builtin_examples(cfg)
    max_len, policy = cfg.model.max_seq_len, cfg.data.max_len_policy
    encoded, reports = {}, {}
    for name in ("pretrain", "train", "loss_eval"):
        encoded[name], reports[name] = encode(raw[name], tok, max_len=max_len, policy=policy)
    accuracy = [e for e in raw["accuracy_eval"] if _fits(e, tok, max_len)]
    exposure = [e for e in raw["exposure_eval"] if _fits(e, tok, max_len)]
    if not exposure:
        raise DataError(f"no exposure-bias example fits model.max_seq_len={max_len}")
    return Data(
        tok,
        encoded["pretrain"],
        encoded["train"],
        encoded["loss_eval"],
        accuracy,
        exposure,
        reports,
    )


def _fits(example: Example, tok: ByteTokenizer, max_len: int) -> bool:
    return len(tok.encode(example.prompt)) + len(tok.encode(example.response)) + 1 <= max_len


def new_model(cfg: Config, tok: ByteTokenizer, *, seed: int, device) -> torch.nn.Module:
    torch.manual_seed(seed)
    if cfg.model.path:
        from recipes.memdlm.backbones import hf

        return hf.load_model(cfg, device=device)
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


def tokenizer_for(cfg: Config):
    """The run's tokenizer: bytes, or the Hugging Face model's own (`model.path`)."""
    if not cfg.model.path:
        return ByteTokenizer()
    from recipes.memdlm.backbones import hf

    m = cfg.model
    return hf.load_tokenizer(
        m.path,
        mask_token=m.mask_token,
        eos_token=m.eos_token,
        trust_remote_code=m.trust_remote_code,
    )


def load_weights(model: torch.nn.Module, path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    state = ckpt.load(path)
    try:
        model.load_state_dict(state["model"])
    except (KeyError, RuntimeError) as error:
        raise ValueError(f"checkpoint {str(path)!r} does not fit this model: {error}") from None


def loss_set_for(data: Data, cfg: Config, device) -> LossSet:
    """The held-out loss batches with their fixed anchors, for either kind of backbone."""
    if cfg.model.path:  # batches of one prompt length (hf.loss_set)
        from recipes.memdlm.backbones import hf

        return hf.loss_set(data.loss_eval, cfg.eval.batch_size, data.tokenizer, device)
    return make_loss_set(data.loss_eval, cfg.eval.batch_size, data.tokenizer, device)


def evaluate_model(
    model, data: Data, cfg: Config, *, method: str, device, loss_set: LossSet | None = None
) -> dict[str, Any]:
    """All held-out metrics of one trained model. MemDLM gets the adapted variants too."""
    tok = data.tokenizer
    loss_set = loss_set or loss_set_for(data, cfg, device)
    backend = {"loss_backend": cfg.loss_backend}
    sampling = {"generate_options": cfg.generate_options(), **backend}
    common = {"batch_size": cfg.eval.batch_size, "device": device, **sampling}
    result: dict[str, Any] = {
        "eval_loss": eval_loss(model, loss_set, **backend),
        "niah": niah_accuracy(model, data.accuracy_eval, tok, **common),
        "exposure_bias": exposure_bias_curve(
            model, data.exposure_eval, tok, device=device, **sampling
        ),
    }
    if method == "memdlm":
        mem = make_fast_weights(model, cfg.memdlm)
        try:
            fast = {"mem": mem, "cfg": cfg.memdlm}
            result["eval_loss_answer_adapted"] = eval_loss(
                model, loss_set, mode="adapted", mask_id=tok.mask_id, **fast, **backend
            )
            result["eval_loss_adapted"] = eval_loss(
                model, loss_set, mode="prompt", mask_id=tok.mask_id, **fast, **backend
            )
            result["niah_adapted"] = niah_accuracy(
                model, data.accuracy_eval, tok, adapt_prompt=True, **common, **fast
            )
            result["exposure_bias_adapted"] = exposure_bias_curve(
                model,
                data.exposure_eval,
                tok,
                device=device,
                adapt_prompt=True,
                **fast,
                **sampling,
            )
        finally:
            mem.remove()
    return result
