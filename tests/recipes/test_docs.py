"""docs/memdlm.md documents every configuration key and every subcommand, and its module map
names the files that exist."""

from __future__ import annotations

import pathlib
import re

from pydantic import BaseModel

from recipes.memdlm.cli import COMMANDS
from recipes.memdlm.config import Config

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "memdlm.md").read_text()


def leaf_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys += leaf_keys(annotation, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def test_every_config_key_is_in_the_reference_table():
    table = DOC.split("## Configuration reference", 1)[1].split("\n## ", 1)[0]
    cells = set(re.findall(r"`([^`]+)`", table))
    missing = [
        key
        for key in leaf_keys(Config)
        if key != "preset"
        and key not in cells
        and key.rsplit(".", 1)[-1] not in cells
        and "." + key.rsplit(".", 1)[-1] not in cells
    ]
    assert not missing, f"undocumented config keys: {missing}"


def test_every_subcommand_is_shown():
    for command in COMMANDS:
        assert f"python -m recipes.memdlm {command}" in DOC, command


def test_module_map_names_existing_files_of_each_subpackage():
    """Every `name.py` in a subpackage's row of the module map (`| `method/` | ...`) is a file of
    that subpackage, and every file of the subpackages whose rows list files is named there
    (commands/ names its subcommands instead of their files)."""
    rows = re.findall(r"^\| `([a-z_]+)/` \| (.*)$", DOC, flags=re.MULTILINE)
    assert len(rows) >= 6, "the module map's subpackage rows were not found"
    for package, text in rows:
        folder = ROOT / "recipes" / "memdlm" / package
        files = {p.name for p in folder.rglob("*.py") if p.name != "__init__.py"}
        named = set(re.findall(r"`([a-z_]+\.py)`", text))
        assert named <= files, f"{package}/: the docs name missing files {sorted(named - files)}"
        if package != "commands":
            assert files <= named, f"{package}/: files not in the docs {sorted(files - named)}"
