"""Ctrl-C at a step boundary: a training step is never cut in half.

An interrupt that lands mid-step would leave the data sampler and the anchor/inner generators
past that step while the step counter (and maybe the weights) are not, so a resumed run would
skip a batch. While `deferred()` is active, the first SIGINT only asks the loop to stop; the
loop finishes the step in flight, checkpoints and stops. A second SIGINT stops the process at
once with exit code 130 (the last checkpoint, written atomically, stays valid).
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class StopRequest:
    """Set by the first Ctrl-C inside `deferred()`."""

    def __init__(self) -> None:
        self.requested = False


@contextmanager
def deferred() -> Iterator[StopRequest]:
    """Defer SIGINT to the caller's next check of `.requested` (main thread only; elsewhere
    Ctrl-C keeps raising KeyboardInterrupt, which the loop also handles)."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def on_sigint(signum, frame) -> None:
        del signum, frame
        if stop.requested:
            print(
                "\ninterrupted again: stopping now (resume from the last checkpoint)",
                file=sys.stderr,
            )
            raise SystemExit(130)
        stop.requested = True
        print(
            "\ninterrupt: finishing this step, then checkpointing (Ctrl-C again to stop now)",
            file=sys.stderr,
        )

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)
