"""The lm-evaluation-harness model `memdlm`: a run of this recipe (or a Hugging Face masked
diffusion model) evaluated with lm-eval's own tasks, with optional inference-time adaptation.

    python -m recipes.memdlm harness --model memdlm --model_args run=runs/RUN,adapt=true \\
        --tasks my_task --include_path my_tasks/ --output_path results/

or, from Python, `lm_eval.simple_evaluate(model=MemDLMLM(run=...), tasks=[...])`. docs/evaluation.md
lists every model arg. The three request types:

- `generate_until`: the recipe's sampler (`api.generate`; greedy, low-confidence remasking,
  steps = block length = max_gen_toks unless set), rows batched when they share a prompt length
  and generation settings; decoded up to EOS, then cut at the first stop string.
- `loglikelihood`: the stratified Monte Carlo ELBO (`api.log_likelihood`, unbiased), after
  adapting to the context once per distinct context (all choices of a multiple-choice item
  share it, and the same masks: common random numbers). `is_greedy`: with the context given
  and the whole continuation masked, one forward pass's argmax at every continuation position
  equals the continuation (greedy one-step unmasking reproduces it).
- `loglikelihood_rolling`: the ELBO of the whole text with an empty context (never adapted:
  there is no context to adapt to); texts longer than max_length are scored in chunks of
  max_length // 2 tokens, each conditioned on the tokens before it that fit.

Random numbers (adaptation masks, LoRA init, ELBO masks) come from a generator seeded by `seed`
and the request's own tokens, so a result does not depend on request order or batching.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lm_eval.models  # noqa: F401  (the built-in models first: registering earlier hides them)
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from pydantic import ValidationError

from recipes.memdlm import api
from recipes.memdlm.backbones import FullForward, adapter
from recipes.memdlm.backbones.reference import ReferenceBackbone
from recipes.memdlm.config import Config, MemDLMConfig, ModelConfig

log = logging.getLogger(__name__)

REMASKING = ("low_confidence", "random", "margin", "entropy")
DTYPES = ("float32", "bfloat16", "float16")


# --------------------------------------------------------------------------- model args


@dataclass(frozen=True)
class Options:
    """The `memdlm` model args other than the inner-loop overrides (docs/evaluation.md)."""

    run: str | None = None
    pretrained: str | None = None
    trust_remote_code: bool = False
    dtype: str = "float32"
    load_in_4bit: bool = False
    mask_token: str | None = None
    eos_token: str | None = None
    adapt: bool = False
    adapt_cache: int = 16
    mc_num: int = 128
    mc_batch: int = 32
    steps: int | None = None
    block_length: int | None = None
    remasking: str = "low_confidence"
    threshold: float | None = None
    max_length: int | None = None
    max_gen_toks: int = 256
    seed: int = 0
    device: str | None = None
    batch_size: int = 1
    max_batch_size: int | None = None
    tokenizer: str | None = None  # for tasks only: RULER sizes its data with this HF tokenizer


_KINDS = {
    "run": "str?",
    "pretrained": "str?",
    "trust_remote_code": "bool",
    "dtype": "str",
    "load_in_4bit": "bool",
    "mask_token": "str?",
    "eos_token": "str?",
    "adapt": "bool",
    "adapt_cache": "int",
    "mc_num": "int",
    "mc_batch": "int",
    "steps": "int?",
    "block_length": "int?",
    "remasking": "str",
    "threshold": "float?",
    "max_length": "int?",
    "max_gen_toks": "int",
    "seed": "int",
    "device": "str?",
    "batch_size": "batch",
    "max_batch_size": "int?",
    "tokenizer": "str?",
}


# The inner-loop settings a model arg may override (MemDLMConfig fields that act at inference).
INNER_FIELDS = tuple(
    name for name in MemDLMConfig.model_fields if name not in ("per_sample", "gap_every")
)


def _coerce(name: str, value: Any, kind: str) -> Any:
    """`value` of model arg `name` as `kind` (lm-eval hands over str, int, float or bool)."""
    if kind.endswith("?") and value is None:
        return None
    base = kind.rstrip("?")
    if base == "batch":  # lm-eval's --batch_size: an int, or "auto" (taken as 1 here)
        if isinstance(value, str) and value.startswith("auto"):
            return 1
        base = "int"
    if base == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
    elif base == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
    elif base == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    elif base == "str":
        return str(value)
    raise ValueError(f"memdlm model arg {name}={value!r}: expected {kind.replace('?', ' or None')}")


def parse_model_args(args: Mapping[str, Any]) -> tuple[Options, dict[str, Any]]:
    """Split and check the model args: (`Options`, inner-loop overrides by MemDLMConfig field).

    ValueError names the arg: an unknown key, a bad value, both or neither of run/pretrained,
    inner-loop overrides without adapt=true.
    """
    inner = set(INNER_FIELDS)
    known = set(_KINDS) | inner
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(
            f"memdlm model_args: unknown key {unknown[0]!r}; expected one of {sorted(known)}"
        )
    values = {k: _coerce(k, v, _KINDS[k]) for k, v in args.items() if k in _KINDS}
    overrides = {k: v for k, v in args.items() if k in inner}
    options = Options(**values)
    if (options.run is None) == (options.pretrained is None):
        raise ValueError(
            "memdlm model_args: give exactly one of run= (a run folder or its model.pt) and "
            f"pretrained= (a Hugging Face folder); got run={options.run!r}, "
            f"pretrained={options.pretrained!r}"
        )
    if overrides and not options.adapt:
        raise ValueError(
            f"memdlm model_args: {sorted(overrides)[0]} sets the inner loop, which runs only "
            "with adapt=true"
        )
    _check_options(options)
    return options, overrides


def _check_options(o: Options) -> None:
    for name in ("mc_num", "mc_batch", "max_gen_toks", "batch_size", "adapt_cache"):
        if getattr(o, name) < 1:
            raise ValueError(f"memdlm model arg {name} must be >= 1, got {getattr(o, name)}")
    for name in ("steps", "block_length", "max_length"):
        if getattr(o, name) is not None and getattr(o, name) < 1:
            raise ValueError(f"memdlm model arg {name} must be >= 1, got {getattr(o, name)}")
    if o.remasking not in REMASKING:
        raise ValueError(f"memdlm model arg remasking={o.remasking!r}: expected one of {REMASKING}")
    if o.threshold is not None and not 0 < o.threshold <= 1:
        raise ValueError(f"memdlm model arg threshold must be in (0, 1], got {o.threshold}")
    if o.dtype not in DTYPES:
        raise ValueError(f"memdlm model arg dtype={o.dtype!r}: expected one of {DTYPES}")
    if o.run is not None and (o.trust_remote_code or o.load_in_4bit or o.dtype != "float32"):
        raise ValueError(
            "memdlm model args trust_remote_code, dtype and load_in_4bit apply to pretrained=; "
            "a run= folder loads as its config.json says"
        )


def inner_config(base: MemDLMConfig, overrides: Mapping[str, Any]) -> MemDLMConfig:
    """`base` with the model args' inner-loop overrides (ValueError names the bad field)."""
    try:
        return MemDLMConfig.model_validate({**base.model_dump(), **overrides})
    except ValidationError as error:
        item = error.errors()[0]
        where = ".".join(str(part) for part in item["loc"])
        raise ValueError(
            f"memdlm model arg {where}={overrides.get(where)!r}: {item['msg']}"
        ) from None


# --------------------------------------------------------------------------- loading


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
    from recipes.memdlm.backbones.load import load_weights, new_model, tokenizer_for

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
    """The reference Transformer's max_seq_len; for Hugging Face models the authors' 4096, or
    less when the model's position embeddings are shorter."""
    if isinstance(adapter(loaded.model), ReferenceBackbone):  # learned length: the run's
        return loaded.config.model.max_seq_len
    hf_config = getattr(getattr(loaded.model, "hf", None), "config", None)
    positions = getattr(hf_config, "max_position_embeddings", None)
    return min(4096, positions) if isinstance(positions, int) else 4096


# --------------------------------------------------------------------------- helpers


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


# --------------------------------------------------------------------------- the model


@register_model("memdlm")
class MemDLMLM(LM):
    """lm-eval model over a run of this recipe or a Hugging Face folder (module doc).

    Construct with the model args as keywords (`MemDLMLM(run="runs/x", adapt=True)`), or wrap a
    model already loaded with `MemDLMLM.from_loaded(load_run(...), **model_args)`.
    """

    def __init__(self, **model_args: Any) -> None:
        options, overrides = parse_model_args(model_args)
        loaded = load_run(
            options.run,
            pretrained=options.pretrained,
            trust_remote_code=options.trust_remote_code,
            dtype=options.dtype,
            load_in_4bit=options.load_in_4bit,
            mask_token=options.mask_token,
            eos_token=options.eos_token,
            device=options.device,
        )
        self._setup(loaded, options, overrides)

    @classmethod
    def from_loaded(cls, loaded: LoadedRun, **model_args: Any) -> MemDLMLM:
        """The model over `loaded`; run=/pretrained= are not given (it is already loaded)."""
        for name in ("run", "pretrained", "trust_remote_code", "dtype", "load_in_4bit", "device"):
            if name in model_args:
                raise ValueError(f"from_loaded: {name} does not apply to a loaded model")
        options, overrides = parse_model_args({**model_args, "run": "<loaded>"})
        self = cls.__new__(cls)
        self._setup(loaded, options, overrides)
        return self

    def _setup(self, loaded: LoadedRun, options: Options, overrides: Mapping[str, Any]) -> None:
        super().__init__()
        self.loaded, self.options = loaded, options
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self._device = loaded.device
        self.mask_id = int(loaded.tokenizer.mask_id)
        self.max_length = options.max_length or default_max_length(loaded)
        self.inner = inner_config(loaded.config.memdlm, overrides)
        self.fast_weights = api.fast_weights_for(self.model, self.inner) if options.adapt else None
        self.adaptations = 0  # inner loops run (one per distinct context while cached)
        self._cache: collections.OrderedDict = collections.OrderedDict()

    # ----------------------------------------------------------------- adaptation
    def adapted_state(self, context_ids: Sequence[int]) -> dict[str, torch.Tensor] | None:
        """The fast weights adapted to this context (leading dim 1), cached by its tokens; None
        without adaptation or for an empty context."""
        if self.fast_weights is None or not context_ids:
            return None
        key = tuple(context_ids)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        generator = self._generator(key, "adapt")
        prompt = torch.tensor([key], device=self._device)
        state = api.adapt_prompt(
            self.model,
            prompt,
            mask_id=self.mask_id,
            fast_weights=self.fast_weights,
            config=self.inner,
            generator=generator,
        )
        self.adaptations += 1
        self._cache[key] = state
        if len(self._cache) > self.options.adapt_cache:
            self._cache.popitem(last=False)
        return state

    def _generator(self, tokens: Sequence[int], purpose: str) -> torch.Generator:
        seed = request_seed(self.options.seed, tokens, purpose)
        return torch.Generator(device=self._device).manual_seed(seed)

    # ----------------------------------------------------------------- likelihood
    def score(self, context_ids: Sequence[int], continuations: Sequence[Sequence[int]]):
        """[(ELBO, is_greedy)] of each continuation after one context (adapted once); every
        continuation is estimated with the same random numbers."""
        state = self.adapted_state(context_ids)
        mem = self.fast_weights if state is not None else None
        prompt = torch.tensor(list(context_ids), dtype=torch.long, device=self._device)
        out = []
        for continuation in continuations:
            if not continuation:
                out.append((0.0, True))
                continue
            response = torch.tensor([list(continuation)], device=self._device)
            value = api.log_likelihood(
                self.model,
                prompt,
                response,
                mask_id=self.mask_id,
                state=state,
                fast_weights=mem,
                mc_num=self.options.mc_num,
                mc_batch=self.options.mc_batch,
                generator=self._generator(context_ids, "elbo"),
            )
            greedy = greedy_matches(
                self.model, prompt, response, mask_id=self.mask_id, state=state, fast_weights=mem
            )
            out.append((float(value[0]), bool(greedy[0])))
        return out

    def _fit(self, context_ids: list[int], continuation: list[int]) -> list[int]:
        """The context cut from the left so that context + continuation fit in max_length."""
        if len(continuation) > self.max_length:
            raise ValueError(
                f"a continuation of {len(continuation)} tokens exceeds max_length={self.max_length}"
            )
        room = self.max_length - len(continuation)
        return context_ids[len(context_ids) - room :] if len(context_ids) > room else context_ids

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(ELBO of the continuation, is_greedy) per (context, continuation) request; requests
        are grouped by context so each context is adapted once."""
        groups: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
        for index, request in enumerate(requests):
            context, continuation = request.args
            context_ids, continuation_ids = encode_pair(self.tokenizer, context, continuation)
            key = tuple(self._fit(context_ids, continuation_ids))
            groups.setdefault(key, []).append((index, continuation_ids))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        for context_ids, members in groups.items():
            scores = self.score(context_ids, [c for _, c in members])
            for (index, _), result in zip(members, scores):
                results[index] = result
                self.cache_hook.add_partial("loglikelihood", requests[index].args, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """ELBO of each whole text with an empty context (chunked beyond max_length)."""
        results = []
        for request in requests:
            (text,) = request.args
            total = 0.0
            for prompt, chunk in rolling_windows(self.tokenizer.encode(text), self.max_length):
                total += self._plain_elbo(prompt, chunk)
            results.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return results

    def _plain_elbo(self, prompt: list[int], chunk: list[int]) -> float:
        value = api.log_likelihood(
            self.model,
            torch.tensor(prompt, dtype=torch.long, device=self._device),
            torch.tensor([chunk], device=self._device),
            mask_id=self.mask_id,
            mc_num=self.options.mc_num,
            mc_batch=self.options.mc_batch,
            generator=self._generator(prompt + [-1] + chunk, "rolling"),
        )
        return float(value[0])

    # ----------------------------------------------------------------- generation
    def sampler_lengths(self, max_gen_toks: int) -> tuple[int, int, int]:
        """(gen_length, steps, block_length): max_gen_toks rounded up to whole blocks; by
        default one block and one token per step (the authors' setting)."""
        block = self.options.block_length or max_gen_toks
        gen_length = -(-max_gen_toks // block) * block
        return gen_length, self.options.steps or gen_length, block

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Sampled text per (context, gen_kwargs) request, cut at its stop strings."""
        jobs: dict[tuple, list[tuple[int, list[int], GenSettings]]] = {}
        for index, request in enumerate(requests):
            context, gen_kwargs = request.args
            settings = gen_settings(gen_kwargs, self.options.max_gen_toks)
            gen_length = self.sampler_lengths(settings.max_gen_toks)[0]
            room = self.max_length - gen_length
            if room < 0:
                raise ValueError(
                    f"max_gen_toks={settings.max_gen_toks} exceeds max_length={self.max_length}"
                )
            ids = self.tokenizer.encode(context)
            ids = ids[len(ids) - room :] if len(ids) > room else ids
            key = (len(ids), settings.max_gen_toks, settings.temperature)
            jobs.setdefault(key, []).append((index, ids, settings))
        results: list[str | None] = [None] * len(requests)
        for (_, max_gen_toks, temperature), members in jobs.items():
            for start in range(0, len(members), self.options.batch_size):
                chunk = members[start : start + self.options.batch_size]
                rows = self.sample([ids for _, ids, _ in chunk], max_gen_toks, temperature)
                for (index, _, settings), text in zip(chunk, rows):
                    results[index] = cut_at_stops(text, settings.until)
                    self.cache_hook.add_partial("generate_until", requests[index].args, text)
        return results

    def sample(self, prompts: list[list[int]], max_gen_toks: int, temperature: float) -> list[str]:
        """Decoded generations (up to EOS, before stop strings) for prompts of one length, each
        with its own adapted fast weights when adapting."""
        gen_length, steps, block = self.sampler_lengths(max_gen_toks)
        prompt = torch.tensor(prompts, dtype=torch.long, device=self._device)
        prompt = prompt.reshape(len(prompts), len(prompts[0]))
        states = [self.adapted_state(ids) for ids in prompts]
        flat = [t for ids in prompts for t in [*ids, -1]]
        options = dict(
            mask_id=self.mask_id,
            gen_length=gen_length,
            steps=steps,
            adapt=False,
            generator=self._generator(flat, "sample"),
            block_length=block,
            remasking=self.options.remasking,
            temperature=temperature,
            threshold=self.options.threshold,
            **self.loaded.config.generate_options(),
        )
        if states[0] is None:
            out = api.generate(self.model, prompt, **options)
        else:
            batched = {k: torch.cat([s[k] for s in states]) for k in states[0]}
            with torch.no_grad(), self.fast_weights.bind(batched):
                out = api.generate(self.model, prompt, **options)
        generated = out[:, prompt.shape[1] : prompt.shape[1] + max_gen_toks].tolist()
        return [self.tokenizer.decode(row) for row in generated]


# --------------------------------------------------------------------------- command line


def option_value(argv: Sequence[str], name: str) -> str | None:
    """The value of `--name VALUE` or `--name=VALUE` in argv (the last one), else None."""
    value = None
    for i, token in enumerate(argv):
        if token == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif token.startswith(name + "="):
            value = token[len(name) + 1 :]
    return value


def check_cli_model_args(argv: Sequence[str]) -> None:
    """With --model memdlm, check --model_args (key=value,... or a JSON object, as lm-eval
    reads them) before lm-eval indexes its tasks, so a bad arg fails in seconds."""
    import json

    from lm_eval.utils import simple_parse_args_string

    if option_value(argv, "--model") != "memdlm":
        return
    text = option_value(argv, "--model_args") or ""
    args = json.loads(text) if text.strip().startswith("{") else simple_parse_args_string(text)
    parse_model_args(args)


def main(argv: list[str] | None = None) -> int:
    """`python -m recipes.memdlm harness ARGS`: lm-eval's own command line (ARGS exactly as for
    `lm-eval`), with the `memdlm` model registered. User errors (ValueError) print one line and
    return 2 (MEMDLM_DEBUG=1 shows the traceback)."""
    from lm_eval.__main__ import cli_evaluate

    argv = list(sys.argv[1:] if argv is None else argv)
    saved = sys.argv
    sys.argv = ["lm-eval", *argv]  # lm-eval's parser reads sys.argv
    try:
        check_cli_model_args(argv)
        cli_evaluate()
    except ValueError as error:
        if os.environ.get("MEMDLM_DEBUG"):
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        sys.argv = saved
    return 0
