"""Embedded data, the example type and the byte-level tokenizer (user files: formats.py).

Nothing is downloaded. Filler text is real English prose from the standard library's
`pydoc_data.topics` (the Python reference manual), lower-cased and without digits, so that the
digits and capitals of a retrieval prompt belong to its needles. Tasks, after RULER and BABILong:

- `single`: one needle "<key> code is <value>." hidden in filler, then "<key> code?".
- `multikey`: the same with two distractor needles of other keys.
- `multivalue`: two needles of the same key; answer both values in order of appearance.
- `vt` (variable tracking): "VAR X = <value>." then "VAR Y = VAR X."; "VARs = <value>?" -> "X Y".
- `continuation`: a span of prose as the prompt, the next bytes as the response.

A retrieval prompt has exactly `context_len` bytes (needles at uniformly random depths), so
examples of one (task, length) cell share one sequence length and batches need no padding.
"""

from __future__ import annotations

import functools
import random
import re
import string
from collections.abc import Iterable
from dataclasses import dataclass

from recipes.memdlm.errors import UserError

# fmt: off
KEYS = (
    "amber", "apple", "badger", "birch", "cedar", "cobalt", "coral", "crane", "daisy", "eagle",
    "ember", "falcon", "fern", "flint", "gecko", "ginger", "heron", "indigo", "ivory", "jade",
    "juniper", "kiwi", "lemon", "lilac", "lynx", "maple", "marble", "mint", "nutmeg", "olive",
    "onyx", "otter", "pearl", "pepper", "plum", "quartz", "raven", "ruby", "sable", "sage",
    "salmon", "slate", "spruce", "tiger", "topaz", "tulip", "violet", "walnut", "willow", "zebra",
)
# fmt: on


MIN_FILLER = 8  # bytes of prose at least, so that the needle is hidden in something


class DataError(UserError):
    """A user error in the data (malformed file, impossible task length)."""


@dataclass(frozen=True)
class ByteTokenizer:
    """Bytes 0-255 are tokens; three special tokens follow them.

    `bytes_are_tokens`: every tokenizer of the recipe says whether a text's UTF-8 bytes are its
    tokens; data preparation and evaluation ask it (rather than the tokenizer's type) to choose
    how examples are cut and batched."""

    pad_id: int = 256
    mask_id: int = 257
    eos_id: int = 258
    vocab_size: int = 259
    bytes_are_tokens: bool = True

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        """Bytes up to the first EOS; other special tokens are dropped."""
        out = bytearray()
        for token in ids:
            if token == self.eos_id:
                break
            if token < 256:
                out.append(token)
        return out.decode("utf-8", errors="replace")


@dataclass(frozen=True)
class Example:
    prompt: str
    response: str
    task: str = "custom"
    context_len: int = 0
    # (role, content) turns before the response, for the chat template; empty: one user turn
    # holding `prompt` (see `conversation`).
    messages: tuple[tuple[str, str], ...] = ()

    def conversation(self) -> list[dict[str, str]]:
        """The turns before the response as chat-template messages."""
        turns = self.messages or (("user", self.prompt),)
        return [{"role": role, "content": content} for role, content in turns]


@functools.lru_cache(maxsize=1)
def english_paragraphs() -> tuple[tuple[str, str], ...]:
    """(topic, paragraph) pairs of prose from `pydoc_data.topics`: ASCII, lower case, no digits."""
    from pydoc_data.topics import topics

    found = []
    for topic in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[topic]):
            lines = block.split("\n")
            if any(line.startswith((" ", "\t")) for line in lines):
                continue  # code samples and grammar rules
            if any(re.fullmatch(r"[*=\-~^\"]{3,}", line.strip()) for line in lines):
                continue  # section underlines
            text = " ".join(line.strip() for line in lines)
            text = text.encode("ascii", "ignore").decode()
            text = re.sub(r"\s+", " ", re.sub(r"[0-9]", "", text)).strip().lower()
            prose = sum(ch.isalpha() or ch == " " for ch in text)
            if len(text) >= 80 and prose / len(text) >= 0.9:
                found.append((topic, text))
    return tuple(found)


@functools.lru_cache(maxsize=2)
def filler_text(split: str) -> str:
    """One long stream of prose; distinct paragraphs are split 85/15 into "train" and "eval".

    The manual repeats some paragraphs under several topics, so the split is by paragraph text
    (deduplicated), which keeps held-out filler out of training.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    unique = list(dict.fromkeys(text for _, text in english_paragraphs()))
    held_out = set(random.Random(1729).sample(range(len(unique)), k=len(unique) * 15 // 100))
    return " ".join(t for i, t in enumerate(unique) if (i in held_out) == (split == "eval"))


def _filler(rng: random.Random, corpus: str, n_chars: int) -> str:
    """`n_chars` of prose starting at a random word boundary."""
    start = rng.randrange(0, len(corpus) - n_chars - 1)
    start = corpus.find(" ", start) + 1
    if start <= 0 or start + n_chars > len(corpus):
        start = 0
    return corpus[start : start + n_chars]


def _hide(rng: random.Random, filler: str, needles: list[str]) -> str:
    """Insert the needles, in order, after spaces at uniformly random depths."""
    spaces = [i + 1 for i, ch in enumerate(filler) if ch == " "] or [0]
    cuts = sorted(rng.choice(spaces) for _ in needles)
    pieces, last = [], 0
    for cut, needle in zip(cuts, needles):
        pieces += [filler[last:cut], needle + " "]
        last = cut
    return "".join(pieces) + filler[last:]


def _value(rng: random.Random, length: int) -> str:
    """A needle's value: a digit, then an upper-case letter, alternating ("7K", "7K3").

    Filler holds neither digits nor capitals, so values stand out by content; alternating the
    two classes makes the position of each character recoverable without learning to count,
    which a tiny model needs thousands of steps for.
    """
    classes = (string.digits, string.ascii_uppercase)
    return "".join(rng.choice(classes[i % 2]) for i in range(length))


def _variable(rng: random.Random, taken: set[str]) -> str:
    while True:
        name = "".join(rng.choice(string.ascii_uppercase) for _ in range(3))
        if name not in taken:
            taken.add(name)
            return name


def _needles_and_question(task: str, rng: random.Random, digits: int) -> tuple[list[str], str, str]:
    keys = rng.sample(KEYS, 3)
    if task == "single":
        value = _value(rng, digits)
        return [f"{keys[0]} code is {value}."], f"\n{keys[0]} code? ", value
    if task == "multikey":
        value = _value(rng, digits)
        needles = [
            f"{key} code is {_value(rng, digits) if i else value}." for i, key in enumerate(keys)
        ]
        rng.shuffle(needles)
        return needles, f"\n{keys[0]} code? ", value
    if task == "multivalue":
        values = [_value(rng, digits), _value(rng, digits)]
        needles = [f"{keys[0]} code is {value}." for value in values]
        return needles, f"\nall {keys[0]} codes? ", " ".join(values)
    if task == "vt":
        taken: set[str] = set()
        first, second = _variable(rng, taken), _variable(rng, taken)
        value = _value(rng, digits)
        needles = [f"VAR {first} = {value}.", f"VAR {second} = VAR {first}."]
        return needles, f"\nVARs = {value}? ", f"{first} {second}"
    raise ValueError(f"unknown retrieval task {task!r}")


def make_example(
    task: str,
    context_len: int,
    rng: random.Random,
    split: str,
    response_len: int = 16,
    value_len: int = 2,
) -> Example:
    """One example of `task` whose prompt is exactly `context_len` bytes long."""
    corpus = filler_text(split)
    if task == "continuation":
        text = _filler(rng, corpus, context_len + response_len)
        return Example(text[:context_len], text[context_len:], task, context_len)
    needles, question, answer = _needles_and_question(task, rng, value_len)
    n_filler = context_len - len(question) - sum(len(n) + 1 for n in needles)
    if n_filler < MIN_FILLER:
        raise DataError(
            f"context length {context_len} is too short for task {task!r}: this example needs "
            f"at least {context_len - n_filler + MIN_FILLER} bytes"
        )
    prompt = _hide(rng, _filler(rng, corpus, n_filler), needles) + question
    assert len(prompt) == context_len, (len(prompt), context_len)
    return Example(prompt, answer, task, context_len)


def make_split(
    tasks: Iterable[str],
    context_lengths: Iterable[int],
    per_cell: int,
    *,
    seed: int,
    split: str,
    response_len: int = 16,
    value_len: int = 2,
) -> list[Example]:
    """`per_cell` examples for every (task, context length), reproducible from `seed`."""
    examples = []
    for task in tasks:
        for length in context_lengths:
            rng = random.Random(f"{split}:{task}:{length}:{seed}")
            examples += [
                make_example(task, length, rng, split, response_len, value_len)
                for _ in range(per_cell)
            ]
    return examples
