"""Live progress: a rich progress bar on a terminal, plain log lines elsewhere; with a
`JobClock`, every line also tells how long the whole job has left."""

from __future__ import annotations

import time
from dataclasses import dataclass
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
        self.clock: JobClock | None = None
        # The job running in this process (`loop.workers`): its name, and a label for its lines.
        self.current_job: str | None = None
        self.current_label: str | None = None

    def note(self, message: str) -> None:
        if not self.quiet:  # plain text: "[seed 2] ..." is not rich markup; long lines stay whole
            self.console.print(message, markup=False, highlight=False, soft_wrap=True)

    def start(self, description: str, total: int, job: str | None = None) -> int:
        if self.live and not self.progress.live.is_started:
            self.progress.start()
        if job is None and self.current_label:
            description = f"{description} {self.current_label}"
        task = self.progress.add_task(description, total=total, status="")
        self._runs[task] = {
            "name": description,
            "total": total,
            "t0": time.perf_counter(),
            "tokens": 0,
            "done": 0,
            "first": 0,
            "job": job or self.current_job,
        }
        return task

    def advance(self, task: int, completed: int) -> None:
        self.progress.update(task, completed=completed)
        self._runs[task].update(done=completed, first=completed)
        if self.clock is not None and self._runs[task]["job"] is not None:
            self.clock.resumed(self._runs[task]["job"], completed)

    def step(self, task: int, record: dict[str, Any], every: int) -> None:
        run = self._runs[task]
        run["tokens"] += record.get("tokens", 0)
        run["done"] += 1
        elapsed = max(time.perf_counter() - run["t0"], 1e-9)
        status = f"loss {record['loss']:.4f}  {run['tokens'] / elapsed:,.0f} tok/s"
        if "gap" in record:
            status += f"  gap {record['gap']:+.4f}"
        job_left = ""
        if self.clock is not None and run["job"] is not None:
            self.clock.step(run["job"], record.get("seconds", 0.0))
            job_left = self.clock.describe()
        self.progress.update(task, advance=1, status=f"{status}  {job_left}".rstrip())
        if not self.live and not self.quiet and run["done"] % every == 0:
            rate = (run["done"] - run["first"]) / elapsed
            eta = (run["total"] - run["done"]) / max(rate, 1e-9)
            line = f"{run['name']} step {run['done']}/{run['total']}  {status}  eta {eta:.0f}s"
            self.note(f"{line}  {job_left}" if job_left else line)

    def job_finished(self, job: str) -> None:
        if self.clock is not None:
            self.clock.finish(job)

    def stop(self, task: int) -> None:
        self.progress.remove_task(task)
        self._runs.pop(task, None)
        if self.live and not self.progress.tasks:
            self.progress.stop()


@dataclass
class _PlannedJob:
    kind: str  # jobs of one kind cost the same: "pretrain", "standard", "memdlm", "base-eval"
    steps: int
    done: int = 0
    step_seconds: float = 0.0
    started: float | None = None
    finished: bool = False


class JobClock:
    """The whole job's remaining time, from what this run has measured so far.

    Every planned job has a kind and a number of training steps. The seconds per step of a kind
    are the mean over its steps so far; its fixed cost (evaluation, loading) is what a finished
    job of that kind took beyond its steps. Remaining time = max(the remaining work spread over
    `workers`, the longest remaining job). While some kind's cost is not measured yet, the
    figure is a lower bound and says so ("at least").
    """

    def __init__(self, workers: int = 1):
        self.workers = max(1, workers)
        self.jobs: dict[str, _PlannedJob] = {}
        self._rate: dict[str, list[float]] = {}  # kind -> [seconds, steps]
        self._fixed: dict[str, float] = {}

    def plan(self, job: str, kind: str, steps: int = 0) -> None:
        self.jobs[job] = _PlannedJob(kind, steps)

    def step(self, job: str, seconds: float) -> None:
        planned = self.jobs.get(job)
        if planned is None:
            return
        if planned.started is None:
            planned.started = time.perf_counter()
        planned.done += 1
        planned.step_seconds += seconds
        total = self._rate.setdefault(planned.kind, [0.0, 0])
        total[0] += seconds
        total[1] += 1

    def resumed(self, job: str, done: int) -> None:
        """`job` starts at step `done` (a resumed phase): those steps are not left to do."""
        if job in self.jobs:
            self.jobs[job].done = done

    def finish(self, job: str) -> None:
        planned = self.jobs.get(job)
        if planned is None:
            return
        planned.finished = True
        if planned.started is not None and planned.kind not in self._fixed:
            wall = time.perf_counter() - planned.started
            self._fixed[planned.kind] = max(0.0, wall - planned.step_seconds)

    def remaining(self) -> tuple[float, bool] | None:
        """(seconds left, exact) where exact is False for a lower bound; None before any step."""
        if not self._rate:
            return None
        left, exact = [], True
        for planned in self.jobs.values():
            if planned.finished:
                continue
            rate = self._rate.get(planned.kind)
            seconds = (planned.steps - planned.done) * (rate[0] / rate[1]) if rate else 0.0
            exact &= rate is not None or planned.steps == 0
            if planned.kind in self._fixed:
                seconds += self._fixed[planned.kind]
            else:
                exact = False
            left.append(seconds)
        if not left:
            return 0.0, True
        return max(sum(left) / self.workers, max(left)), exact

    def describe(self) -> str:
        estimate = self.remaining()
        if estimate is None:
            return ""
        seconds, exact = estimate
        return f"job {'~' if exact else 'at least '}{_duration(seconds)} left"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
