"""Re-run the default experiment and re-record everything the docs quote from it.

    python -m recipes.memdlm.commands.record          # 3 seeds, then 5 (about 10 min, 2 idle cores)

For 3 and for 5 paired seeds it runs the README's first command, `python -m recipes.memdlm`
(`compare` on the default preset) with `--seeds N`, in a subprocess, from the shipped base
(an empty base cache: what a fresh clone does), into runs/record-<time>-<N>seeds/. Then:

1. docs/results/cpu-tiny-default-<N>seeds/ gets the run's config.json, summary.json and plots,
   the printed tables (table.txt: the command's standard output) and recorded.json: the
   command, the date, its wall-clock time, the machine's cores and its 1-minute load average
   when the run started and ended,
   the torch version, the git commit, and the per-seed eval losses and paired difference of
   the record it replaces ("previous"), so the docs can say how far a re-run moved them.
2. Every results block of README.md and docs/memdlm.md is rewritten from those files
   (`commands.quotes`).

`tests/recipes/test_recorded_results.py` re-runs seed 1 of both methods and compares it with the
recorded 3-seed summary exactly, so a change that moves the results fails until it re-records
them with this command in the same commit.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from recipes.memdlm.commands.quotes import FOLDERS, RESULTS, ROOT, rewrite_docs

KEPT = ("config.json", "summary.json")  # besides plots/*.png and the printed tables


def command(seeds: int) -> list[str]:
    """The README's first command with its seed count made explicit (3 is the preset's)."""
    return ["python", "-m", "recipes.memdlm", "--seeds", str(seeds)]


def previous(folder: Path) -> dict[str, Any] | None:
    """What the docs need of the record about to be replaced: its date, per-seed eval losses
    and paired eval-loss difference (None when there is no record yet)."""
    summary_file = folder / "summary.json"
    if not summary_file.is_file():
        return None
    summary = json.loads(summary_file.read_text())
    recorded = folder / "recorded.json"
    date = json.loads(recorded.read_text())["date"] if recorded.is_file() else None
    return {
        "date": date,
        "seeds": summary["seeds"],
        "eval_loss": {
            method: [r["eval_loss"] for r in summary[method]["per_seed"]]
            for method in ("standard", "memdlm")
        },
        "eval_loss_delta": summary["paired"]["eval_loss_delta"],
    }


def git_commit(root: Path) -> str | None:
    try:
        found = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return found.stdout.strip()


def run_default(seeds: int, out: Path, root: Path) -> tuple[str, dict[str, Any]]:
    """Run the default experiment with `seeds` seeds into `out`: (its standard output, the
    recorded.json fields about the run)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg()[0]
    argv = command(seeds)
    with tempfile.TemporaryDirectory() as cache:  # no cached base: the shipped one, as on a clone
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, *argv[1:], "--out", str(out), "--cache", cache],
            cwd=root,
            stdout=subprocess.PIPE,
            text=True,
            check=False,
        )
        seconds = time.perf_counter() - started
        load_end = os.getloadavg()[0]
    if done.returncode != 0:
        raise SystemExit(f"record: `{' '.join(argv)}` exited with {done.returncode}")
    import torch

    return done.stdout, {
        "command": " ".join(argv),
        "date": datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
        "wall_seconds": seconds,
        "cpus": cores,
        "load_average": load,
        "load_average_end": load_end,
        "torch": torch.__version__,
        "commit": git_commit(root),
    }


def keep(out: Path, folder: Path, table: str, record: dict[str, Any]) -> None:
    """Replace the recorded folder's contents with the run's (module docstring, step 1)."""
    record["previous"] = previous(folder)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for name in KEPT:
        shutil.copyfile(out / name, folder / name)
    for plot in sorted((out / "plots").glob("*.png")):
        shutil.copyfile(plot, folder / plot.name)
    (folder / "table.txt").write_text(table)
    (folder / "recorded.json").write_text(json.dumps(record, indent=2) + "\n")


def record(
    seeds: tuple[int, ...] = (3, 5), *, runs: Path, root: Path = ROOT, results: Path = RESULTS
) -> list[Path]:
    """Re-run and re-record (module docstring); returns the docs it rewrote."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    for n in seeds:
        out = runs / f"record-{stamp}-{n}seeds"
        print(f"record: {' '.join(command(n))} -> {out}", file=sys.stderr)
        table, info = run_default(n, out, root)
        keep(out, results / FOLDERS[n], table, info)
    return rewrite_docs(root)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m recipes.memdlm.commands.record",
        description="Re-run the default experiment (3 and 5 seeds), re-record "
        "docs/results/cpu-tiny-default-*seeds and rewrite the README's and docs' results "
        "blocks from them.",
    )
    parser.add_argument(
        "--runs", type=Path, default=ROOT / "runs", help="where the run folders go (runs/)"
    )
    parser.add_argument(
        "--docs-only",
        action="store_true",
        help="do not run anything: rewrite the results blocks from the recorded files",
    )
    args = parser.parse_args(argv)
    changed = rewrite_docs(ROOT) if args.docs_only else record(runs=args.runs)
    for path in changed:
        print(f"record: rewrote {path.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
