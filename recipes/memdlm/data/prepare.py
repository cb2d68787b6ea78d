"""Glue between the configuration and the pieces: data sets, models and evaluation of a model."""

from __future__ import annotations

import collections
import dataclasses
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from recipes.memdlm.config import Config
from recipes.memdlm.data.batches import (
    BatchSampler,
    Encoded,
    LengthReport,
    StagedSampler,
    encode,
)
from recipes.memdlm.data.chat import prompt_text, require_template
from recipes.memdlm.data.formats import load_examples
from recipes.memdlm.data.tasks import ByteTokenizer, DataError, Example, make_split

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
    # The rows of each `data.pretrain_curriculum` stage, in order; empty without a curriculum.
    pretrain_curriculum: list[list[Encoded]] = field(default_factory=list)


def tokenizer_for(cfg: Config):
    """The run's tokenizer: bytes, or the Hugging Face model's own (`model.path`, a folder or a
    hub id; `model.adapter` is checked to resolve too)."""
    if not cfg.model.path:
        return ByteTokenizer()
    from recipes.memdlm.backbones import hf

    m = cfg.model
    # Both names resolve (folder or hub id in the cache) before anything is loaded.
    path = hf.resolve(m.path, what="model.path")
    if m.adapter:
        hf.resolve(m.adapter, what="model.adapter")
    return hf.load_tokenizer(
        path,
        mask_token=m.mask_token,
        eos_token=m.eos_token,
        trust_remote_code=m.trust_remote_code,
    )


def builtin_examples(cfg: Config) -> dict[str, list[Example]]:
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


def curriculum_examples(cfg: Config) -> list[list[Example]]:
    """The examples of each pretraining curriculum stage (embedded data; none for a train_file)."""
    if cfg.data.train_file:
        return []
    d = cfg.data
    common = {"seed": d.seed, "response_len": d.continuation_response_len, "value_len": d.value_len}
    return [
        make_split(stage.tasks, stage.context_lengths, d.examples_per_cell, split="train", **common)
        for stage in d.pretrain_curriculum
    ]


def user_examples(cfg: Config) -> dict[str, list[Example]]:
    fmt = cfg.data.format
    train = load_examples(cfg.data.train_file, fmt, split="train")
    if cfg.data.eval_file:
        held_out = load_examples(cfg.data.eval_file, fmt, split="eval")
    else:  # 5% held out with a fixed seed, as the reference code's 95/5 split
        held_out, train = held_out_split(train, cfg.data.seed, cfg.data.holdout)
    per_length = collections.defaultdict(list)
    for example in held_out:
        per_length[len(example.prompt.encode())].append(example)
    accuracy = [
        dataclasses.replace(e, task="custom", context_len=length)
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


def held_out_split(examples: list, seed: int, rule: str = "recipe") -> tuple[list, list]:
    """(held out, train): 5% of `examples` held out with `seed`.

    "recipe": floor(5%) (at least 1) after `random.Random(seed).shuffle`. "datasets": Hugging
    Face datasets' `train_test_split(test_size=0.05, seed=seed)` (the authors' split, dllm
    `data/alpaca.py`): a permutation by `numpy.random.default_rng(seed)`, its first
    ceil(0.05 n) rows held out, the rest in permutation order.
    """
    if len(examples) < 2:
        raise DataError("train_file needs at least two examples (or give data.eval_file)")
    if rule == "datasets":
        import numpy as np

        order = np.random.default_rng(seed).permutation(len(examples)).tolist()
        cut = math.ceil(0.05 * len(examples))
    else:
        order = list(range(len(examples)))
        random.Random(seed).shuffle(order)
        cut = max(1, len(examples) // 20)
    return [examples[i] for i in order[:cut]], [examples[i] for i in order[cut:]]


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
    """Everything a run reads, for any backbone, validated before any folder is written.

    The same examples for every backbone, encoded with the run's tokenizer (`tokenizer_for`).
    Bytes: generation cells keep their context-length labels, and every example that fits is
    kept. A model's own tokenizer (Hugging Face): generation cells are keyed by the prompt length
    in tokens, a cell keeps the examples whose answer has the cell's most common token length
    (the sampler decodes one length per batch), and exposure-bias examples are cut to a common
    token shape.
    """
    tok = tokenizer_for(cfg)
    raw = user_examples(cfg) if cfg.data.train_file else builtin_examples(cfg)
    stages = curriculum_examples(cfg)
    chat = cfg.model.chat_template
    if chat:  # training rows: the template's ids; generation: the templated prompt text
        require_template(tok)
        for name in ("accuracy_eval", "exposure_eval"):
            raw[name] = _templated(tok, raw[name])
    max_len = cfg.model.max_seq_len
    rules = {"max_len": max_len, "policy": cfg.data.max_len_policy, "chat_template": chat}
    encoded, reports = {}, {}
    for name in ("pretrain", "train", "loss_eval"):
        encoded[name], reports[name] = encode(raw[name], tok, **rules)
    curriculum = []
    for index, examples in enumerate(stages):
        rows, reports[f"pretrain_curriculum[{index}]"] = encode(examples, tok, **rules)
        curriculum.append(rows)
    if tok.bytes_are_tokens:  # a prompt of n bytes is n tokens
        accuracy = [e for e in raw["accuracy_eval"] if _fits(e, tok, max_len)]
        exposure = [e for e in raw["exposure_eval"] if _fits(e, tok, max_len)]
        if not exposure:
            raise DataError(f"no exposure-bias example fits model.max_seq_len={max_len}")
    else:
        accuracy = token_cells(raw["accuracy_eval"], tok, max_len)
        exposure = common_token_shape(raw["exposure_eval"], tok)
        if not exposure:
            raise DataError("no exposure-bias example keeps its token shape after cutting")
    return Data(
        tok,
        encoded["pretrain"],
        encoded["train"],
        encoded["loss_eval"],
        accuracy,
        exposure,
        reports,
        curriculum,
    )


def pretrain_sampler(cfg: Config, data: Data) -> BatchSampler | StagedSampler:
    """The pretraining batches: each curriculum stage for its share of `pretrain.steps`
    (rounded), then the pretraining mixture; without a curriculum, the mixture alone."""
    batch, eos = cfg.pretrain.batch_size, data.tokenizer.eos_id
    mixture = BatchSampler(data.pretrain, batch, seed=cfg.seed, eos_id=eos)
    if not data.pretrain_curriculum:
        return mixture
    stages = [
        BatchSampler(rows, batch, seed=cfg.seed + 1 + index, eos_id=eos)
        for index, rows in enumerate(data.pretrain_curriculum)
    ]
    ends, share = [], 0.0
    for stage in cfg.data.pretrain_curriculum:
        share += stage.fraction
        ends.append(round(share * cfg.pretrain.steps))
    return StagedSampler([*stages, mixture], ends)


def _templated(tok, examples: list[Example]) -> list[Example]:
    """Examples whose prompt is the templated conversation (`chat.prompt_text`)."""
    return [dataclasses.replace(e, prompt=prompt_text(tok, e), messages=()) for e in examples]


def token_cells(examples: Sequence[Example], tok, max_len: int) -> list[Example]:
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


def common_token_shape(examples: Sequence[Example], tok, response_cap: int = 16):
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


def _fits(example: Example, tok: ByteTokenizer, max_len: int) -> bool:
    return len(tok.encode(example.prompt)) + len(tok.encode(example.response)) + 1 <= max_len
