"""The lm-eval model's set-up: loading a run or a Hugging Face folder, and the per-request
helpers (seeds, stop strings, windows, greedy checks, generation settings). Its model args are
`eval/model_args.py` (re-exported here)."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from recipes.memdlm import api
from recipes.memdlm.backbones import FullForward, adapter
from recipes.memdlm.config import Config, ModelConfig
from recipes.memdlm.eval.model_args import (  # noqa: F401  (re-exported)
    DTYPES,
    INNER_FIELDS,
    REMASKING,
    Options,
    inner_config,
    parse_model_args,
)

log = logging.getLogger(__name__)


@dataclass
class LoadedRun:
    """A model ready for evaluation: the denoiser, its tokenizer, the recipe config, device."""

    model: torch.nn.Module
    tokenizer: Any  # data.ByteTokenizer or hf.HFTokenizer
    config: Config
    device: torch.device


def pick_device(name: str | None) -> torch.device:
    """`name` as a torch device; None/"auto" and any CUDA device without CUDA mean the CPU when
    CUDA is unavailable (lm-eval's CLI always asks for cuda:0)."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        log.warning("memdlm: device %s requested but CUDA is unavailable; using the CPU", name)
        return torch.device("cpu")
    return device


def run_config_path(checkpoint: Path) -> Path:
    """The config.json of the run that holds `checkpoint` (its folder or up to two above)."""
    for folder in (checkpoint.parent, checkpoint.parent.parent, checkpoint.parent.parent.parent):
        if (folder / "config.json").is_file():
            return folder / "config.json"
    raise ValueError(
        f"memdlm model arg run={str(checkpoint)!r}: no config.json beside the checkpoint"
    )


def load_run(
    path_or_none: str | Path | None,
    *,
    pretrained: str | Path | None = None,
    trust_remote_code: bool = False,
    dtype: str = "float32",
    load_in_4bit: bool = False,
    mask_token: str | None = None,
    eos_token: str | None = None,
    device: str | torch.device | None = None,
) -> LoadedRun:
    """A run of this recipe (its folder, or its model.pt; the config from config.json beside
    it) or, with `path_or_none=None`, the Hugging Face model in folder `pretrained` with its own
    weights and the paper's inner-loop settings. The model is in eval mode on `device`."""
    from recipes.memdlm.build import load_weights, new_model
    from recipes.memdlm.data.prepare import tokenizer_for

    where = pick_device(None if device is None else str(device))
    if path_or_none is not None:
        path = Path(path_or_none)
        checkpoint = path / "model.pt" if path.is_dir() else path
        if not checkpoint.is_file():
            raise ValueError(f"memdlm model arg run={str(path)!r}: no model.pt found")
        cfg = Config.model_validate_json(run_config_path(checkpoint).read_text())
    elif pretrained is not None:
        if not Path(pretrained).is_dir():
            raise ValueError(f"memdlm model arg pretrained={str(pretrained)!r} is not a folder")
        model_cfg = ModelConfig(
            path=str(pretrained),
            trust_remote_code=trust_remote_code,
            dtype=dtype,
            load_in_4bit=load_in_4bit,
            mask_token=mask_token,
            eos_token=eos_token,
        )
        cfg, checkpoint = Config(model=model_cfg), None
    else:
        raise ValueError("load_run needs a run path or pretrained=")
    cfg = cfg.model_copy(update={"device": str(where)})
    tokenizer = tokenizer_for(cfg)
    model = new_model(cfg, tokenizer, seed=0, device=where)
    if checkpoint is not None:
        load_weights(model, checkpoint)
    model.eval()
    return LoadedRun(model, tokenizer, cfg, where)


def default_max_length(loaded: LoadedRun) -> int:
    """The authors' 4096, or less when the backbone says its inputs must be shorter
    (`Backbone.max_positions`: the reference Transformer's max_seq_len, the length the run was
    trained at; a Hugging Face model's position embeddings)."""
    positions = adapter(loaded.model).max_positions()
    return min(4096, positions) if positions is not None else 4096


def request_seed(seed: int, tokens: Sequence[int], purpose: str) -> int:
    """A 63-bit seed from `seed`, `purpose` and the request's tokens (order-independent)."""
    digest = hashlib.blake2b(f"{seed}:{purpose}:".encode(), digest_size=8)
    digest.update(b",".join(str(t).encode() for t in tokens))
    return int.from_bytes(digest.digest(), "little") & (2**63 - 1)


def cut_at_stops(text: str, until: Sequence[str]) -> str:
    """`text` up to the earliest occurrence of any stop string (all of it when none occurs)."""
    cut = len(text)
    for stop in until:
        if stop:
            index = text.find(stop)
            if index >= 0:
                cut = min(cut, index)
    return text[:cut]


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation) as lm-eval scores them: trailing whitespace of the
    context moves to the continuation, and the continuation's ids are those of the whole text
    after the context's (falling back to encoding it alone where the boundary tokens merge)."""
    stripped = context.rstrip()
    continuation = context[len(stripped) :] + continuation
    context_ids = tokenizer.encode(stripped) if stripped else []
    whole = tokenizer.encode(stripped + continuation)
    if whole[: len(context_ids)] == context_ids:
        return context_ids, whole[len(context_ids) :]
    return context_ids, tokenizer.encode(continuation)


def rolling_windows(tokens: Sequence[int], max_length: int) -> list[tuple[list[int], list[int]]]:
    """(prompt, chunk) pairs whose chunks partition `tokens`: the whole text with an empty prompt
    when it fits in max_length, else chunks of max_length // 2 tokens, each with the tokens
    before it that fit as its prompt."""
    tokens = list(tokens)
    if len(tokens) <= max_length:
        return [([], tokens)] if tokens else []
    size = max(1, max_length // 2)
    windows = []
    for start in range(0, len(tokens), size):
        chunk = tokens[start : start + size]
        windows.append((tokens[max(0, start - (max_length - len(chunk))) : start], chunk))
    return windows


@torch.no_grad()
def greedy_matches(
    model,
    prompt_ids: torch.Tensor,
    response_ids: torch.Tensor,
    *,
    mask_id: int,
    state: Mapping[str, torch.Tensor] | None = None,
    fast_weights=None,
) -> torch.Tensor:
    """is_greedy of lm-eval for a diffusion LM: with the prompt given and all of the response
    masked, the argmax of one forward pass equals the response at every position.

    prompt_ids: (P,) long; response_ids: (B, R) long; state: one prompt's adapted state (as
    `api.log_likelihood`). Returns (B,) bool.
    """
    rows = response_ids.shape[0]
    x = torch.cat(
        [prompt_ids.reshape(1, -1).expand(rows, -1), torch.full_like(response_ids, mask_id)], 1
    )
    if state is not None:
        with fast_weights.bind(api.shared_state(state)):
            logits = FullForward(model)(x)
    else:
        logits = FullForward(model)(x)
    guess = logits[:, prompt_ids.numel() :].argmax(-1)
    return (guess == response_ids).all(-1)


@dataclass(frozen=True)
class GenSettings:
    """One generation request's settings from lm-eval's gen_kwargs."""

    until: tuple[str, ...]
    max_gen_toks: int
    temperature: float


def gen_settings(gen_kwargs: Mapping[str, Any], default_max_gen_toks: int) -> GenSettings:
    """until (a string or list), max_gen_toks, do_sample and temperature; greedy unless
    do_sample is true (then temperature, default 1). Other keys are ignored with a warning."""
    until = gen_kwargs.get("until") or ()
    until = (until,) if isinstance(until, str) else tuple(until)
    max_gen_toks = int(gen_kwargs.get("max_gen_toks", default_max_gen_toks))
    if max_gen_toks < 1:
        raise ValueError(f"gen_kwargs max_gen_toks must be >= 1, got {max_gen_toks}")
    temperature = float(gen_kwargs.get("temperature") or 0.0)
    if not gen_kwargs.get("do_sample", False):
        temperature = 0.0
    elif temperature == 0.0:
        temperature = 1.0
    ignored = sorted(set(gen_kwargs) - {"until", "max_gen_toks", "do_sample", "temperature"})
    if ignored:
        log.warning("memdlm: generation kwargs %s are not supported and are ignored", ignored)
    return GenSettings(until, max_gen_toks, temperature)
