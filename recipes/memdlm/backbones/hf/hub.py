"""Where a model or adapter named on the command line lives, and a cheap fingerprint of it.

`model.path` and `model.adapter` take a local folder or a Hugging Face hub id (`org/name`, as
transformers, peft, lm-eval and dllm take it). A hub id is resolved through the Hugging Face
cache (`huggingface_hub.snapshot_download`): downloaded there when online, read from it with
`HF_HUB_OFFLINE=1`. The cache location and the offline switch are read from the environment at
each call (`HF_HUB_CACHE`, else `HF_HOME/hub`), so that they apply even after huggingface_hub was
imported. A name that resolves to nothing is one `UserError` line naming it, raised before
anything (the tokenizer first) is loaded.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from pathlib import Path

from recipes.memdlm.errors import MissingExtraError, UserError

# A hub repo id: `name` or `org/name`, letters, digits, `-`, `_`, `.`; an optional `@revision`.
_REPO_ID = re.compile(r"^(?!\.)[\w.-]+(/(?!\.)[\w.-]+)?(@[\w./-]+)?$")


def hub_cache_dir() -> str | None:
    """The Hugging Face hub cache named by the environment now (None: huggingface_hub's own)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return os.environ["HUGGINGFACE_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


def hub_offline() -> bool:
    """`HF_HUB_OFFLINE` (or transformers' `TRANSFORMERS_OFFLINE`) set to a true value now."""
    flags = (os.environ.get(k, "") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(v.strip().lower() in ("1", "true", "yes", "on") for v in flags)


def resolve(name: str, *, what: str = "model.path") -> Path:
    """The local folder of `name`: the folder itself, or the hub id's snapshot in the cache.

    `what` names the option in the error line. UserError: a file, or neither a folder nor a hub
    id that the cache holds (offline) or the hub serves (online)."""
    return _resolve(str(name), what, hub_cache_dir(), hub_offline())


@functools.lru_cache(maxsize=32)
def _resolve(name: str, what: str, cache_dir: str | None, offline: bool) -> Path:
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise UserError(f"{what} {name!r} is a file; give a model folder or a hub id (org/name)")
    if not _REPO_ID.match(name):
        raise UserError(f"{what} {name!r} is not a folder (and not a Hugging Face hub id)")
    try:
        import huggingface_hub
    except ImportError:  # pragma: no cover - exercised only without the extra
        raise MissingExtraError(
            f"{what} {name!r} is a hub id; resolving it needs huggingface_hub (extra 'hf')"
        ) from None
    repo_id, _, revision = name.partition("@")
    try:
        folder = huggingface_hub.snapshot_download(
            repo_id, revision=revision or None, cache_dir=cache_dir, local_files_only=offline
        )
    except Exception as error:  # HFValidationError, LocalEntryNotFoundError, HTTP errors...
        where = cache_dir or huggingface_hub.constants.HF_HUB_CACHE
        mode = "offline (HF_HUB_OFFLINE)" if offline else "online"
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
        raise UserError(
            f"{what} {name!r} is neither a folder nor a hub id found {mode} in the Hugging Face "
            f"cache {where} ({type(error).__name__}: {reason})"
        ) from None
    return Path(folder)


# --------------------------------------------------------------------------- fingerprint


# config.json keys that say how the folder was written or is run, not what the model is.
_VOLATILE = ("_name_or_path", "transformers_version", "use_cache", "torch_dtype", "dtype")
_SAMPLE = 256  # bytes of tensor data read per weights file, at its start and its middle


def fingerprint(folder: str | Path) -> str:
    """A cheap identity of the model in `folder`: sha256 (16 hex digits) over its config.json
    (less `_VOLATILE` keys), each safetensors file's header (tensor names, dtypes, shapes) and
    `_SAMPLE` bytes of its data at the start and the middle; for other weight files (`.bin`,
    `.pt`) their names, sizes and the same samples. Reads a few KB whatever the model's size;
    a local copy of a hub snapshot has the snapshot's fingerprint."""
    folder = Path(folder)
    digest = hashlib.sha256()
    config = folder / "config.json"
    if config.is_file():
        tree = json.loads(config.read_text(encoding="utf-8"))
        tree = {k: v for k, v in tree.items() if k not in _VOLATILE}
        digest.update(json.dumps(tree, sort_keys=True).encode())
    for path in sorted(folder.glob("*.safetensors")):
        digest.update(path.name.encode() + _safetensors_summary(path))
    for path in sorted([*folder.glob("*.bin"), *folder.glob("*.pt")]):
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode() + _samples(path, 0, size))
    return digest.hexdigest()[:16]


def _safetensors_summary(path: Path) -> bytes:
    """The header's tensor names, dtypes and shapes, and samples of the data after it."""
    with path.open("rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    tensors = {k: (v["dtype"], v["shape"]) for k, v in header.items()}
    start = 8 + length
    return json.dumps(tensors, sort_keys=True).encode() + _samples(path, start, path.stat().st_size)


def _samples(path: Path, start: int, end: int) -> bytes:
    with path.open("rb") as handle:
        handle.seek(start)
        head = handle.read(min(_SAMPLE, end - start))
        handle.seek(start + max(0, (end - start) // 2))
        return head + handle.read(_SAMPLE)
