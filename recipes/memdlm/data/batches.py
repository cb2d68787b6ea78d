"""From examples to tensors: encoding, the length policy, collation and the batch sampler.

Layout of a training row (LLaDA SFT convention, memdlm-method.md section 1.1):
`prompt | response | EOS | EOS ...`. The prompt is never masked and never scored; the response,
its EOS and any EOS padding are maskable and scored, so the model learns where answers end.
With `model.chat_template` a row is the template's ids (data/chat.py): the prompt ends with the
generation prompt and the response with the template's end-of-turn token instead of an EOS.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from recipes.memdlm.data.chat import template_ids
from recipes.memdlm.data.tasks import ByteTokenizer, DataError, Example


@dataclass(frozen=True)
class Encoded:
    prompt: tuple[int, ...]
    response: tuple[int, ...]  # ends with EOS (or the template's end of turn) unless truncated

    def __len__(self) -> int:
        return len(self.prompt) + len(self.response)


@dataclass(frozen=True)
class LengthReport:
    kept: int
    filtered: int
    truncated: int

    def describe(self, max_len: int) -> str:
        return (
            f"{self.kept} examples kept, {self.filtered} filtered and {self.truncated} truncated "
            f"at the model's maximum length {max_len}"
        )


def token_pieces(
    example: Example, tokenizer: ByteTokenizer, *, chat_template: bool = False
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(prompt ids, response ids) of one example, before any length policy.

    Plain: encode(prompt), encode(response) + EOS. `chat_template`: the template's ids split at
    the templated prompt's length (`chat.template_ids`, the authors' `default_sft_map_fn`).
    """
    if chat_template:
        ids, prompt_length = template_ids(tokenizer, example)
        return tuple(ids[:prompt_length]), tuple(ids[prompt_length:])
    prompt = tuple(tokenizer.encode(example.prompt))
    return prompt, (*tokenizer.encode(example.response), tokenizer.eos_id)


def encode(
    examples: Sequence[Example],
    tokenizer: ByteTokenizer,
    *,
    max_len: int,
    policy: str,
    chat_template: bool = False,
) -> tuple[list[Encoded], LengthReport]:
    """Token ids for each example (`token_pieces`), with sequences longer than `max_len`
    filtered or truncated.

    `policy="filter"` drops examples longer than `max_len`; `"truncate"` keeps the prompt and cuts
    the response on the right (an example whose prompt alone fills `max_len` is dropped and
    counted as filtered: nothing of it would be scored. dllm's "right" truncation keeps a prompt
    of exactly `max_len` ids with no scored token; that is the one difference).
    """
    if policy not in ("filter", "truncate"):
        raise ValueError(f"policy must be 'filter' or 'truncate', got {policy!r}")
    kept, filtered, truncated = [], 0, 0
    for example in examples:
        prompt, response = token_pieces(example, tokenizer, chat_template=chat_template)
        if len(prompt) + len(response) > max_len:
            if policy == "filter" or len(prompt) >= max_len:
                filtered += 1
                continue
            response = response[: max_len - len(prompt)]
            truncated += 1
        kept.append(Encoded(prompt, response))
    if not kept:
        raise DataError(
            f"no example fits the model's maximum length {max_len} (policy {policy!r}); "
            "raise model.max_seq_len or use shorter data"
        )
    return kept, LengthReport(len(kept), filtered, truncated)


@dataclass
class Batch:
    x0: torch.Tensor  # (B, L) long, clean tokens
    maskable: torch.Tensor  # (B, L) bool, response + EOS padding
    prompt_lengths: torch.Tensor  # (B,) long

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.x0.to(device), self.maskable.to(device), self.prompt_lengths.to(device))


def collate(rows: Sequence[Encoded], eos_id: int) -> Batch:
    """Right-pad with EOS to the longest row; padding is maskable (see module docstring)."""
    length = max(len(row) for row in rows)
    x0 = torch.full((len(rows), length), eos_id, dtype=torch.long)
    maskable = torch.ones((len(rows), length), dtype=torch.bool)
    for i, row in enumerate(rows):
        x0[i, : len(row)] = torch.tensor(row.prompt + row.response)
        maskable[i, : len(row.prompt)] = False
    prompt_lengths = torch.tensor([len(row.prompt) for row in rows])
    return Batch(x0, maskable, prompt_lengths)


class BatchSampler:
    """Random batches drawn with a seeded generator; its state is the data position.

    Rows of equal length are grouped so that batches need no padding whenever every group holds
    at least one batch; otherwise batches are drawn from all rows and padded. A bucket is drawn
    with probability proportional to its size, then `batch_size` distinct rows from it.
    """

    def __init__(self, rows: Sequence[Encoded], batch_size: int, *, seed: int, eos_id: int):
        self.rows, self.batch_size, self.eos_id = list(rows), batch_size, eos_id
        groups: dict[int, list[int]] = defaultdict(list)
        for index, row in enumerate(self.rows):
            groups[len(row)].append(index)
        if min(len(g) for g in groups.values()) >= batch_size:
            self.buckets = [torch.tensor(groups[k]) for k in sorted(groups)]
        else:
            self.buckets = [torch.arange(len(self.rows))]
        self.sizes = torch.tensor([len(b) for b in self.buckets], dtype=torch.float)
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> Batch:
        bucket = self.buckets[int(torch.multinomial(self.sizes, 1, generator=self.generator))]
        take = min(self.batch_size, len(bucket))
        picks = bucket[torch.randperm(len(bucket), generator=self.generator)[:take]]
        return collate([self.rows[int(i)] for i in picks], self.eos_id)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


class StagedSampler:
    """Batches from one sampler after another (a curriculum): `samplers[i]` serves draws
    `ends[i-1] <= draw < ends[i]`, the last sampler every draw after `ends[-1]`.

    Its state is the number of draws and every stage's own state, so a resumed phase draws the
    batches an uninterrupted one would.
    """

    def __init__(self, samplers: Sequence[BatchSampler], ends: Sequence[int]):
        if len(samplers) != len(ends) + 1:
            raise ValueError(f"{len(samplers)} samplers need {len(samplers) - 1} stage ends")
        if list(ends) != sorted(ends) or any(end < 0 for end in ends):
            raise ValueError(f"stage ends must be non-negative and increasing, got {list(ends)}")
        self.samplers, self.ends, self.draws = list(samplers), list(ends), 0

    @property
    def stage(self) -> int:
        """The stage that serves the next draw."""
        return sum(self.draws >= end for end in self.ends)

    def next(self) -> Batch:
        batch = self.samplers[self.stage].next()
        self.draws += 1
        return batch

    def state_dict(self) -> dict:
        return {"draws": self.draws, "stages": [s.state_dict() for s in self.samplers]}

    def load_state_dict(self, state: dict) -> None:
        self.draws = state["draws"]
        for sampler, stage_state in zip(self.samplers, state["stages"], strict=True):
            sampler.load_state_dict(stage_state)


def fixed_batches(rows: Sequence[Encoded], batch_size: int, eos_id: int) -> list[Batch]:
    """Deterministic evaluation batches, rows of equal length together, in a stable order."""
    order = sorted(range(len(rows)), key=lambda i: (len(rows[i]), i))
    batches, current = [], []
    for index in order:
        if current and (len(current) == batch_size or len(rows[index]) != len(current[0])):
            batches.append(collate(current, eos_id))
            current = []
        current.append(rows[index])
    if current:
        batches.append(collate(current, eos_id))
    return batches
