"""Atomic checkpoints: a crash or Ctrl-C never leaves a half-written file behind; loading runs
no code from the file.

A checkpoint is a `torch.save` of plain data: tensors (weights, optimizer moments, generator
states), numbers, strings, lists and dicts. `load` reads it with PyTorch's weights-only
unpickler, which rebuilds exactly those and refuses anything else, so a `.pt` that someone hands
you cannot execute code while it is read (a full unpickler would run whatever it pickles).
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

from recipes.memdlm.errors import UserError


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


def load(path: Path, *, require_model: bool = True, mmap: bool = False) -> dict[str, Any]:
    """A checkpoint we wrote, read without running code from it (module doc).

    A file that is not one (truncated, empty, another format, a folder) or that holds Python
    objects other than plain data raises UserError in one line naming the file.
    require_model: it must hold a 'model' entry (every checkpoint but the non-tensor part of an
    FSDP checkpoint, `sharding.load_dcp`). mmap: map the tensors instead of reading them (a
    cheap check of a large file: its index and every object in it are still read)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"checkpoint {str(path)!r} is a folder; give its model.pt")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise
    except Exception as error:  # torch.load raises many types: Unpickling, EOF, zipfile, Runtime
        raise UserError(_unreadable(path, error)) from None
    if not isinstance(state, dict) or (require_model and "model" not in state):
        raise UserError(
            f"checkpoint {str(path)!r} is not a checkpoint of this recipe (no 'model' entry); "
            "point at a model.pt or checkpoint.pt from a run folder"
        )
    return state


def check(path: Path) -> None:
    """Fail now, in one line, if `path` cannot be loaded (`load`), without reading its tensors:
    commands call it before they print anything about the run."""
    load(path, mmap=True)


def _unreadable(path: Path, error: Exception) -> str:
    """One line on why `torch.load` (weights only) failed: a refused global, or a broken file."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    refused = next((ln for ln in lines if "GLOBAL" in ln.upper()), None)
    if isinstance(error, pickle.UnpicklingError) and refused:
        return (
            f"checkpoint {str(path)!r} was refused: it holds Python objects, not only tensors "
            f"and plain data ({refused[:120]}), and loading it could run code; this recipe "
            "never writes such files: use a checkpoint from a run folder"
        )
    # torch's weights-only failures open with a paragraph on its defaults; the cause follows
    cause = next((ln for ln in lines if ln.lower().startswith("unpickler error")), None)
    reason = cause or (lines[0] if lines else "")
    return (
        f"checkpoint {str(path)!r} is not a readable checkpoint ({type(error).__name__}: "
        f"{reason[:160]}); it is truncated or not a file this recipe wrote: train it again or "
        "point at another model.pt"
    )


class _DCPMetadataUnpickler(pickle.Unpickler):
    """Reads the `.metadata` file of a torch.distributed.checkpoint folder (FSDP checkpoints),
    which torch writes with plain pickle: the classes of DCP's metadata, torch sizes, dtypes and
    layouts, and paths are rebuilt; any other global is refused, so the file runs no code."""

    def find_class(self, module: str, name: str):
        if module == "torch.distributed.checkpoint.metadata" or (module, name) in _DCP_GLOBALS:
            found = super().find_class(module, name)
            if isinstance(found, type) or (module, name) in _DCP_GLOBALS:
                return found
        if module == "torch":
            found = getattr(torch, name, None)
            if found is torch.Size or isinstance(found, (torch.dtype, torch.layout)):
                return found
        raise pickle.UnpicklingError(f"Unsupported GLOBAL {module}.{name} in DCP metadata")


_DCP_GLOBALS = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),  # layout by name: torch.strided, ...
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("collections", "OrderedDict"),
}


def dcp_reader(folder: Path):
    """A `torch.distributed.checkpoint` reader of `folder` whose metadata is read without
    running code (`_DCPMetadataUnpickler`; the tensor files are read weights-only by torch)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            path = self._get_metadata_path(kwargs.get("rank"))
            with self.fs.create_stream(path, "rb") as handle:
                try:
                    metadata = _DCPMetadataUnpickler(handle).load()
                except Exception as error:
                    raise UserError(_unreadable(Path(path), error)) from None
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(folder))


# --------------------------------------------------------------------------- what trains


def trainable_names(model: torch.nn.Module) -> set[str] | None:
    """State-dict keys of the parameters that train (`requires_grad`), or None when every
    parameter trains (full fine-tuning, the reference Transformer): then a checkpoint holds the
    whole state, buffers included."""
    params = list(model.named_parameters(remove_duplicate=False))
    names = {name for name, p in params if p.requires_grad}
    return None if len(names) == len(params) else names


def model_payload(model: torch.nn.Module, state: dict | None = None) -> dict[str, Any]:
    """The weights part of a checkpoint of `model`: {"model": state dict} when everything
    trains; for a model with a frozen base (outer LoRA, a loaded adapter) only the trainable
    tensors, flagged "trainable_only", with "base": the model's `base_identity` (the base's
    path or hub id and its fingerprint, set by the backbone loader). state: the full state dict
    if already gathered (FSDP's `full_state_dict`), else `model.state_dict()`."""
    names = trainable_names(model)
    if names is None:
        return {"model": model.state_dict() if state is None else state}
    if state is None:  # only the trainable tensors, without materialising the base's
        params = dict(model.named_parameters(remove_duplicate=False))
        state = {name: params[name].detach() for name in names}
    payload = {"model": {k: v for k, v in state.items() if k in names}, "trainable_only": True}
    base = getattr(model, "base_identity", None)
    if base:
        payload["base"] = dict(base)
    return payload


def load_model_state(model: torch.nn.Module, state: dict[str, Any], path: Path) -> None:
    """Load a checkpoint's weights (`model_payload`) into `model`. Trainable-only weights need
    the same base (its fingerprint) and exactly the model's trainable tensors: else UserError in
    one line naming both bases (the file `path`, or the missing/unexpected tensor). A full state
    loads strictly (torch's RuntimeError on a misfit, for the caller to word)."""
    weights = state["model"]
    if not state.get("trainable_only"):
        model.load_state_dict(weights)
        return
    check_base(model, state.get("base"), path)
    names = trainable_names(model) or set(model.state_dict())
    missing = sorted(names - set(weights))
    unexpected = sorted(set(weights) - names)
    if missing or unexpected:
        first = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise UserError(
            f"checkpoint {str(path)!r} holds the trained weights of another LoRA layout "
            f"({len(missing)} missing, {len(unexpected)} unexpected; first {first}); pass the "
            "model options (model.lora_*, model.adapter) it was trained with"
        )
    params = dict(model.named_parameters(remove_duplicate=False))
    shaped = [k for k in weights if tuple(weights[k].shape) != tuple(params[k].shape)]
    if shaped:
        k = shaped[0]
        raise UserError(
            f"checkpoint {str(path)!r}: {k} is {tuple(weights[k].shape)} in the checkpoint vs "
            f"{tuple(params[k].shape)} here; pass the model options it was trained with"
        )
    model.load_state_dict(weights, strict=False)


def check_base(model: torch.nn.Module, base: dict | None, path: Path) -> None:
    """UserError unless `model`'s base is the one the trainable-only checkpoint names."""
    here = getattr(model, "base_identity", None) or {}
    base = base or {}
    if base.get("fingerprint") and base.get("fingerprint") == here.get("fingerprint"):
        return
    raise UserError(
        f"checkpoint {str(path)!r} holds only the trained weights of a run on base "
        f"{base.get('path')!r} (fingerprint {base.get('fingerprint')}), but this model's base is "
        f"{here.get('path')!r} (fingerprint {here.get('fingerprint')}); give that base as "
        "model.path"
    )


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
