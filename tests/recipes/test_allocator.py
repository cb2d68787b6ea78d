"""Pinned glibc malloc thresholds (`allocator.py`): freed tensors stay in the process, so a
forward pass without gradient stops faulting its activations in again at every step."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

glibc_only = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="the thresholds are glibc's",
)

# Six no-grad passes of a chain of ~4 MiB activations, each freed right after use (the pattern
# of MemDLM's pre-anchor state); prints whether the thresholds were set and the minor page
# faults of the last two passes. Four passes of warm-up, not two: now and then (1 of several
# CI runs) the heap grew once more, by 8 MiB (2048 faults), in the third pass, then stayed.
PROBE = textwrap.dedent(
    """
    import resource, torch
    from recipes.memdlm.allocator import keep_freed_memory
    pinned = keep_freed_memory()
    torch.manual_seed(0)
    w = torch.randn(256, 256) / 16
    def forward_pass():
        with torch.no_grad():
            h = torch.randn(4096, 256)
            for _ in range(12):
                h = torch.tanh(h @ w) + h
        return float(h[0, 0])
    faults = []
    for _ in range(6):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        forward_pass()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(pinned, sum(faults[4:]))
    """
)


def probe(**env) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
    ).stdout.split()
    return out[0], int(out[1])


@glibc_only
def test_pinned_thresholds_leave_no_page_faults_in_repeated_passes():
    pinned, faults = probe()
    assert pinned == "True"
    # One pass allocates ~50 MiB (12 800 pages); pinned, the later passes reuse the heap.
    assert faults < 200, faults


@glibc_only
def test_thresholds_the_user_set_are_left_alone():
    pinned, _ = probe(MALLOC_TRIM_THRESHOLD_="131072")
    assert pinned == "False"
    # glibc's default behaviour (its default top pad, set explicitly, keeps the thresholds
    # dynamic): the same passes fault their pages in again, so the probe above can fail.
    pinned, faults = probe(MALLOC_TOP_PAD_="131072")
    assert pinned == "False" and faults > 5_000, faults
