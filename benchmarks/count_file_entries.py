"""File entries on the way through one MemDLM training step (issue 30, item 2).

Runs the real training phase (`loop.phase.train_phase`, the `smoke` preset, default MemDLM
settings) under `sys.setprofile` and lists every call and return that crosses from one
first-party file (`bilevel/`, `diffusion/`, `memory/`, `recipes/`) into another, from the loop's
`sampler.next()` of the first step to the first line of `bilevel.solve`. Validators
(`_checks.py`) are left out; trivial constructors and pass-through wrappers are counted (the
review's hand count leaves them out), so the number is an upper bound of the review's.

    OMP_NUM_THREADS=1 python benchmarks/count_file_entries.py
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from recipes.memdlm.build import new_model
from recipes.memdlm.config import build_config
from recipes.memdlm.data.batches import BatchSampler
from recipes.memdlm.data.prepare import prepare_data
from recipes.memdlm.loop import phase as train
from recipes.memdlm.loop.progress import Reporter
from recipes.memdlm.loop.steps import MetricsLog

ROOT = Path(__file__).resolve().parents[1]
VALIDATORS = {"diffusion/_checks.py", "bilevel/_checks.py", "memory/_checks.py"}
START, STOP = ("recipes/memdlm/data/batches.py", "next"), ("bilevel/solve.py", "solve")


class Reached(Exception):
    """The first line of `bilevel.solve`: the walk ends."""


def first_party(filename: str) -> str | None:
    if filename.startswith("<"):
        return None
    rel = os.path.relpath(filename, ROOT)
    if rel.startswith("..") or rel.startswith(".venv") or rel in VALIDATORS:
        return None
    return rel


def caller_file(frame) -> str | None:
    """The nearest first-party frame below `frame` (library code in between is skipped)."""
    frame = frame.f_back
    while frame is not None and first_party(frame.f_code.co_filename) is None:
        frame = frame.f_back
    return None if frame is None else first_party(frame.f_code.co_filename)


def walk() -> list[tuple[str, str, str]]:
    """(arrow, file entered, function) for each crossing, "->" a call, "<-" a return."""
    cfg = build_config("smoke")
    data = prepare_data(cfg)
    model = new_model(cfg, data.tokenizer, seed=cfg.seed, device="cpu")
    sampler = BatchSampler(data.train, cfg.train.batch_size, seed=1, eos_id=data.tokenizer.eos_id)
    settings = train.StepSettings("memdlm", cfg.memdlm, data.tokenizer.mask_id)
    crossings, started = [], [False]

    def profile(frame, event, arg):
        del arg
        rel = first_party(frame.f_code.co_filename) if event in ("call", "return") else None
        if rel is None:
            return
        name = frame.f_code.co_name
        started[0] = started[0] or (event == "call" and (rel, name) == START)
        if not started[0]:
            return
        other = caller_file(frame)
        if other != rel:
            crossings.append(("->", rel, name) if event == "call" else ("<-", other, name))
        if event == "call" and (rel, name) == STOP:
            raise Reached

    folder = Path(tempfile.mkdtemp())
    sys.setprofile(profile)
    try:
        train.train_phase(
            model, settings, phase=cfg.train, sampler=sampler, seed=1, folder=folder,
            log=MetricsLog(folder / "metrics.jsonl", {}), reporter=Reporter(quiet=True),
        )  # fmt: skip
    except Reached:
        pass
    finally:
        sys.setprofile(None)
    return crossings


def main() -> None:
    crossings = walk()
    files = {entered for _, entered, _ in crossings}
    print(f"{len(crossings)} file entries, {len(files)} files, loop -> first line of bl.solve")
    for arrow, entered, name in crossings:
        print(f"  {arrow} {entered} ({name})")


if __name__ == "__main__":
    main()
