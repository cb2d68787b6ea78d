"""The comparison's report (recipes/memdlm/eval/report.py): a seed with a non-finite value is left
out of that value's mean, and the summary, the table and the verdict name it."""

from __future__ import annotations

import math

import pytest
from rich.console import Console

from recipes.memdlm.eval.report import method_summary, paired, print_report


def record(seed: int, eval_loss: float, acc: float = 0.5, adapted: bool = False) -> dict:
    r = {
        "seed": seed,
        "train_loss_final": 2.0 + seed / 10,
        "seconds_per_step": 0.1,
        "eval_loss": eval_loss,
        "niah_accuracy": {"64": acc, "128": acc},
        "niah_char_accuracy": {"64": acc, "128": acc},
        "niah_accuracy_by_task": {"kv": {"64": acc}},
        "exposure_bias": [1.0, 1.1],
    }
    if adapted:
        r.update(
            eval_loss_adapted=eval_loss,
            eval_loss_answer_adapted=eval_loss,
            niah_accuracy_adapted={"64": acc, "128": acc},
            niah_char_accuracy_adapted={"64": acc, "128": acc},
            exposure_bias_adapted=[1.0, 1.05],
            train_loss_off_final=2.5,
            gap_final=0.1,
            inner_grad_norm_final=0.3,
        )
    return r


def summaries():
    standard = [record(1, 3.0), record(2, 3.2), record(3, 3.1)]
    memdlm = [record(1, 2.9, adapted=True), record(2, math.nan, adapted=True)]
    memdlm.append(record(3, 3.0, acc=math.inf, adapted=True))
    return {
        "seeds": [1, 2, 3],
        "standard": method_summary(standard),
        "memdlm": method_summary(memdlm),
        "paired": paired(standard, memdlm),
    }


def test_a_non_finite_seed_is_left_out_of_the_mean_and_named_in_the_summary():
    summary = summaries()
    mem = summary["memdlm"]
    assert mem["eval_loss"] == pytest.approx((2.9 + 3.0) / 2)  # seed 2 left out
    assert mem["dropped_seeds"] == {
        "eval_loss": [2],
        "eval_loss_adapted": [2],
        "eval_loss_answer_adapted": [2],
        "niah_accuracy": [3],
        "niah_accuracy_adapted": [3],
        "niah_char_accuracy": [3],
        "niah_char_accuracy_adapted": [3],
    }
    assert summary["standard"]["dropped_seeds"] == {}
    pair = summary["paired"]
    assert pair["dropped_seeds"] == {
        "eval_loss_delta": [2],
        "niah_accuracy_delta": [3],
        "niah_char_accuracy_delta": [3],
    }
    assert pair["verdict"][0].endswith("Left out: seed(s) [2] (non-finite difference).")
    assert pair["verdict"][1].endswith("Left out: seed(s) [3] (non-finite difference).")


def test_the_printed_table_and_verdict_name_the_seeds_left_out():
    console = Console(record=True, width=400)
    print_report(summaries(), console)
    text = console.export_text()
    assert "Non-finite values left out of the means (7 of them)" in text
    assert "MemDLM eval_loss seed [2]" in text and "MemDLM niah_accuracy seed [3]" in text
    assert "Left out: seed(s) [2]" in text


def test_nothing_left_out_says_nothing():
    standard = [record(1, 3.0), record(2, 3.2)]
    memdlm = [record(1, 2.9, adapted=True), record(2, 3.1, adapted=True)]
    summary = {
        "seeds": [1, 2],
        "standard": method_summary(standard),
        "memdlm": method_summary(memdlm),
        "paired": paired(standard, memdlm),
    }
    assert summary["memdlm"]["dropped_seeds"] == {} and summary["paired"]["dropped_seeds"] == {}
    console = Console(record=True, width=400)
    print_report(summary, console)
    assert "left out" not in console.export_text().lower()
