"""Fixtures shared by the recipe's tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run folder of the smoke preset (config.json, model.pt), weights seeded, untrained."""
    from recipes.memdlm.build import new_model
    from recipes.memdlm.config import build_config
    from recipes.memdlm.data.tasks import ByteTokenizer
    from recipes.memdlm.loop import checkpoint as ckpt

    out = tmp_path_factory.mktemp("run")
    cfg = build_config("smoke", None, {"device": "cpu"})
    model = new_model(cfg, ByteTokenizer(), seed=0, device="cpu")
    ckpt.save(out / "model.pt", {"model": model.state_dict()})
    ckpt.write_json(out / "config.json", cfg.model_dump())
    return out
