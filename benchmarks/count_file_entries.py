"""File entries on the way through one MemDLM training step (issue 30, item 2).

Runs the real training phase (`loop.phase.train_phase`, the `smoke` preset, default MemDLM
settings) under `sys.setprofile` and lists every call and return that crosses from one
first-party file (`bilevel/`, `diffusion/`, `memory/`, `recipes/`) into another, from the loop's
`sampler.next()` of the first step to the first line of `bilevel.solve` (or
`bilevel.solve_with_info`, which the inner loop calls). Validators (`_checks.py`) are left out
of both counts. It prints two counts and the walk of the second:

- raw: every crossing the trace sees (trivial constructors and pass-throughs included), an
  upper bound of the review's count;
- review rule (docs/reference recipe-review-2, "Counting rule for the walk"): frames of these
  functions are made transparent (not counted; their callees count as called by their caller):
  * a pass-through: a function whose body (docstring aside) is one `return f(...)` statement;
  * a trivial constructor: an `__init__`/`__post_init__` whose body (docstring aside) only
    assigns attributes of `self`, calls `super().__init__(...)` or raises on a bad argument
    (`if ...: raise`); dataclass/NamedTuple generated methods have no source file and are
    never seen. Decided by reading each function's source with `ast`.

    OMP_NUM_THREADS=1 python benchmarks/count_file_entries.py
"""

from __future__ import annotations

import ast
import functools
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
START = ("recipes/memdlm/data/batches.py", "next")
STOP = {("bilevel/solve.py", "solve"), ("bilevel/solve.py", "solve_with_info")}


class Reached(Exception):
    """The first line of `bilevel.solve`: the walk ends."""


def first_party(filename: str) -> str | None:
    if filename.startswith("<"):
        return None
    rel = os.path.relpath(filename, ROOT)
    if rel.startswith("..") or rel.startswith(".venv") or rel in VALIDATORS:
        return None
    return rel


def _body(node: ast.FunctionDef) -> list[ast.stmt]:
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        return body[1:]  # the docstring
    return body


def _is_pass_through(node: ast.FunctionDef) -> bool:
    body = _body(node)
    return (
        len(body) == 1 and isinstance(body[0], ast.Return) and isinstance(body[0].value, ast.Call)
    )


def _trivial_statement(stmt: ast.stmt) -> bool:
    if isinstance(stmt, (ast.Assign, ast.AnnAssign)):
        targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
        return all(
            isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"
            for t in targets
        )
    if isinstance(stmt, ast.If):  # argument checks: `if bad: raise ...`
        return all(isinstance(s, ast.Raise) for s in stmt.body + stmt.orelse)
    if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call):
        func = stmt.value.func  # super().__init__(...)
        return isinstance(func, ast.Attribute) and func.attr == "__init__"
    return False


def _is_trivial_constructor(node: ast.FunctionDef) -> bool:
    return node.name in ("__init__", "__post_init__") and all(map(_trivial_statement, _body(node)))


@functools.cache
def _transparent_lines(rel: str) -> frozenset[int]:
    """First lines (`def` or first decorator) of the file's pass-throughs and trivial
    constructors, as `code.co_firstlineno` reports them."""
    lines = set()
    for node in ast.walk(ast.parse((ROOT / rel).read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and (
            _is_pass_through(node) or _is_trivial_constructor(node)
        ):
            lines.update([node.lineno, *(d.lineno for d in node.decorator_list)])
    return frozenset(lines)


def counted(frame, review: bool) -> str | None:
    """The frame's first-party file when its calls count, else None (library code,
    validators and, under the review rule, pass-throughs and trivial constructors)."""
    rel = first_party(frame.f_code.co_filename)
    if rel is None or not review:
        return rel
    return None if frame.f_code.co_firstlineno in _transparent_lines(rel) else rel


def caller_file(frame, review: bool) -> str | None:
    """The nearest counted frame below `frame` (frames that do not count are skipped)."""
    frame = frame.f_back
    while frame is not None and counted(frame, review) is None:
        frame = frame.f_back
    return None if frame is None else counted(frame, review)


def walk(review: bool) -> list[tuple[str, str, str]]:
    """(arrow, file entered, function) for each crossing, "->" a call, "<-" a return; with
    `review`, by the review's counting rule."""
    cfg = build_config("smoke")
    data = prepare_data(cfg)
    model = new_model(cfg, data.tokenizer, seed=cfg.seed, device="cpu")
    sampler = BatchSampler(data.train, cfg.train.batch_size, seed=1, eos_id=data.tokenizer.eos_id)
    settings = train.StepSettings("memdlm", cfg.memdlm, data.tokenizer.mask_id)
    crossings, started = [], [False]

    def profile(frame, event, arg):
        del arg
        rel = counted(frame, review) if event in ("call", "return") else None
        if rel is None:
            return
        name = frame.f_code.co_name
        started[0] = started[0] or (event == "call" and (rel, name) == START)
        if not started[0]:
            return
        other = caller_file(frame, review)
        if other != rel:
            crossings.append(("->", rel, name) if event == "call" else ("<-", other, name))
        if event == "call" and (rel, name) in STOP:
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
    raw, review = walk(review=False), walk(review=True)
    for label, crossings in (("raw trace", raw), ("review rule", review)):
        files = {entered for _, entered, _ in crossings}
        print(f"{label}: {len(crossings)} file entries, {len(files)} files, loop -> bl.solve")
    print("walk (review rule):")
    for arrow, entered, name in review:
        print(f"  {arrow} {entered} ({name})")


if __name__ == "__main__":
    main()
