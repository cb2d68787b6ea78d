"""Epoch batches and length grouping (recipes/memdlm/data/epochs.py).

Oracle: transformers' own `get_length_grouped_indices` (the function behind the Trainer's
`group_by_length`), fed the same torch generator state.
"""

from __future__ import annotations

import collections

import pytest
import torch

from recipes.memdlm.data.batches import Encoded
from recipes.memdlm.data.epochs import EpochSampler, length_grouped_order, steps_per_epoch
from recipes.memdlm.data.tasks import DataError

pt_utils = pytest.importorskip("transformers.trainer_pt_utils")


def rows_of(lengths, prompt=2):
    return [Encoded(tuple(range(prompt)), tuple([7] * (n - prompt))) for n in lengths]


@pytest.mark.parametrize(
    ("n", "batch", "seed"), [(1000, 2, 0), (1000, 4, 1), (37, 2, 2), (7, 3, 3), (1, 2, 4)]
)
def test_length_grouping_is_transformers_order(n, batch, seed):
    # Many ties (lengths 3..40) check that both sorts are stable; (1000, 2) uses mult 50.
    lengths = torch.randint(3, 41, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    ours = length_grouped_order(lengths, batch, torch.Generator().manual_seed(seed + 10))
    theirs = pt_utils.get_length_grouped_indices(
        lengths, batch, generator=torch.Generator().manual_seed(seed + 10)
    )
    assert ours == theirs
    assert sorted(ours) == list(range(n))
    assert lengths[ours[0]] == max(lengths)  # the longest row comes first


def test_megabatches_are_sorted_longest_first():
    lengths = list(range(5, 805))  # 800 rows, batch 2: megabatches of 100 (mult 50)
    order = length_grouped_order(lengths, 2, torch.Generator().manual_seed(0))
    chunks = [order[i : i + 100] for i in range(0, 800, 100)]
    assert lengths[order[0]] == 804
    for chunk in chunks:  # the first places of two of them were swapped (the longest first)
        values = [lengths[i] for i in chunk[1:]]
        assert values == sorted(values, reverse=True)


def test_every_row_once_per_epoch_and_the_last_batch_filled_from_the_start():
    rows = rows_of([5 + i % 9 for i in range(30)])
    sampler = EpochSampler(rows, 8, seed=3, eos_id=0, group_by_length=True, group_batch=4)
    assert sampler.steps_per_epoch == steps_per_epoch(30, 8) == 4
    for epoch in range(3):
        picks = [sampler.indices(epoch, p) for p in range(4)]
        flat = [i for batch in picks for i in batch]
        order = sampler.order(epoch)
        assert flat == order + order[:2]  # 32 = 30 rows + the epoch's first 2 again
        assert collections.Counter(order) == collections.Counter(range(30))
    assert sampler.order(0) != sampler.order(1)  # a new permutation each epoch


def test_batches_follow_the_state_and_resume_where_they_stopped():
    rows = rows_of([4 + i % 13 for i in range(21)])
    a = EpochSampler(rows, 4, seed=1, eos_id=0, group_by_length=True, group_batch=2)
    straight = [a.next() for _ in range(14)]  # 6 steps per epoch: crosses two epoch ends
    b = EpochSampler(rows, 4, seed=1, eos_id=0, group_by_length=True, group_batch=2)
    for _ in range(8):
        b.next()
    state = b.state_dict()
    assert state == {"epoch": 1, "position": 2, "batch_size": 4}
    with pytest.raises(DataError, match="same number of processes"):
        EpochSampler(rows, 8, seed=1, eos_id=0).load_state_dict(state)
    c = EpochSampler(rows, 4, seed=1, eos_id=0, group_by_length=True, group_batch=2)
    c.load_state_dict(state)
    for expected in straight[8:]:
        got = c.next()
        assert torch.equal(got.x0, expected.x0) and torch.equal(got.maskable, expected.maskable)


def test_grouped_batches_need_less_padding_than_random_ones():
    lengths = [4 + (i * 37) % 200 for i in range(400)]
    rows = rows_of(lengths)

    def padding(grouped: bool) -> int:
        s = EpochSampler(rows, 4, seed=0, eos_id=0, group_by_length=grouped)
        return sum(s.next().x0.numel() for _ in range(100))

    # Tokens in 100 batches (padding included): sorted megabatches pad far less.
    assert padding(True) < 0.7 * padding(False)
