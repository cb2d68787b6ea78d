"""`train.tensorboard` / `pretrain.tensorboard`: the scalars of metrics.jsonl, read back from the
event files with TensorBoard's own reader, equal the logged records (float32, as stored)."""

from __future__ import annotations

import json
import math
import struct

import pytest

from recipes.memdlm.errors import UserError
from recipes.memdlm.loop import tensorboard
from recipes.memdlm.loop.steps import MetricsLog

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import (
    EventAccumulator,
)

TAGS = {"phase": "train", "method": "memdlm", "seed": 3}


def events(folder) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in `folder` as (step, value) pairs, after TensorBoard's purges."""
    reader = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    reader.Reload()
    return {
        tag: [(e.step, e.value) for e in reader.Scalars(tag)] for tag in reader.Tags()["scalars"]
    }


def f32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", value))[0]


def expected_series(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """What the events should hold: each record's numbers (not tags, step, bools or text)."""
    series: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        for key, value in record.items():
            if key in ("step", *TAGS) or isinstance(value, (bool, str, dict, list)):
                continue
            series.setdefault(key, []).append((record["step"], f32(value)))
    return series


def same(got: dict, want: dict) -> bool:
    if got.keys() != want.keys():
        return False
    for tag in want:
        pairs = list(zip(got[tag], want[tag], strict=True))
        for (step_a, a), (step_b, b) in pairs:
            if step_a != step_b or not (a == b or (math.isnan(a) and math.isnan(b))):
                return False
    return True


def jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_steps(log, steps, scale):
    for step in steps:
        log.write(
            {
                "step": step,
                "loss": scale * (step + 1) / 3,
                "tokens": 100 + step,
                "skipped": step == 2,  # a bool: not a curve
                "note": "text",  # not a number
                "inf_loss": math.inf if step == 1 else 0.5,
                "nan_loss": math.nan,
            }
        )


def test_events_equal_the_logged_records(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl", TAGS)
    tensorboard.attach(log, True, tmp_path)
    write_steps(log, range(5), scale=1.0)
    log.sink.close()
    records = jsonl(tmp_path / "metrics.jsonl")
    got = events(tmp_path / "tensorboard")
    assert set(got) == {"loss", "tokens", "inf_loss", "nan_loss"}
    assert same(got, expected_series(records))
    assert got["inf_loss"][1] == (1, math.inf)


def test_a_resumed_phase_replaces_the_redone_steps(tmp_path):
    """An interrupted session logged steps 0-4; the resumed one redoes 3-5 (drop_after(2)):
    TensorBoard's view equals metrics.jsonl's, no step twice."""
    first = MetricsLog(tmp_path / "metrics.jsonl", TAGS)
    tensorboard.attach(first, True, tmp_path)
    write_steps(first, range(5), scale=1.0)
    first.sink.close()
    resumed = MetricsLog(tmp_path / "metrics.jsonl", TAGS)
    tensorboard.attach(resumed, True, tmp_path)
    resumed.drop_after(2)
    write_steps(resumed, range(3, 6), scale=7.0)
    resumed.sink.close()
    records = jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4, 5]
    got = events(tmp_path / "tensorboard")
    assert [step for step, _ in got["loss"]] == [0, 1, 2, 3, 4, 5]
    assert same(got, expected_series(records))


def test_off_by_default_and_a_missing_package_is_one_line(tmp_path, monkeypatch):
    from recipes.memdlm.config import build_config

    cfg = build_config("smoke", None, {})
    assert cfg.train.tensorboard is False and cfg.pretrain.tensorboard is False
    log = MetricsLog(tmp_path / "metrics.jsonl", TAGS)
    tensorboard.attach(log, False, tmp_path)
    log.write({"step": 0, "loss": 1.0})
    assert log.sink is None and not (tmp_path / "tensorboard").exists()
    monkeypatch.setitem(__import__("sys").modules, "torch.utils.tensorboard", None)
    with pytest.raises(UserError, match="needs the tensorboard package"):
        tensorboard.attach(log, True, tmp_path)


@pytest.mark.slow
def test_train_and_compare_write_events_of_every_phase(tmp_path, capsys):
    from recipes.memdlm.cli import main

    steps = ["--train.steps", "3", "--pretrain.steps", "3", "--quiet"]
    out = tmp_path / "train"
    assert main(["train", "--preset", "smoke", *steps, "--train.tensorboard", "true",
                 "--out", str(out)]) == 0  # fmt: skip
    assert same(events(out / "tensorboard"), expected_series(jsonl(out / "metrics.jsonl")))
    out = tmp_path / "compare"
    assert main(["compare", "--preset", "smoke", *steps, "--seeds", "1", "--no-cache",
                 "--workers", "1", "--train.tensorboard", "true", "--pretrain.tensorboard",
                 "true", "--out", str(out)]) == 0  # fmt: skip
    records = jsonl(out / "metrics.jsonl")
    for folder, phase, method in [
        ("base", "pretrain", "standard"),
        ("seed1/standard", "train", "standard"),
        ("seed1/memdlm", "train", "memdlm"),
    ]:
        mine = [r for r in records if r["phase"] == phase and r["method"] == method]
        assert len(mine) == 3
        assert same(events(out / folder / "tensorboard"), expected_series(mine)), folder
