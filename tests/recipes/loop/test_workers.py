"""Jobs side by side (`loop.workers`) and the whole job's remaining time (`JobClock`)."""

from __future__ import annotations

import os

import pytest

from recipes.memdlm.loop.progress import JobClock, Reporter
from recipes.memdlm.loop.steps import Interrupted
from recipes.memdlm.loop.workers import Job, WorkerError, run_jobs


def square_with_progress(*, reporter, x: int, steps: int = 3) -> dict:
    """A job: reports a note and a phase of `steps` steps, returns x squared and its pid."""
    reporter.note(f"squaring {x}")
    task = reporter.start("work", total=steps)
    for _ in range(steps):
        reporter.step(task, {"loss": float(x), "tokens": 1, "seconds": 0.01}, every=1)
    reporter.stop(task)
    return {"square": x * x, "pid": os.getpid()}


def fail(*, reporter, message: str) -> None:
    raise ValueError(message)


def interrupted(*, reporter) -> None:
    raise Interrupted("interrupted at step 3 of somewhere")


class Recorder(Reporter):
    """A quiet Reporter that keeps what it was told."""

    def __init__(self):
        super().__init__(quiet=True)
        self.notes, self.started, self.finished = [], [], []

    def note(self, message):
        self.notes.append(message)

    def start(self, description, total, job=None):
        self.started.append((description, job or self.current_job))
        return super().start(description, total, job=job)

    def job_finished(self, job):
        self.finished.append(job)
        super().job_finished(job)


def jobs_of(values):
    return [Job(f"job{x}", square_with_progress, {"x": x}, label=f"x={x}") for x in values]


def test_spawned_jobs_return_what_they_return_in_process():
    values = [2, 3, 5]
    alone = {
        job.name: result["square"]
        for job, result in run_jobs(jobs_of(values), workers=1, reporter=Recorder())
    }
    reporter = Recorder()
    spawned = {job.name: r for job, r in run_jobs(jobs_of(values), workers=2, reporter=reporter)}
    assert (
        {name: r["square"] for name, r in spawned.items()}
        == alone
        == {
            "job2": 4,
            "job3": 9,
            "job5": 25,
        }
    )
    assert all(r["pid"] != os.getpid() for r in spawned.values())  # ran elsewhere
    # Progress came back labelled: notes, one phase per job, every job finished once.
    assert sorted(reporter.notes) == ["[x=2] squaring 2", "[x=3] squaring 3", "[x=5] squaring 5"]
    assert sorted(reporter.started) == [(f"work x={x}", f"job{x}") for x in values]
    assert sorted(reporter.finished) == ["job2", "job3", "job5"]
    assert not reporter.progress.tasks  # every forwarded phase was stopped


def test_in_process_jobs_label_their_phases():
    reporter = Recorder()
    list(run_jobs(jobs_of([4]), workers=1, reporter=reporter))
    assert reporter.started == [("work", "job4")]
    assert reporter.finished == ["job4"] and reporter.current_job is None


def test_a_failed_job_raises_with_its_traceback():
    jobs = [Job("bad", fail, {"message": "no such needle"}), *jobs_of([7, 8, 9])]
    with pytest.raises(WorkerError) as caught:
        list(run_jobs(jobs, workers=2, reporter=Recorder()))
    text = str(caught.value)
    assert "job bad failed" in text and "ValueError: no such needle" in text
    assert "Traceback" in text


def test_an_interrupted_job_stops_the_comparison_as_interrupted():
    with pytest.raises(Interrupted):
        list(run_jobs([Job("stop", interrupted), *jobs_of([1])], workers=2, reporter=Recorder()))


def test_job_clock_is_the_larger_of_spread_work_and_the_longest_job(monkeypatch):
    now = [0.0]
    monkeypatch.setattr("recipes.memdlm.loop.progress.time.perf_counter", lambda: now[0])
    clock = JobClock(workers=2)
    clock.plan("a", "standard", steps=10)
    clock.plan("b", "memdlm", steps=10)
    clock.plan("c", "standard", steps=10)
    assert clock.remaining() is None and clock.describe() == ""  # nothing measured yet
    for _ in range(4):
        clock.step("a", 0.5)
    # standard: 0.5 s/step; memdlm unmeasured (counted as 0) and no fixed cost known: a bound.
    seconds, exact = clock.remaining()
    assert not exact and seconds == pytest.approx(max((6 * 0.5 + 0 + 10 * 0.5) / 2, 5.0))
    assert clock.describe().startswith("job at least ")
    for _ in range(10):
        clock.step("b", 1.0)
    now[0] = 20.0  # job b started at 0 and spent 10 s in steps: 10 s of fixed cost
    clock.finish("b")
    for _ in range(6):
        clock.step("a", 0.5)
    now[0] = 25.0  # job a: 5 s of steps in 25 s of wall time: 20 s of fixed cost
    clock.finish("a")
    seconds, exact = clock.remaining()
    # Only c is left: 10 steps of 0.5 s and standard's fixed cost of 20 s.
    assert exact and seconds == pytest.approx(10 * 0.5 + 20.0)
    assert clock.describe() == "job ~25s left"
    clock.step("c", 0.5)
    clock.finish("c")
    assert clock.remaining() == (0.0, True)


def test_job_clock_spreads_work_over_the_workers():
    clock = JobClock(workers=3)
    for name in "abcdef":
        clock.plan(name, "standard", steps=4)
    clock.step("a", 2.0)  # 2 s/step: 23 steps = 46 s of work left, the longest job 8 s
    assert clock.remaining()[0] == pytest.approx(46 / 3)
