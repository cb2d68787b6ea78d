"""`python -m recipes.memdlm data`: the encoded training rows, in file order, as the model sees
them (bytes worked out by hand; a chat template against the authors' pipeline)."""

from __future__ import annotations

import json

import pytest

from recipes.memdlm.cli import main

EOS = 258  # the byte tokenizer's EOS (data/tasks.py)
RECORDS = [
    {"prompt": "ab", "response": "c"},
    {"instruction": " do it ", "input": "now", "output": "ok "},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
]
# prompt bytes, then response bytes + EOS; Alpaca: instruction, blank line, input, all stripped.
BYTES = [
    {"input_ids": [*b"ab", *b"c", EOS], "prompt_length": 2},
    {"input_ids": [*b"do it\n\nnow", *b"ok", EOS], "prompt_length": 10},
    {"input_ids": [*b"hi", *b"yo", EOS], "prompt_length": 2},
]


def lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture
def train_file(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return path


def test_every_example_in_file_order(train_file, tmp_path, capsys):
    assert main(["data", "--data.train_file", str(train_file)]) == 0
    out, err = capsys.readouterr()
    assert lines(out) == BYTES
    assert "3 examples kept, 0 filtered and 0 truncated" in err
    target = tmp_path / "rows" / "rows.jsonl"
    assert main(["data", "--data.train_file", str(train_file), "--jsonl", str(target)]) == 0
    assert capsys.readouterr().out == "" and lines(target.read_text()) == BYTES


def test_length_policy_applies(train_file, capsys):
    args = ["data", "--data.train_file", str(train_file), "--model.max_seq_len", "4"]
    assert main([*args, "--data.max_len_policy", "truncate"]) == 0
    out, err = capsys.readouterr()
    assert lines(out) == [BYTES[0], {"input_ids": [*b"hi", *b"yo"], "prompt_length": 2}]
    assert "2 examples kept, 1 filtered and 1 truncated" in err


def test_show_marks_the_scored_part(train_file, capsys):
    assert main(["data", "--data.train_file", str(train_file), "--show", "2"]) == 0
    out = capsys.readouterr().out
    assert "example 1 (4 tokens: 2 prompt, 2 scored)\nab<scored>c<eos></scored>\n" in out
    assert "do it\n\nnow<scored>ok<eos></scored>" in out and "example 3" not in out


def test_chat_template_rows_equal_the_authors(train_file, tmp_path, capsys):
    from tests.recipes.data.chat_tokenizer import write_chat_tokenizer
    from tests.recipes.data.test_chat import authors_row

    transformers = pytest.importorskip("transformers")
    folder = write_chat_tokenizer(tmp_path / "tok")
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    args = ["data", "--model", str(folder), "--model.chat_template", "true"]
    assert main([*args, "--data.train_file", str(train_file), "--show", "1", "--jsonl",
                 str(tmp_path / "rows.jsonl")]) == 0  # fmt: skip
    expected = [authors_row(r, tok) for r in RECORDS]
    got = lines((tmp_path / "rows.jsonl").read_text())
    assert got == [
        {"input_ids": e["input_ids"], "prompt_length": e["prompt_len"]} for e in expected
    ]
    assert (
        "<|start_header_id|>assistant<|end_header_id|>\n\n<scored>c<|eot_id|></scored>"
        in capsys.readouterr().out
    )


def test_embedded_data_without_a_train_file(capsys):
    assert main(["data", "--data.examples_per_cell", "2", "--preset", "smoke"]) == 0
    out, err = capsys.readouterr()
    rows = lines(out)
    assert err.startswith("the embedded training set: ") and f"{len(rows)} examples kept" in err
    assert rows and all(row["input_ids"][-1] == EOS for row in rows)


def test_bad_file_is_one_line(tmp_path, capsys):
    assert main(["data", "--data.train_file", str(tmp_path / "none.jsonl")]) == 2
    assert capsys.readouterr().err.strip().endswith("none.jsonl' does not exist")
    with pytest.raises(SystemExit) as stopped:  # argparse: usage line, exit 2
        main(["data", "--show", "-1"])
    assert stopped.value.code == 2 and "expected a count >= 0, got -1" in capsys.readouterr().err
