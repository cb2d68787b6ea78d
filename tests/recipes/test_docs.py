"""docs/memdlm.md documents every configuration key and every subcommand."""

from __future__ import annotations

import pathlib
import re

from pydantic import BaseModel

from recipes.memdlm.cli import COMMANDS
from recipes.memdlm.config import Config

DOC = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "memdlm.md").read_text()


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
