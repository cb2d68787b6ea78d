"""The pretrained base of a comparison: its identity, the cache, and the base that ships.

A base is identified by everything that shapes its weights (`base_identity`): the model, the
pretraining phase, the pretraining data and the seed; not the fine-tuning or evaluation settings.
The default preset's base ships with the package (`recipes/memdlm/assets/base-<key>.pt`, about
2.9 MB) beside a JSON record of the identity it was built from, its SHA-256, the torch version and
its first pretraining losses, so the default comparison starts from it instead of spending most
of its time pretraining. `python -m recipes.memdlm.commands.bases RUN_FOLDER` writes those two
files from a comparison's run folder (how the shipped one was made: docs/memdlm.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import torch

from recipes.memdlm.config import Config
from recipes.memdlm.errors import UserError
from recipes.memdlm.loop import checkpoint as ckpt

ASSETS = Path(__file__).resolve().parents[1] / "assets"
# Data settings that do not reach pretraining (they choose the fine-tuning and evaluation sets).
NOT_PRETRAINING = {
    "train_tasks",
    "train_context_lengths",
    "eval_tasks",
    "eval_context_lengths",
    "eval_per_cell",
}
# Phase settings that only say how often to log and checkpoint.
BOOKKEEPING = {"log_every", "ckpt_every", "tensorboard"}
# Phase settings of `train` only (the config refuses them for pretraining).
TRAIN_ONLY = {"epochs", "batch_per_device", "group_by_length", "eval_every"}
# Settings added after bases were cached: at these values they leave a base's key as it was.
KEY_NEUTRAL = {"schedule": "recipe", "holdout": "recipe"}
RECORDED_LOSSES = 5  # first pretraining losses kept in the record, to check reproduction
DATA_FILES = ("train_file", "eval_file")  # user data: identified by content, not by path
# Model fields added after bases were shipped: left out while unset, so that the key of every
# base made before them (the shipped one included) stays what it was.
MODEL_FIELDS_ADDED = ("adapter",)


def base_identity(cfg: Config) -> dict[str, Any]:
    """Everything that shapes a pretrained base's weights, as plain JSON values.

    A user data file (`data.train_file`, `data.eval_file`) enters as "sha256:<hex>" of its
    bytes, so the same examples at another path give the same base and an edited file a new
    one; the embedded data (no file, None) enters as None, as in the shipped base's record."""
    data = cfg.data.model_dump(exclude=NOT_PRETRAINING)
    if data.get("train_file") is None:  # the record shape of user files: none to read
        data.pop("format", None)
    for name in DATA_FILES:
        if data.get(name) is not None:
            data[name] = f"sha256:{data_file_sha256(name, data[name])}"
    model = cfg.model.model_dump()
    for name in MODEL_FIELDS_ADDED:
        if model.get(name) is None:
            model.pop(name, None)
    pretrain = cfg.pretrain.model_dump(exclude=BOOKKEEPING | TRAIN_ONLY)
    for part in (data, pretrain):
        for key, neutral in KEY_NEUTRAL.items():
            if part.get(key) == neutral:
                del part[key]
    return {
        "model": model,
        "data": data,
        "pretrain": pretrain,
        "seed": cfg.seed,
        "time_eps": cfg.time_eps,
    }


def base_key(cfg: Config) -> str:
    """16 hex digits of the SHA-256 of `base_identity`: the name of a cached or shipped base."""
    payload = json.dumps(base_identity(cfg), sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def data_file_sha256(name: str, path: str | Path) -> str:
    """`file_sha256` of the data file `data.<name>`, or of a `datasets` folder: the SHA-256 of
    each file's relative path and `file_sha256`, in sorted order. A missing one is the user's
    mistake."""
    path = Path(path)
    if path.is_dir():
        digest = hashlib.sha256()
        for member in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(
                f"{member.relative_to(path).as_posix()}\0{file_sha256(member)}\n".encode()
            )
        return digest.hexdigest()
    if not path.is_file():
        raise UserError(f"data.{name} {str(path)!r} is not a file")
    return file_sha256(path)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def shipped_records(folder: Path | None = None) -> list[dict[str, Any]]:
    """The records of the bases shipped in `folder` (default ASSETS), each with its "file"."""
    folder = folder or ASSETS
    return [json.loads(path.read_text()) for path in sorted(folder.glob("base-*.json"))]


def shipped_base(cfg: Config, folder: Path | None = None) -> Path | None:
    """The shipped base built from exactly this configuration's identity, if there is one."""
    folder = folder or ASSETS
    key = base_key(cfg)
    for record in shipped_records(folder):
        if record["key"] == key and (folder / record["file"]).is_file():
            return folder / record["file"]
    return None


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}.{key}" if prefix else key))
    return out


def differences(cfg: Config, folder: Path | None = None) -> list[str]:
    """The settings in which `cfg` differs from the nearest shipped base (fewest differences)."""
    mine = _flat(base_identity(cfg))
    best: list[str] | None = None
    for record in shipped_records(folder):
        theirs = _flat(record["identity"])
        differ = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
        if best is None or len(differ) < len(best):
            best = differ
    return best or []


def ship(run_folder: Path, folder: Path | None = None) -> Path:
    """Write `base-<key>.pt` and its record into `folder` from a comparison's run folder (its
    config.json, base/model.pt and the pretraining records of metrics.jsonl)."""
    cfg = Config.model_validate(json.loads((run_folder / "config.json").read_text()))
    source = run_folder / "base" / "model.pt"
    state = ckpt.load(source)
    losses = [
        record["loss"]
        for record in _records(run_folder / "metrics.jsonl")
        if record.get("phase") == "pretrain"
    ]
    key = base_key(cfg)
    folder = folder or ASSETS
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"base-{key}.pt"
    ckpt.save(target, {"model": state["model"], "result": state["result"]})
    record = {
        "key": key,
        "file": target.name,
        "sha256": file_sha256(target),
        "identity": base_identity(cfg),
        "preset": cfg.preset,
        "torch": torch.__version__,
        "steps": state["result"]["steps"],
        "train_loss_final": state["result"]["train_loss_final"],
        "first_losses": losses[:RECORDED_LOSSES],
    }
    ckpt.write_json(folder / f"base-{key}.json", record)
    return target


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m recipes.memdlm.commands.bases",
        description="Ship the pretrained base of a comparison's run folder with the package.",
    )
    parser.add_argument("run_folder", type=Path)
    parser.add_argument("--into", type=Path, default=ASSETS, help=f"default: {ASSETS}")
    args = parser.parse_args(argv)
    print(ship(args.run_folder, args.into))
    return 0


if __name__ == "__main__":
    sys.exit(main())
