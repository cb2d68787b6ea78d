"""The `memdlm` lm-eval model's arguments (docs/evaluation.md, "Model args"): their types,
defaults and checks, and the inner-loop overrides they may carry."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from recipes.memdlm.config import MemDLMConfig

# --------------------------------------------------------------------------- model args


REMASKING = ("low_confidence", "random", "margin", "entropy")


DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Options:
    """The `memdlm` model args other than the inner-loop overrides (docs/evaluation.md)."""

    run: str | None = None
    pretrained: str | None = None
    peft: str | None = None  # a PEFT LoRA adapter onto pretrained= (as lm-eval's hf model)
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
    cache: str | None = None  # None / "none", "prefix" or "dual" (diffusion.generate's cache)
    cache_refresh: int | None = None
    cfg_scale: float = 0.0
    sampler: str = "diffusion"  # or "llada21": the authors' LLaDA2.1 sampler (api.llada21_sampling)
    minimal_topk: int = 1
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
    "peft": "str?",
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
    "cache": "str?",
    "cache_refresh": "int?",
    "cfg_scale": "float",
    "sampler": "str",
    "minimal_topk": "int",
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
    if values.get("cache") == "none":
        values["cache"] = None
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
    if o.cache not in (None, "prefix", "dual"):
        raise ValueError(f"memdlm model arg cache={o.cache!r}: expected none, prefix or dual")
    if o.cache_refresh is not None and (o.cache is None or o.cache_refresh < 1):
        raise ValueError(
            f"memdlm model arg cache_refresh={o.cache_refresh} needs cache=prefix or cache=dual "
            "and must be >= 1"
        )
    if not 0 <= o.cfg_scale < float("inf"):
        raise ValueError(f"memdlm model arg cfg_scale must be finite and >= 0, got {o.cfg_scale}")
    if o.sampler not in ("diffusion", "llada21"):
        raise ValueError(f"memdlm model arg sampler={o.sampler!r}: expected diffusion or llada21")
    if o.minimal_topk < 1:
        raise ValueError(f"memdlm model arg minimal_topk must be >= 1, got {o.minimal_topk}")
    if o.sampler == "llada21" and (o.cache or o.cfg_scale or o.remasking != "low_confidence"):
        raise ValueError(
            "memdlm model args cache, cfg_scale and remasking belong to sampler=diffusion, "
            "not to sampler=llada21"
        )
    if o.run is not None and (
        o.trust_remote_code or o.load_in_4bit or o.dtype != "float32" or o.peft
    ):
        raise ValueError(
            "memdlm model args trust_remote_code, dtype, load_in_4bit and peft apply to "
            "pretrained=; "
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
