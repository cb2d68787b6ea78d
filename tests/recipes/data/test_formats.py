"""Data files: JSONL, JSON, Parquet and `datasets` folders hold the same examples; record shapes
by their keys or `data.format`; one-line errors naming the file and the record."""

from __future__ import annotations

import json

import pytest

from recipes.memdlm.data.formats import load_examples
from recipes.memdlm.data.tasks import DataError, Example

RECORDS = [
    {"prompt": "what is amber?", "response": "a colour"},
    {"instruction": " name it ", "input": " the amber key ", "output": " 7K "},
    {"instruction": "no input", "input": "", "output": "yes"},
    {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "first?"},
            {"role": "assistant", "content": "one"},
            {"role": "user", "content": "second?"},
            {"role": "assistant", "content": "two"},
        ]
    },
]
TURNS = (("system", "be brief"), ("user", "first?"), ("assistant", "one"), ("user", "second?"))
EXPECTED = [
    Example("what is amber?", "a colour"),
    Example("name it\n\nthe amber key", "7K"),
    Example("no input", "yes"),
    Example("be brief\n\nfirst?\n\none\n\nsecond?", "two", messages=TURNS),
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_every_shape_recognised_by_its_keys(tmp_path):
    assert load_examples(write_jsonl(tmp_path / "d.jsonl", RECORDS)) == EXPECTED
    assert EXPECTED[3].conversation()[-1] == {"role": "user", "content": "second?"}
    assert Example("p", "r").conversation() == [{"role": "user", "content": "p"}]


def test_json_list_columns_and_lines_read_the_same(tmp_path):
    alpaca = [r for r in RECORDS if "instruction" in r]
    expected = [e for e, r in zip(EXPECTED, RECORDS) if "instruction" in r]
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps(alpaca, indent=2))
    columns = tmp_path / "columns.json"
    columns.write_text(json.dumps({k: [r[k] for r in alpaca] for k in alpaca[0]}))
    lines = write_jsonl(tmp_path / "lines.json", alpaca)
    for path in (listed, columns, lines):
        assert load_examples(path) == expected


def test_parquet_and_datasets_folders_read_the_same(tmp_path):
    datasets = pytest.importorskip("datasets")
    pq = pytest.importorskip("pyarrow.parquet")
    pa = pytest.importorskip("pyarrow")
    chat = [RECORDS[3], {"messages": [{"role": "user", "content": "a"}, RECORDS[3]["messages"][2]]}]
    expected = [EXPECTED[3], Example("a", "one", messages=(("user", "a"),))]
    pq.write_table(pa.Table.from_pylist(chat), tmp_path / "chat.parquet")
    assert load_examples(tmp_path / "chat.parquet") == expected
    datasets.Dataset.from_list(chat).save_to_disk(tmp_path / "ds")
    assert load_examples(tmp_path / "ds") == expected
    both = datasets.DatasetDict(
        train=datasets.Dataset.from_list(chat), test=datasets.Dataset.from_list(chat[1:])
    )
    both.save_to_disk(tmp_path / "dd")
    assert load_examples(tmp_path / "dd", split="train") == expected
    assert load_examples(tmp_path / "dd", split="eval") == expected[1:]
    datasets.DatasetDict(validation=both["test"]).save_to_disk(tmp_path / "val")
    assert load_examples(tmp_path / "val", split="eval") == expected[1:]
    with pytest.raises(DataError, match=r"val: a DatasetDict without a 'train' split"):
        load_examples(tmp_path / "val")


def test_a_named_format_reads_every_record_as_that_shape(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", RECORDS[1:3])
    assert load_examples(path, "alpaca") == EXPECTED[1:3]
    with pytest.raises(DataError, match=r"d.jsonl:1: missing string field 'prompt'"):
        load_examples(path, "prompt_response")
    with pytest.raises(DataError, match=r"d.jsonl:1: 'messages' must be a list"):
        load_examples(path, "chat")


USER, ANSWER = '{"role": "user", "content": "a"}', '{"role": "assistant", "content": "b"}'


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("d.jsonl", '{"prompt": "a", "response": "b"}\n{"text": "x"}\n',
         r"d.jsonl:2: unknown record shape \(keys \['text'\]\)"),
        ("d.jsonl", '{"instruction": "a"}\n', r"d.jsonl:1: missing string field 'output'"),
        ("d.jsonl", '{"instruction": "a", "output": "  "}\n', r"d.jsonl:1: empty response"),
        ("d.jsonl", f'{{"messages": [{USER}, {USER}]}}\n',
         r"d.jsonl:1: .*must be the assistant's, got role 'user'"),
        ("d.jsonl", f'{{"messages": [{{"role": "user"}}, {ANSWER}]}}\n',
         r"d.jsonl:1: message 0 must be an object"),
        ("d.jsonl", f'{{"messages": [{ANSWER}]}}\n', r"d.jsonl:1: 'messages' must be a list"),
        ("d.json", '[{"prompt": "a", "response": "b"}, {"prompt": "a"}]',
         r"d.json: record 2: missing string field 'response'"),
        ("d.json", "[]", r"d.json' holds no examples"),
        ("d.json", '{"a": [1], "b": [1, 2]}', r"d.json: columns of different lengths"),
        ("d.json", '"text"', r"d.json: expected a JSON list of records"),
        ("d.json", "[1, 2", r"d.json: not valid JSON"),
        ("d.parquet", "not parquet", r"d.parquet: not a Parquet file"),
        ("d.jsonl", "", r"d.jsonl' holds no examples"),
    ],
)  # fmt: skip
def test_errors_name_the_file_and_the_record(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=expected):
        load_examples(path)


def test_a_folder_that_is_not_a_dataset(tmp_path):
    with pytest.raises(DataError, match="is a folder but not a `datasets` save_to_disk folder"):
        load_examples(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        load_examples(tmp_path / "missing.parquet")
