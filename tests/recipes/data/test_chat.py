"""`model.chat_template`: the token ids of the MemDLM authors' pipeline, exactly.

The oracle below is written from reading dllm's Alpaca loader and `default_sft_map_fn` (the
pipeline of JarvisPei/MemDLM `examples/llada/sft.py`), independently of recipes/memdlm/data:
the Alpaca prompt is the stripped instruction, a blank line and the stripped input (the
instruction alone without input), the response the stripped output; input_ids are the template
over [user, assistant] (or the chat's messages) without a generation prompt; the first
`len(template(messages[:-1], generation prompt))` labels are -100; no EOS is appended;
`truncation="right"` keeps rows whose prompt fits and clips them on the right, `"filter"` keeps
rows no longer than `max_length`.
"""

from __future__ import annotations

import json

import pytest

from recipes.memdlm.config import build_config
from recipes.memdlm.data.prepare import prepare_data
from recipes.memdlm.errors import UserError

transformers = pytest.importorskip("transformers")

ALPACA = [
    {
        "instruction": "  name the code of the amber key. ",
        "input": "amber code is 7K.",
        "output": "7K",
    },
    {"instruction": "say the word apple twice", "input": "", "output": " apple apple \n"},
    {"instruction": "count the letters", "input": "   ", "output": "none"},
    {"instruction": "the last one, no input key", "output": "done"},
]
CHAT = [
    {
        "messages": [
            {"role": "system", "content": "you answer in one word."},
            {"role": "user", "content": "what is the first key?"},
            {"role": "assistant", "content": "amber"},
            {"role": "user", "content": "and the second?"},
            {"role": "assistant", "content": " badger "},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hello to you"},
        ]
    },
]


# --------------------------------------------------------------------------- the oracle


def authors_messages(record: dict) -> list[dict]:
    if "messages" in record:
        return record["messages"]
    if "prompt" in record:  # no loader of theirs: the user and assistant turns, as given
        return [
            {"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": record["response"]},
        ]
    instruction = (record.get("instruction", "") or "").strip()
    extra = (record.get("input", "") or "").strip()
    prompt = instruction + "\n\n" + extra if extra else instruction
    response = (record.get("output", "") or "").strip()
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def authors_row(record: dict, tok) -> dict:
    messages = authors_messages(record)
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=False)
    head = tok.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True)
    labels = list(ids)
    labels[: len(head)] = [-100] * len(head)
    return {"input_ids": list(ids), "labels": labels, "prompt_len": len(head)}


def authors_post_process(rows: list[dict], max_length: int, truncation: str) -> list[dict]:
    if truncation == "filter":
        return [r for r in rows if len(r["input_ids"]) <= max_length]
    kept = [r for r in rows if r["prompt_len"] <= max_length]
    return [{**r, "input_ids": r["input_ids"][:max_length], "labels": r["labels"][:max_length]}
            for r in kept]  # fmt: skip


# --------------------------------------------------------------------------- the recipe


def recipe_rows(tmp_path, tokenizer_dir, records, **data) -> list[dict]:
    """The recipe's training rows of `records` (written as JSONL), as input_ids and labels."""
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in records))
    held_out = tmp_path / "eval.jsonl"
    held_out.write_text(train.read_text())
    overrides = {
        "device": "cpu",
        "model": {"path": str(tokenizer_dir), "chat_template": True, **data.pop("model", {})},
        "data": {"train_file": str(train), "eval_file": str(held_out), **data},
    }
    rows = prepare_data(build_config("smoke", None, overrides)).train
    return [
        {
            "input_ids": [*row.prompt, *row.response],
            "labels": [-100] * len(row.prompt) + list(row.response),
            "prompt_len": len(row.prompt),
        }
        for row in rows
    ]


@pytest.fixture(scope="module")
def tok(chat_tokenizer_dir):
    return transformers.AutoTokenizer.from_pretrained(chat_tokenizer_dir)


@pytest.mark.parametrize("records", [ALPACA, CHAT], ids=["alpaca", "chat"])
def test_token_ids_equal_the_authors_pipeline(tmp_path, chat_tokenizer_dir, tok, records):
    expected = [authors_row(r, tok) for r in records]
    assert recipe_rows(tmp_path, chat_tokenizer_dir, records) == expected


def test_the_alpaca_prompt_and_template_written_out(tmp_path, chat_tokenizer_dir, tok):
    """The shape itself, as text: a blank line between instruction and input, both stripped;
    the generation prompt in the unscored part; the end of turn closes the response, no EOS."""
    with_input, without_input = recipe_rows(tmp_path, chat_tokenizer_dir, ALPACA[:2])
    head = "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\n"
    answer = "<|start_header_id|>assistant<|end_header_id|>\n\n"
    n = with_input["prompt_len"]
    assert tok.decode(with_input["input_ids"][:n]) == (
        f"{head}name the code of the amber key.\n\namber code is 7K.<|eot_id|>{answer}"
    )
    assert tok.decode(with_input["input_ids"][n:]) == "7K<|eot_id|>"
    n = without_input["prompt_len"]
    assert tok.decode(without_input["input_ids"][:n]) == (
        f"{head}say the word apple twice<|eot_id|>{answer}"
    )
    assert tok.decode(without_input["input_ids"][n:]) == "apple apple<|eot_id|>"


def test_chat_with_system_and_several_turns_written_out(tmp_path, chat_tokenizer_dir, tok):
    (row, _) = recipe_rows(tmp_path, chat_tokenizer_dir, CHAT)
    n = row["prompt_len"]
    assert tok.decode(row["input_ids"][:n]).endswith(
        "and the second?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert "<|start_header_id|>system<|end_header_id|>\n\nyou answer" in tok.decode(
        row["input_ids"][:n]
    )
    assert tok.decode(row["input_ids"][n:]) == "badger<|eot_id|>"


@pytest.mark.parametrize(("policy", "truncation"), [("truncate", "right"), ("filter", "filter")])
def test_max_length_as_the_authors(tmp_path, chat_tokenizer_dir, tok, policy, truncation):
    records = ALPACA + CHAT
    rows = [authors_row(r, tok) for r in records]
    lengths = sorted(len(r["input_ids"]) for r in rows)
    prompts = sorted(r["prompt_len"] for r in rows)
    # Between the shortest and longest row, above every prompt but one: some rows are cut or
    # dropped, and (truncate) one prompt does not fit at all.
    max_length = max(lengths[1], prompts[-2] + 1)
    assert lengths[0] <= max_length < lengths[-1] and prompts[-1] > max_length
    expected = authors_post_process(rows, max_length, truncation)
    got = recipe_rows(
        tmp_path,
        chat_tokenizer_dir,
        records,
        max_len_policy=policy,
        model={"max_seq_len": max_length},
    )
    assert got == expected and 0 < len(got) < len(rows)


def test_a_tokenizer_without_a_template_is_one_line(tmp_path, chat_tokenizer_dir):
    plain = tmp_path / "plain"
    tok = transformers.AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    tok.chat_template = None
    tok.save_pretrained(plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(UserError, match="has no chat template"):
        recipe_rows(tmp_path, plain, ALPACA)
    with pytest.raises(UserError, match="needs a Hugging Face model"):
        prepare_data(build_config("smoke", None, {"model": {"chat_template": True}}))
