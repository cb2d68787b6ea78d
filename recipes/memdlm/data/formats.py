"""The user's data files: the field's file types and record shapes, read into `Example`s.

Files (`data.train_file`, `data.eval_file`), by what they are:

- a folder: a `datasets` `save_to_disk` folder (a `Dataset`, or a `DatasetDict` whose "train"
  split serves `train_file` and whose "test" or "validation" split serves `eval_file`);
- `*.parquet`: a Parquet table, one record per row;
- `*.json`: a JSON list of records, or an object of equal-length columns (`{"prompt": [...]}`);
  a `.json` file that holds one object per line is read as JSONL;
- anything else: JSONL, one record per line (blank lines skipped).

Records, each recognised by its keys (`data.format=auto`; a file may mix shapes) or all of the
shape named by `data.format`:

- `prompt_response`: `{"prompt": str, "response": str}`;
- `alpaca`: `{"instruction": str, "input": str (optional), "output": str}`; as dllm's Alpaca
  loader (the MemDLM authors' LongAlpaca pipeline), the prompt is the stripped instruction, a
  blank line and the stripped input (the instruction alone when the input is empty), the response
  the stripped output;
- `chat`: `{"messages": [{"role": str, "content": str}, ...]}` whose last message is the
  assistant's response; the messages before it are the prompt's conversation (system turns and
  earlier turns included), which `model.chat_template` renders with the tokenizer's template.
  Without a template the prompt is their contents joined by blank lines.

Every problem is one `DataError` naming the file and the line (JSONL) or record number.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from recipes.memdlm.data.tasks import DataError, Example

FORMATS = ("auto", "prompt_response", "alpaca", "chat")
# The keys that recognise a shape, in the order `auto` tries them: any one of them names the
# shape, so that a record missing the other is reported as such.
SHAPE_KEYS = {"chat": ("messages",), "alpaca": ("instruction", "output")}
SHAPE_KEYS["prompt_response"] = ("prompt", "response")
DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


def load_examples(path: str | Path, fmt: str = "auto", *, split: str = "train") -> list[Example]:
    """The examples of one data file, in file order.

    `fmt`: one of FORMATS. `split`: which split of a `DatasetDict` folder ("train" for
    `data.train_file`, "eval" for `data.eval_file`).
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    path = Path(path)
    records = read_records(path, split=split)
    examples = []
    for where, record in records:
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected an object, got {type(record).__name__}")
        shape = recognise(record, where) if fmt == "auto" else fmt
        examples.append(to_example(record, shape, where))
    if not examples:
        raise DataError(f"data file {str(path)!r} holds no examples")
    return examples


def recognise(record: dict, where: str) -> str:
    """The record's shape, from its keys."""
    for shape, keys in SHAPE_KEYS.items():
        if any(key in record for key in keys):
            return shape
    raise DataError(
        f"{where}: unknown record shape (keys {sorted(record)}); expected 'prompt'/'response', "
        "'instruction'/'input'/'output' (Alpaca) or 'messages' (chat), or set data.format"
    )


def to_example(record: dict, shape: str, where: str) -> Example:
    """One record of `shape` as an `Example` (see the module docstring for each shape)."""
    if shape == "prompt_response":
        prompt, response = _text(record, "prompt", where), _text(record, "response", where)
        example = Example(prompt, response)
    elif shape == "alpaca":
        instruction = _text(record, "instruction", where, optional=True).strip()
        extra = _text(record, "input", where, optional=True).strip()
        prompt = f"{instruction}\n\n{extra}" if extra else instruction
        example = Example(prompt, _text(record, "output", where).strip())
    else:
        example = _chat_example(record, where)
    if not example.response:
        raise DataError(f"{where}: empty response")
    return example


def _chat_example(record: dict, where: str) -> Example:
    messages = record.get("messages")
    if not isinstance(messages, list) or len(messages) < 2:
        raise DataError(
            f"{where}: 'messages' must be a list of at least two messages (a prompt, then "
            "the assistant's response)"
        )
    turns = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not all(
            isinstance(message.get(key), str) for key in ("role", "content")
        ):
            raise DataError(
                f"{where}: message {index} must be an object with string 'role' and 'content'"
            )
        turns.append((message["role"], message["content"]))
    if turns[-1][0] != "assistant":
        raise DataError(
            f"{where}: the last message is the response and must be the assistant's, "
            f"got role {turns[-1][0]!r}"
        )
    prompt = "\n\n".join(content for _, content in turns[:-1])
    return Example(prompt, turns[-1][1], messages=tuple(turns[:-1]))


def _text(record: dict, key: str, where: str, *, optional: bool = False) -> str:
    value = record.get(key)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: missing string field {key!r}")
    return value


# --------------------------------------------------------------------------- reading files


def read_records(path: Path, *, split: str = "train") -> list[tuple[str, Any]]:
    """(where, record) pairs of a data file in file order; `where` names the file and the line
    (JSONL) or the record number (1-based) for error messages."""
    if path.is_dir():
        return _dataset_folder(path, split)
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist")
    if path.suffix.lower() == ".parquet":
        return _numbered(path, _parquet_rows(path))
    text = _utf8(path)
    if path.suffix.lower() == ".json":
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            if error.msg != "Extra data":  # one object per line: JSONL under a .json name
                raise DataError(f"{path}: not valid JSON ({error})") from None
        else:
            return _numbered(path, _json_rows(path, value))
    return _jsonl(path, text)


def _numbered(path: Path, rows: list) -> list[tuple[str, Any]]:
    return [(f"{path}: record {number}", row) for number, row in enumerate(rows, start=1)]


def _utf8(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text; save the file as UTF-8") from None


def _jsonl(path: Path, text: str) -> list[tuple[str, Any]]:
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((f"{path}:{number}", json.loads(line)))
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{number}: not valid JSON ({error.msg})") from None
    return records


def _json_rows(path: Path, value: Any) -> list:
    """A list of records, or an object of equal-length columns turned into records."""
    if isinstance(value, list):
        return value
    columns = value if isinstance(value, dict) else None
    if not columns or not all(isinstance(c, list) for c in columns.values()):
        raise DataError(
            f"{path}: expected a JSON list of records or an object of equal-length lists, "
            f"got {type(value).__name__}"
        )
    lengths = {name: len(column) for name, column in columns.items()}
    if len(set(lengths.values())) != 1:
        raise DataError(f"{path}: columns of different lengths {lengths}")
    names = list(columns)
    return [dict(zip(names, row)) for row in zip(*columns.values())]


def _parquet_rows(path: Path) -> list:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            f"reading {str(path)!r} needs pyarrow: pip install 'memdlm-toolkit[hf]'"
        ) from None
    try:
        return pq.read_table(path).to_pylist()
    except Exception as error:  # pyarrow raises several types for a file that is not Parquet
        raise DataError(f"{path}: not a Parquet file ({type(error).__name__}: {error})") from None


def _dataset_folder(path: Path, split: str) -> list[tuple[str, Any]]:
    """The records of a `datasets` `save_to_disk` folder (one split of a `DatasetDict`)."""
    if not any((path / marker).is_file() for marker in DATASET_MARKERS):
        raise DataError(
            f"data file {str(path)!r} is a folder but not a `datasets` save_to_disk folder "
            "(no dataset_info.json or dataset_dict.json); give a JSONL, JSON or Parquet file"
        )
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"reading {str(path)!r} needs the datasets package: pip install 'memdlm-toolkit[hf]'"
        ) from None
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        wanted = ("train",) if split == "train" else ("test", "validation")
        found = [name for name in wanted if name in loaded]
        if not found:
            raise DataError(
                f"{path}: a DatasetDict without a {' or '.join(map(repr, wanted))} split "
                f"(it has {sorted(loaded)})"
            )
        loaded = loaded[found[0]]
        path = path / found[0]
    return _numbered(path, loaded.to_list())
