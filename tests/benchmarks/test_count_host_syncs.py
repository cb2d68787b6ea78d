"""The host-sync counter (`benchmarks/count_host_syncs.py`) counts a known synthetic function
exactly, by call site, and only between optimizer steps."""

from __future__ import annotations

import sys

import pytest
import torch

from benchmarks.count_host_syncs import EnoughSteps, HostSyncCounter, count_syncs


def _line(offset: int) -> str:
    """file:line of the caller's line + offset, as the counter names call sites."""
    frame = sys._getframe(1)
    return f"tests/benchmarks/test_count_host_syncs.py:{frame.f_lineno + offset}"


def test_each_kind_of_host_read_is_counted_once_at_its_line():
    x = torch.arange(6.0)
    mask = x > 2
    here = _line(3)

    def reads():
        bool(x.sum() > 0), int(x[0]), float(x[1]), x[2].item(), x.tolist()  # 5
        x[mask], x.nonzero(), torch.equal(x, x), torch.where(mask)  # 4
        x.masked_select(mask), torch.unique(x), x.repeat_interleave(x.long())  # 3
        x[1:3], x[torch.tensor([1, 2])], x * 2, torch.where(mask, x, 0.0)  # none
        x.repeat_interleave(x.long(), output_size=15)  # none: the size is given

    report = count_syncs(reads)
    first = int(here.rsplit(":", 1)[1])
    expected = {f"{here.rsplit(':', 1)[0]}:{first + i}": n for i, n in enumerate((5, 4, 3))}
    assert dict(report.by_site()) == expected
    assert report.per_step() == [12]


def test_only_the_work_between_two_optimizer_steps_is_counted():
    w = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.Adam([w], lr=0.1)  # its step count is a CPU tensor it reads

    def step(k):
        loss = (w * k).square().sum()
        for _ in range(k):
            loss.item()  # k reads in window k
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    with HostSyncCounter() as counter:
        bool(w.sum() > 0)  # before the first step: not in a full window
        for k in range(1, 5):
            step(k)
        w.sum().item()  # after the last step: an open window, dropped
    assert counter.report.per_step() == [2, 3, 4]  # windows after steps 1, 2, 3


def test_excluded_paths_are_not_counted_and_stop_after_ends_the_run():
    w = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([w], lr=0.1)
    counter = HostSyncCounter(exclude=("tests/benchmarks/",), stop_after=2)
    with pytest.raises(EnoughSteps), counter:
        for _ in range(10):
            w.sum().item()
            optimizer.zero_grad()
            w.sum().backward()
            optimizer.step()
    assert counter.report.per_step() == [0, 0]
