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


ROOT = pathlib.Path(__file__).resolve().parents[2]


def _recorded(folder: str) -> dict:
    import json

    return json.loads((ROOT / "docs" / "results" / folder / "summary.json").read_text())


def _interval(delta: dict, scale: float, digits: int) -> str:
    low, high = (scale * v for v in delta["ci95"])
    return f"[{low:+.{digits}f}, {high:+.{digits}f}]"


def test_the_readme_headline_is_the_recorded_default_run():
    """The README's numbers are those of docs/results/cpu-tiny-default-{3,5}seeds/summary.json,
    rounded as printed: a re-run that changes them must change the README too."""
    readme = (ROOT / "README.md").read_text()
    findings = readme.split("## What the comparison finds", 1)[1].split("\n## ", 1)[0]
    flat = " ".join(findings.split())
    three, five = _recorded("cpu-tiny-default-3seeds"), _recorded("cpu-tiny-default-5seeds")
    loss3, acc3 = three["paired"]["eval_loss_delta"], three["paired"]["niah_accuracy_delta"]
    loss5, acc5 = five["paired"]["eval_loss_delta"], five["paired"]["niah_accuracy_delta"]
    assert f"by {loss3['mean']:.3f} nats, 95% CI {_interval(loss3, 1, 3)}" in flat
    assert f"{loss5['mean']:+.3f} {_interval(loss5, 1, 3)}" in flat
    assert f"{100 * acc3['mean']:+.1f} points, 95% CI {_interval(acc3, 100, 1)}" in flat
    assert f"{100 * acc5['mean']:+.1f} {_interval(acc5, 100, 1)}" in flat
    ratio = three["paired"]["step_time_ratio"]["mean"]
    assert f"costs {ratio:.2f}x a standard step in that run" in flat
    if all(d > 0 for d in loss5["per_seed"]):
        assert "higher in every seed" in flat
