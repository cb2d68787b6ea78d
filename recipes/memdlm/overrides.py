"""Configuration from text: `--key value` command-line overrides and TOML files, as nested dicts."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from recipes.memdlm.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib


def _parse_value(text: str) -> Any:
    """A command-line value: JSON when it parses (numbers, booleans, lists), else a string.

    A bare comma-separated word list (`gate_proj,up_proj`) becomes a list of strings.
    """
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    if text.lower() in {"true", "false"}:
        return text.lower() == "true"
    if "," in text:
        return [part.strip() for part in text.split(",") if part.strip()]
    return text


# Options that name a config key by a shorter name: `--model PATH` is `--model.path PATH`.
SHORTHANDS = {"model": "model.path"}


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`["--memdlm.inner_lr", "0.3", "--seed=2"]` -> nested dict of overrides (see SHORTHANDS)."""
    tree: dict[str, Any] = {}
    i = 0
    while i < len(pairs):
        token = pairs[i]
        if not token.startswith("--") or len(token) <= 2:
            raise ConfigError(f"expected an option --key value, got {token!r}")
        key, eq, value = token[2:].partition("=")
        if not eq:
            if i + 1 >= len(pairs) or pairs[i + 1].startswith("--"):
                raise ConfigError(f"option --{key} needs a value")
            value = pairs[i + 1]
            i += 1
        i += 1
        node = tree
        parts = SHORTHANDS.get(key, key).replace("-", "_").split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--{key}: {part!r} is not a section")
        node[parts[-1]] = _parse_value(value)
    return tree


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a folder; give a TOML file")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"config file {str(path)!r} is not UTF-8 text (byte {error.start}); save it as UTF-8"
        ) from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {error}") from None
