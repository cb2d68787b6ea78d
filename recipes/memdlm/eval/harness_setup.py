"""The lm-eval model's per-request helpers (seeds, stop strings, windows, greedy checks,
generation settings). Its model args are `eval/model_args.py` and its loading of a run or a
Hugging Face model `eval/harness_loading.py`, both re-exported here."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from recipes.memdlm import api
from recipes.memdlm.backbones import FullForward, adapter
from recipes.memdlm.eval.harness_loading import (  # noqa: F401  (re-exported)
    LoadedRun,
    load_run,
    pick_device,
    run_config_path,
)
from recipes.memdlm.eval.model_args import (  # noqa: F401  (re-exported)
    DTYPES,
    INNER_FIELDS,
    REMASKING,
    Options,
    inner_config,
    parse_model_args,
)

log = logging.getLogger(__name__)


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
