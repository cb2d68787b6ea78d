"""The held-out loss during training, every `eval_every` steps (Hugging Face's `eval_strategy
steps` with `eval_steps`; the paper's run evaluates every 10% of training).

The evaluation after s steps runs at the start of step s, before its batch is drawn, and is
logged as a record {"phase": "train_eval", "step": s, ...} in the phase's metrics file. A run
resumed at step s drops that record and evaluates again, so the file equals an uninterrupted
run's. The evaluation draws from its own generators (`eval.metrics.eval_loss`), never from the
training's, and puts the model back in training mode: the steps after it are the steps without it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from recipes.memdlm.loop.steps import MetricsLog


def evals_before_steps(
    evaluate: Callable[[], dict[str, float]],
    *,
    every: int,
    model,
    log: MetricsLog,
    write_log: bool = True,
) -> Callable[[int], None]:
    """What the loop calls before step s: at every s > 0 with s % every == 0, `evaluate()`
    (metrics of the model after s steps), logged with the tags of `log` but phase
    "train_eval"."""
    if every < 1:
        raise ValueError(f"every must be at least 1, got {every}")
    evals = MetricsLog(log.path, {**log.tags, "phase": "train_eval"})
    evals.sink = log.sink  # TensorBoard too, when the phase has it
    first: list[int] = []

    def before_step(step: int) -> None:
        if not first:  # a resumed run redoes the evaluations from its first step on
            first.append(step)
            if write_log:
                evals.drop_after(step - 1)
        if step > 0 and step % every == 0:
            record: dict[str, Any] = {"step": step, **evaluate()}
            model.train()
            if write_log:
                evals.write(record)

    return before_step


@dataclass(frozen=True)
class PeriodicEval:
    """What `train_phase(evaluate=...)` takes: `metrics(model, mem)` (mem: the phase's fast
    weights, None for Standard) every `every` steps."""

    every: int
    metrics: Callable[[Any, Any], dict[str, float]]

    def before_steps(self, model, mem, log: MetricsLog, *, write_log: bool = True):
        """This evaluation as the loop's `evals(step)` (`evals_before_steps`)."""
        return evals_before_steps(
            lambda: self.metrics(model, mem),
            every=self.every,
            model=model,
            log=log,
            write_log=write_log,
        )
