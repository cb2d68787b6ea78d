"""Embedded data: exact prompt lengths, needles where they belong, reproducibility, JSONL errors."""

from __future__ import annotations

import random
import re

import pytest

from recipes.memdlm.data.batches import (
    BatchSampler,
    StagedSampler,
    collate,
    encode,
    fixed_batches,
)
from recipes.memdlm.data.formats import load_examples
from recipes.memdlm.data.tasks import (
    ByteTokenizer,
    DataError,
    Example,
    filler_text,
    make_example,
    make_split,
)

TOK = ByteTokenizer()
TASKS = ("single", "multikey", "multivalue", "vt")


def test_filler_is_english_prose_without_digits_or_capitals_and_splits_are_disjoint():
    train, held_out = filler_text("train"), filler_text("eval")
    assert len(train) > 50_000 and len(held_out) > 5_000
    assert not re.search(r"[0-9A-Z]", train + held_out)
    assert train.count(" the ") > 500  # real English
    assert held_out[:200] not in train


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("length", [96, 128, 192])
def test_retrieval_prompts_have_exact_length_and_recoverable_answers(task, length):
    rng = random.Random(f"{task}{length}")
    for _ in range(20):
        example = make_example(task, length, rng, "train")
        assert len(TOK.encode(example.prompt)) == length
        digits = re.findall(r"\d[A-Z]", example.prompt)
        if task == "single":
            key = example.prompt.rsplit("\n", 1)[1].split()[0]
            assert f"{key} code is {example.response}." in example.prompt
            assert digits == [example.response]
        elif task == "multikey":
            key = example.prompt.rsplit("\n", 1)[1].split()[0]
            assert f"{key} code is {example.response}." in example.prompt and len(digits) == 3
        elif task == "multivalue":
            first, second = example.response.split()
            assert digits == [first, second]
        else:  # vt: the answer's variables hold the value asked about
            first, second = example.response.split()
            value = example.prompt.rsplit("= ", 1)[1][:2]
            assert f"VAR {first} = {value}." in example.prompt
            assert f"VAR {second} = VAR {first}." in example.prompt


def test_needle_depths_are_spread_over_the_context():
    rng = random.Random(0)
    depths = []
    for _ in range(300):
        example = make_example("single", 192, rng, "train")
        depths.append(example.prompt.index(" code is ") / 192)
    # Uniform depths: each third of the filler receives a fair share of the needles.
    thirds = [sum(lo <= d < lo + 0.3 for d in depths) for lo in (0.0, 0.3, 0.6)]
    assert min(thirds) > 60


def test_splits_are_reproducible_and_seed_dependent():
    a = make_split(TASKS, [96], 5, seed=1, split="eval")
    b = make_split(TASKS, [96], 5, seed=1, split="eval")
    c = make_split(TASKS, [96], 5, seed=2, split="eval")
    assert a == b and a != c and len(a) == 20


def test_too_short_context_is_a_data_error():
    with pytest.raises(DataError, match="too short"):
        make_example("multikey", 48, random.Random(0), "train")


def test_continuation_pairs_continue_the_text():
    example = make_example("continuation", 64, random.Random(3), "train", response_len=16)
    assert len(example.prompt) == 64 and len(example.response) == 16
    assert example.prompt + example.response in filler_text("train")


def test_jsonl_errors_name_file_and_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "a"}\n')
    with pytest.raises(DataError, match=r"data.jsonl:3: missing string field 'response'"):
        load_examples(path)
    path.write_text('{"prompt": "a", "response": "b"}\n{oops\n')
    with pytest.raises(DataError, match=r"data.jsonl:2: not valid JSON"):
        load_examples(path)
    path.write_text("[1, 2]\n")
    with pytest.raises(DataError, match=r"data.jsonl:1: expected an object"):
        load_examples(path)
    path.write_text("\n")
    with pytest.raises(DataError, match="holds no examples"):
        load_examples(path)
    with pytest.raises(DataError, match="does not exist"):
        load_examples(tmp_path / "missing.jsonl")
    path.write_text('{"prompt": "a", "response": "ok"}\n')
    assert load_examples(path) == [Example("a", "ok")]


def test_length_policy_filters_or_truncates_and_counts():
    examples = [Example("p" * 4, "r" * 3), Example("p" * 4, "r" * 10), Example("p" * 12, "r")]
    kept, report = encode(examples, TOK, max_len=10, policy="filter")
    assert (report.kept, report.filtered, report.truncated) == (1, 2, 0)
    kept, report = encode(examples, TOK, max_len=10, policy="truncate")
    assert (report.kept, report.filtered, report.truncated) == (2, 1, 1)
    assert all(len(row) <= 10 for row in kept) and kept[0].response[-1] == TOK.eos_id
    with pytest.raises(DataError, match="no example fits"):
        encode(examples, TOK, max_len=4, policy="filter")


def test_collate_never_marks_the_prompt_maskable_and_pads_with_eos():
    rows, _ = encode([Example("abc", "de"), Example("a", "b")], TOK, max_len=32, policy="filter")
    batch = collate(rows, TOK.eos_id)
    assert batch.x0.tolist()[1] == [97, 98, TOK.eos_id, TOK.eos_id, TOK.eos_id, TOK.eos_id]
    assert batch.maskable.tolist() == [[False] * 3 + [True] * 3, [False] + [True] * 5]
    assert batch.prompt_lengths.tolist() == [3, 1]


def test_sampler_groups_equal_lengths_and_resumes_exactly():
    examples = make_split(["single"], [96, 128], 40, seed=0, split="train")
    rows, _ = encode(examples, TOK, max_len=512, policy="filter")
    sampler = BatchSampler(rows, 8, seed=5, eos_id=TOK.eos_id)
    first = [sampler.next() for _ in range(3)]
    assert all(len(set(b.prompt_lengths.tolist())) == 1 for b in first)  # no padding needed
    state = sampler.state_dict()
    later = [sampler.next().x0 for _ in range(3)]
    sampler.load_state_dict(state)
    assert all((a == sampler.next().x0).all() for a in later)


def test_fixed_batches_cover_every_row_once():
    examples = make_split(["single", "vt"], [96, 128], 7, seed=0, split="eval")
    rows, _ = encode(examples, TOK, max_len=512, policy="filter")
    batches = fixed_batches(rows, 4, TOK.eos_id)
    assert sum(b.x0.shape[0] for b in batches) == len(rows)
    assert all(len(set(b.prompt_lengths.tolist())) == 1 for b in batches)


def _rows(task: str, length: int, n: int = 16):
    return encode(
        make_split([task], [length], n, seed=0, split="train"), TOK, max_len=512, policy="filter"
    )[0]


def test_staged_sampler_serves_each_stage_its_draws_then_the_last_to_the_end():
    short, long = _rows("single", 48), _rows("single", 96)
    staged = StagedSampler(
        [
            BatchSampler(short, 4, seed=1, eos_id=TOK.eos_id),
            BatchSampler(long, 4, seed=2, eos_id=TOK.eos_id),
        ],
        ends=[3],
    )
    lengths = [int(staged.next().prompt_lengths[0]) for _ in range(7)]
    assert lengths == [48, 48, 48, 96, 96, 96, 96]


def test_staged_sampler_resumes_exactly_across_a_stage_boundary():
    def fresh():
        return StagedSampler(
            [
                BatchSampler(_rows("single", 48), 4, seed=1, eos_id=TOK.eos_id),
                BatchSampler(_rows("single", 64), 4, seed=2, eos_id=TOK.eos_id),
                BatchSampler(_rows("single", 96), 4, seed=3, eos_id=TOK.eos_id),
            ],
            ends=[2, 4],
        )

    reference = fresh()
    uninterrupted = [reference.next().x0 for _ in range(8)]
    first = fresh()
    for _ in range(3):  # stopped inside the second stage
        first.next()
    resumed = fresh()
    resumed.load_state_dict(first.state_dict())
    assert all((a == resumed.next().x0).all() for a in uninterrupted[3:])


@pytest.mark.parametrize("ends", [[3, 2], [-1]])
def test_staged_sampler_rejects_stage_ends_out_of_order(ends):
    samplers = [BatchSampler(_rows("single", 48), 4, seed=1, eos_id=TOK.eos_id)] * (len(ends) + 1)
    with pytest.raises(ValueError, match="increasing"):
        StagedSampler(samplers, ends)


def _curriculum_config(**data):
    from recipes.memdlm.config import build_config

    stage = {"tasks": ["single"], "context_lengths": [48], "fraction": 0.5}
    return build_config(
        "smoke",
        overrides={"pretrain": {"steps": 6}, "data": {"pretrain_curriculum": [stage], **data}},
    )


def test_pretraining_draws_the_curriculum_stage_for_its_share_of_the_steps():
    from recipes.memdlm.data.prepare import prepare_data, pretrain_sampler

    cfg = _curriculum_config()  # smoke pretrains at 96 bytes; the stage is 48 bytes, 3 of 6 steps
    data = prepare_data(cfg)
    sampler = pretrain_sampler(cfg, data)
    lengths = [int(sampler.next().prompt_lengths[0]) for _ in range(cfg.pretrain.steps)]
    assert lengths == [48, 48, 48, 96, 96, 96]
    assert data.reports["pretrain_curriculum[0]"].kept == cfg.data.examples_per_cell


def test_a_users_training_file_is_pretrained_on_without_the_embedded_curriculum(tmp_path):
    from recipes.memdlm.data.batches import BatchSampler as Plain
    from recipes.memdlm.data.prepare import prepare_data, pretrain_sampler

    path = tmp_path / "train.jsonl"
    path.write_text("".join(f'{{"prompt": "q{i}", "response": "a{i}"}}\n' for i in range(40)))
    cfg = _curriculum_config(train_file=str(path))
    data = prepare_data(cfg)
    assert data.pretrain_curriculum == []
    assert isinstance(pretrain_sampler(cfg, data), Plain)


def test_a_curriculum_that_leaves_no_steps_for_the_mixture_is_refused():
    from recipes.memdlm.config import ConfigError, build_config

    stage = {"tasks": ["single"], "context_lengths": [48], "fraction": 0.6}
    with pytest.raises(ConfigError, match="sum to less than 1"):
        build_config(overrides={"data": {"pretrain_curriculum": [stage, stage]}})
