"""Atomic checkpoints: a crash or Ctrl-C never leaves a half-written file behind."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def atomic_write_bytes(path: Path, write) -> None:
    """Call `write(handle)` on a temporary file in `path`'s folder, then rename it into place.

    `os.replace` is atomic on POSIX, so readers see either the old file or the new one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files of writes that a kill interrupted (`.NAME.*.tmp` beside the
    files `atomic_write_bytes` writes); returns what was removed. Call before writing again."""
    stale = sorted(folder.glob(".*.tmp")) if folder.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def save(path: Path, payload: dict[str, Any]) -> None:
    atomic_write_bytes(path, lambda handle: torch.save(payload, handle))


def load(path: Path, *, require_model: bool = True) -> dict[str, Any]:
    """A checkpoint we wrote; a file that is not one (truncated, empty, another format, a folder)
    raises ValueError in one line naming the file. require_model: it must hold a 'model' entry
    (every checkpoint but the non-tensor part of an FSDP checkpoint, `sharding.load_dcp`)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"checkpoint {str(path)!r} is a folder; give its model.pt")
    try:
        # weights_only=False: checkpoints hold generator states and plain Python metadata we wrote.
        state = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise
    except Exception as error:  # torch.load raises many types: Unpickling, EOF, zipfile, Runtime
        reason = (str(error).strip().splitlines() or [""])[0]
        raise ValueError(
            f"checkpoint {str(path)!r} is not a readable checkpoint "
            f"({type(error).__name__}: {reason[:160]}); it is truncated or not a file this "
            "recipe wrote: train it again or point at another model.pt"
        ) from None
    if not isinstance(state, dict) or (require_model and "model" not in state):
        raise ValueError(
            f"checkpoint {str(path)!r} is not a checkpoint of this recipe (no 'model' entry); "
            "point at a model.pt or checkpoint.pt from a run folder"
        )
    return state


def write_json(path: Path, data: Any) -> None:
    text = json.dumps(data, indent=2, sort_keys=False) + "\n"
    atomic_write_bytes(path, lambda handle: handle.write(text.encode()))


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
