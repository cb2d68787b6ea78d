"""The 5% held out of a training file (data/prepare.py `held_out_split`): `datasets` is Hugging
Face datasets' own `train_test_split(test_size=0.05, seed=...)`, the authors' LongAlpaca split."""

from __future__ import annotations

import random

import pytest

from recipes.memdlm.data.prepare import held_out_split
from recipes.memdlm.data.tasks import DataError

datasets = pytest.importorskip("datasets")


@pytest.mark.parametrize(("n", "seed"), [(12000, 42), (101, 42), (20, 0), (2, 7)])
def test_the_datasets_rule_is_train_test_split(n, seed):
    rows = list(range(n))
    held, train = held_out_split(rows, seed, "datasets")
    split = datasets.Dataset.from_dict({"i": rows}).train_test_split(test_size=0.05, seed=seed)
    assert held == split["test"]["i"] and train == split["train"]["i"]


def test_the_recipe_rule_is_the_seeded_shuffle():
    rows = list(range(103))
    shuffled = rows[:]
    random.Random(5).shuffle(shuffled)
    assert held_out_split(rows, 5) == (shuffled[:5], shuffled[5:])
    with pytest.raises(DataError, match="two examples"):
        held_out_split([1], 0, "datasets")
