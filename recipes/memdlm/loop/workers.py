"""Independent jobs side by side: one spawned process per job, at most `workers` at a time.

The comparison's (seed, method) runs share nothing but the base checkpoint on disk, so on a CPU
they run in parallel processes of one thread each (two cores: about twice the throughput of one
process with two threads at this model size). A job is a top-level function called as
`target(reporter=..., **kwargs)`; its return value must pickle. Its progress (`Reporter` calls)
travels over a queue to the parent's reporter, so the parent shows every job's progress bar.

Interrupts. Workers run in their own process group, so a Ctrl-C at the terminal reaches only the
parent, which forwards one SIGINT to each running worker: each finishes its step, checkpoints and
exits (the run resumes exactly from there). A second Ctrl-C is forwarded too and stops them at
once. A worker whose parent dies (kill -9) interrupts itself the same way within a second.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue as queue_module
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from recipes.memdlm.allocator import keep_freed_memory
from recipes.memdlm.errors import UserError
from recipes.memdlm.loop.steps import Interrupted

EXIT_INTERRUPTED = 130


@dataclass
class Job:
    """One unit of work: `target(reporter=..., **kwargs)`. name: unique; label: shown after
    its progress lines and notes (default: name)."""

    name: str
    target: Callable[..., Any]
    kwargs: dict[str, Any] = field(default_factory=dict)
    label: str = ""

    def __post_init__(self) -> None:
        self.label = self.label or self.name


class WorkerError(RuntimeError):
    """A job failed in its worker process; the message holds the worker's traceback."""


class RemoteReporter:
    """The `Reporter` interface in a worker: every call becomes a message to the parent."""

    def __init__(self, channel, job: str):
        self.channel, self.job, self.quiet = channel, job, False  # job: its label
        self._next = 0

    def note(self, message: str) -> None:
        self.channel.put(("note", self.job, message))

    def start(self, description: str, total: int) -> int:
        self._next += 1
        self.channel.put(("start", self.job, self._next, description, total))
        return self._next

    def advance(self, task: int, completed: int) -> None:
        self.channel.put(("advance", self.job, task, completed))

    def step(self, task: int, record: dict[str, Any], every: int) -> None:
        keep = {k: record[k] for k in ("loss", "tokens", "gap", "seconds") if k in record}
        self.channel.put(("step", self.job, task, keep, every))

    def stop(self, task: int) -> None:
        self.channel.put(("stop", self.job, task))


def default_workers(device: torch.device, jobs: int) -> int:
    """One process per core on a CPU (at most one per job); one on an accelerator."""
    if device.type != "cpu":
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(jobs, cores or 1))


def run_jobs(jobs: list[Job], *, workers: int, reporter) -> Iterator[tuple[Job, Any]]:
    """Run `jobs`, yielding (job, result) as each finishes (in order of finishing).

    workers <= 1: one after another in this process, with `reporter` itself. Otherwise spawned
    processes of one thread each. A failed job stops the others (they checkpoint) and raises
    WorkerError (a UserError in a job is raised as a UserError, its one line kept); Ctrl-C
    stops them the same way and raises `Interrupted`.
    """
    if workers <= 1:
        for job in jobs:
            reporter.current_job, reporter.current_label = job.name, job.label
            try:
                result = job.target(reporter=reporter, **job.kwargs)
            finally:
                reporter.current_job = reporter.current_label = None
            reporter.job_finished(job.name)
            yield job, result
        return
    yield from _run_spawned(jobs, workers, reporter)


def _run_spawned(jobs, workers, reporter) -> Iterator[tuple[Job, Any]]:
    context = multiprocessing.get_context("spawn")  # fork would copy torch's thread pools
    channel = context.Queue()
    pending = list(jobs)
    running: dict[str, tuple[Job, Any]] = {}
    tasks: dict[tuple[str, int], int] = {}  # (job, worker's task id) -> reporter's task id
    labels = {job.name: job.label for job in jobs}
    interrupts = 0
    failure: Exception | None = None
    try:
        while running or (pending and not interrupts and failure is None):
            try:
                while pending and len(running) < workers and not interrupts and failure is None:
                    job = pending.pop(0)
                    process = context.Process(
                        target=_worker_main,
                        args=(job, channel, os.getpid()),
                        name=f"memdlm-{job.name}",
                        daemon=True,
                    )
                    process.start()
                    running[job.name] = (job, process)
                message = _next_message(channel, running)
                if message is None:
                    continue
                kind, name = message[0], message[1]
                if kind == "done":
                    job, process = running.pop(name)
                    process.join()
                    reporter.job_finished(name)
                    yield job, message[2]
                elif kind in ("failed", "user_error"):
                    running.pop(name)[1].join()
                    if failure is None:
                        error = UserError if kind == "user_error" else WorkerError
                        failure = error(message[2])
                        _signal_all(running, signal.SIGINT)  # the others checkpoint and stop
                elif kind == "interrupted":  # it checkpointed and stopped: so do the others
                    running.pop(name)[1].join()
                    if not interrupts:
                        interrupts = 1
                        _signal_all(running, signal.SIGINT)
                else:
                    _forward(message, reporter, tasks, labels[name])
            except KeyboardInterrupt:
                interrupts += 1
                if interrupts == 1:
                    reporter.note(
                        "interrupt: each running job finishes its step and checkpoints "
                        "(Ctrl-C again to stop them now)"
                    )
                _signal_all(running, signal.SIGINT)
    finally:
        for _, process in running.values():  # only after an unexpected error in this loop
            process.terminate()
            process.join()
        for key in list(tasks):
            reporter.stop(tasks.pop(key))
    if failure is not None:
        raise failure
    if interrupts:
        raise Interrupted("interrupted; every finished step of every job is checkpointed")


def _next_message(channel, running) -> tuple | None:
    """The next message, or a synthetic "failed" for a worker that died without a word."""
    try:
        return channel.get(timeout=0.2)
    except queue_module.Empty:
        pass
    for name, (_, process) in running.items():
        if process.exitcode is not None:
            try:  # its last messages may still be in the pipe
                return channel.get(timeout=1.0)
            except queue_module.Empty:
                code = process.exitcode
                if code in (EXIT_INTERRUPTED, -signal.SIGINT):  # -2: stopped while starting
                    return ("interrupted", name)
                return ("failed", name, f"job {name} exited with code {code} and no report")
    return None


def _forward(message: tuple, reporter, tasks: dict[tuple[str, int], int], label: str) -> None:
    kind, job = message[0], message[1]
    if kind == "note":
        reporter.note(f"[{label}] {message[2]}")
    elif kind == "start":
        _, _, task, description, total = message
        tasks[(job, task)] = reporter.start(f"{description} {label}", total, job=job)
    elif kind == "advance":
        reporter.advance(tasks[(job, message[2])], message[3])
    elif kind == "step":
        reporter.step(tasks[(job, message[2])], message[3], every=message[4])
    elif kind == "stop":
        reporter.stop(tasks.pop((job, message[2])))


def _signal_all(running, signum: int) -> None:
    for _, process in running.values():
        if process.pid is not None and process.exitcode is None:
            with contextlib.suppress(ProcessLookupError):  # it has just exited
                os.kill(process.pid, signum)


def _worker_main(job: Job, channel, parent_pid: int) -> None:
    """Entry point of a worker process: run one job, report its result or its failure."""
    os.setpgrp()  # a terminal's Ctrl-C goes to the parent, which forwards it (module docstring)
    torch.set_num_threads(1)
    keep_freed_memory()  # as the parent's `cli.main` did: each process has its own heap
    _watch_parent(parent_pid)
    try:
        result = job.target(reporter=RemoteReporter(channel, job.name), **job.kwargs)
    except (Interrupted, KeyboardInterrupt, SystemExit):
        channel.put(("interrupted", job.name))
        _flush_and_exit(channel, EXIT_INTERRUPTED)
    except UserError as error:  # the parent reports it as the user's, in one line
        channel.put(("user_error", job.name, str(error)))
        _flush_and_exit(channel, 1)
    except BaseException:  # everything goes back to the parent, then exit 1
        channel.put(("failed", job.name, f"job {job.name} failed:\n{traceback.format_exc()}"))
        _flush_and_exit(channel, 1)
    channel.put(("done", job.name, result))
    _flush_and_exit(channel, 0)


def _flush_and_exit(channel, code: int) -> None:
    channel.close()
    channel.join_thread()  # every message reaches the pipe before the process goes
    os._exit(code)


def _watch_parent(parent_pid: int) -> None:
    """Interrupt this worker (as a Ctrl-C would) once its parent is gone."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
