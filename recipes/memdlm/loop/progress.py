"""Live progress: a rich progress bar on a terminal, plain log lines elsewhere."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class Reporter:
    """Shows loss, tokens per second and ETA for each training phase."""

    def __init__(self, console: Console | None = None, quiet: bool = False):
        # Progress and notes go to stderr; results (tables) to stdout, wide enough to read
        # when redirected to a file.
        self.console = console or Console(stderr=True)
        self.out = Console(width=None if Console().is_terminal else 120)
        self.quiet = quiet
        self.live = self.console.is_terminal and not quiet
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            disable=not self.live,
        )
        self._runs: dict[int, dict[str, Any]] = {}

    def note(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message)

    def start(self, description: str, total: int) -> int:
        if self.live and not self.progress.live.is_started:
            self.progress.start()
        task = self.progress.add_task(description, total=total, status="")
        self._runs[task] = {
            "name": description,
            "total": total,
            "t0": time.perf_counter(),
            "tokens": 0,
            "done": 0,
            "first": 0,
        }
        return task

    def advance(self, task: int, completed: int) -> None:
        self.progress.update(task, completed=completed)
        self._runs[task].update(done=completed, first=completed)

    def step(self, task: int, record: dict[str, Any], every: int) -> None:
        run = self._runs[task]
        run["tokens"] += record.get("tokens", 0)
        run["done"] += 1
        elapsed = max(time.perf_counter() - run["t0"], 1e-9)
        status = f"loss {record['loss']:.4f}  {run['tokens'] / elapsed:,.0f} tok/s"
        if "gap" in record:
            status += f"  gap {record['gap']:+.4f}"
        self.progress.update(task, advance=1, status=status)
        if not self.live and not self.quiet and run["done"] % every == 0:
            rate = (run["done"] - run["first"]) / elapsed
            eta = (run["total"] - run["done"]) / max(rate, 1e-9)
            self.console.print(
                f"{run['name']} step {run['done']}/{run['total']}  {status}  eta {eta:.0f}s"
            )

    def stop(self, task: int) -> None:
        self.progress.remove_task(task)
        self._runs.pop(task, None)
        if self.live and not self.progress.tasks:
            self.progress.stop()
