"""Count host synchronisations per training step, by call site (file:line).

A host synchronisation is any operation that reads a tensor's values back to Python: `.item()`,
`.tolist()`, `bool(t)` / `int(t)` / `float(t)` / `t.__index__`, `nonzero`, boolean-mask
indexing (`x[mask]`, a data-dependent shape), `torch.equal`, `masked_select`, `unique`,
`argwhere`, one-argument `torch.where`, `repeat_interleave` without `output_size`, `.cpu()` /
`.numpy()`. On an accelerator each one stalls the stream until the queued work is done, breaks a
`torch.compile` graph and rules out CUDA graphs; on the CPU they cost little, which is why they
are counted here, on the CPU, rather than timed.

`HostSyncCounter` is a `torch.overrides.TorchFunctionMode`. It counts only between two optimizer
steps (a global `torch.optim` step hook opens a window when a step ends and closes it when the
next one begins), so the optimizer's own step counters are left out, and so is every call made
from a path listed in `exclude` (by default the recipe's batch sampler, `recipes/memdlm/data/`,
whose index work stays on the CPU in a GPU run). Each sync is attributed to its innermost
first-party frame (outside torch and this file).

    python benchmarks/count_host_syncs.py                    # both methods, 4 steps each
    python benchmarks/count_host_syncs.py --method memdlm --steps 3

or, from Python (e.g. in a test of the recipe):

    from benchmarks.count_host_syncs import count_train_syncs
    report = count_train_syncs("memdlm", steps=4)       # SyncReport
    report.per_step(), report.by_site()
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

ROOT = Path(__file__).resolve().parents[1]
_TORCH_DIR = str(Path(torch.__file__).resolve().parent)
_THIS = str(Path(__file__).resolve())
DEFAULT_EXCLUDE = ("recipes/memdlm/data/",)

_T = torch.Tensor
# Functions whose every call reads values back to the host.
_ALWAYS = {
    _T.item,
    _T.tolist,
    _T.__bool__,
    _T.__int__,
    _T.__float__,
    _T.__index__,
    _T.nonzero,
    torch.nonzero,
    torch.equal,
    _T.equal,
    torch.masked_select,
    _T.masked_select,
    torch.unique,
    _T.unique,
    torch.argwhere,
    _T.argwhere,
    _T.numpy,
}


def _has_bool_tensor(index) -> bool:
    """Whether an index (of `x[index]`) holds a bool/uint8 tensor: a data-dependent shape."""
    if isinstance(index, torch.Tensor):
        return index.dtype in (torch.bool, torch.uint8)
    if isinstance(index, (tuple, list)):
        return any(_has_bool_tensor(i) for i in index)
    return False


def is_host_sync(func, args: Sequence, kwargs: dict) -> bool:
    """Whether calling `func(*args, **kwargs)` reads tensor values back to the host."""
    if func in _ALWAYS:
        return True
    if func is _T.__getitem__:
        return _has_bool_tensor(args[1])
    if func is torch.where:
        return len(args) + len(kwargs) == 1
    if func in (torch.repeat_interleave, _T.repeat_interleave):
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        return isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None
    if func is _T.cpu:
        return args[0].device.type != "cpu"
    return False


def call_site(skip: Sequence[str] = ()) -> tuple[str, tuple[str, ...]]:
    """("file:line" of the innermost first-party frame, every first-party file on the stack).

    First party: outside torch and this module; paths relative to the repository root.
    """
    frame = sys._getframe(2)
    site, files = None, []
    while frame is not None:
        path = frame.f_code.co_filename
        if not path.startswith(_TORCH_DIR) and path != _THIS and "<" not in path:
            try:
                rel = str(Path(path).resolve().relative_to(ROOT))
            except ValueError:
                rel = path
            files.append(rel)
            if site is None:
                site = f"{rel}:{frame.f_lineno}"
        frame = frame.f_back
    return site or "<torch>", tuple(files)


@dataclass
class SyncReport:
    """Host syncs per window between two optimizer steps: `windows[i]` maps call site ->
    count for the i-th complete window (after step i+1, before step i+2)."""

    windows: list[collections.Counter] = field(default_factory=list)

    def per_step(self) -> list[int]:
        return [sum(w.values()) for w in self.windows]

    def by_site(self) -> collections.Counter:
        """Mean count per step at each site (a float when steps differ)."""
        total = collections.Counter()
        for window in self.windows:
            total.update(window)
        n = max(1, len(self.windows))
        return collections.Counter({k: v / n for k, v in total.items()})

    def table(self) -> str:
        lines = ["| call site | syncs per step |", "|---|---|"]
        for site, count in sorted(self.by_site().items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"| `{site}` | {count:g} |")
        return "\n".join(lines)


class EnoughSteps(Exception):
    """Raised from an optimizer step hook once `stop_after` windows are counted."""


class HostSyncCounter(TorchFunctionMode):
    """Count host syncs by call site while active.

    windowed=True: count only between optimizer steps (see the module docstring); the first
    window opens when the first step ends, and the window open when the mode exits is
    dropped (it is not a full step). windowed=False: one window, everything inside the mode.
    exclude: path fragments; a sync with any of them among its first-party frames is ignored.
    stop_after: raise `EnoughSteps` when that many windows are complete (ends a long run).
    """

    def __init__(
        self,
        *,
        windowed: bool = True,
        exclude: Sequence[str] = DEFAULT_EXCLUDE,
        stop_after: int | None = None,
    ):
        super().__init__()
        self.windowed = windowed
        self.stop_after = stop_after
        self.exclude = tuple(exclude)
        self.report = SyncReport()
        self._current: collections.Counter | None = None if windowed else collections.Counter()
        self._hooks: list = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._current is not None and is_host_sync(func, args, kwargs):
            site, files = call_site()
            if not any(part in f for f in files for part in self.exclude):
                self._current[site] += 1
        return func(*args, **kwargs)

    def __enter__(self):
        if self.windowed:
            from torch.optim.optimizer import (
                register_optimizer_step_post_hook,
                register_optimizer_step_pre_hook,
            )

            self._hooks = [
                register_optimizer_step_pre_hook(self._step_begins),
                register_optimizer_step_post_hook(self._step_ends),
            ]
        return super().__enter__()

    def __exit__(self, *exc_info):
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if not self.windowed and self._current is not None:
            self.report.windows.append(self._current)
        self._current = None
        return super().__exit__(*exc_info)

    def _step_begins(self, *_) -> None:
        if self._current is not None:
            self.report.windows.append(self._current)
        self._current = None  # the optimizer's own work is not counted
        if self.stop_after is not None and len(self.report.windows) >= self.stop_after:
            raise EnoughSteps  # the run's remaining steps and its evaluation are not needed

    def _step_ends(self, *_) -> None:
        self._current = collections.Counter()


def count_syncs(fn: Callable[[], object], *, exclude: Sequence[str] = ()) -> SyncReport:
    """Host syncs of one call `fn()`, by call site (one window)."""
    with HostSyncCounter(windowed=False, exclude=exclude) as counter:
        fn()
    return counter.report


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def count_train_syncs(
    method: str, *, steps: int = 4, preset: str = "cpu-tiny", extra: Sequence[str] = ()
) -> SyncReport:
    """Host syncs between optimizer steps of a real `python -m recipes.memdlm train` run, in
    process: `steps` complete windows (steps + 1 optimizer steps; logging and checkpoints
    pushed past them), after which the run is stopped before its evaluation."""
    from recipes.memdlm.cli import main

    with tempfile.TemporaryDirectory() as out, _one_thread():
        argv = [
            "train",
            "--preset",
            preset,
            "--method",
            method,
            "--quiet",
            "--out",
            os.path.join(out, "run"),
            "--train.steps",
            str(steps + 2),
            "--train.log_every",
            str(steps + 3),
            "--train.ckpt_every",
            str(steps + 3),
            *extra,
        ]
        counter = HostSyncCounter(stop_after=steps)
        try:
            with counter:
                code = main(argv)
            raise RuntimeError(f"train ended (exit {code}) before {steps} steps: {argv}")
        except EnoughSteps:
            pass
    return counter.report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=["standard", "memdlm", "both"], default="both")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--preset", default="cpu-tiny")
    args = parser.parse_args(argv)
    methods = ["standard", "memdlm"] if args.method == "both" else [args.method]
    for method in methods:
        report = count_train_syncs(method, steps=args.steps, preset=args.preset)
        print(f"\n## {method}: host syncs per step {report.per_step()}\n")
        print(report.table())
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
