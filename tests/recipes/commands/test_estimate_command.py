"""`python -m recipes.memdlm estimate` (commands/estimate.py) against the run it estimates:
the steps and tokens it counts are the ones `train` logs, the disk it predicts is the size of
the files `train` writes, its time is its formula, and `train` shows it at its start."""

from __future__ import annotations

import json
import math

import pytest

from recipes.memdlm import estimate as est
from recipes.memdlm.cli import main
from recipes.memdlm.commands.estimate import describe, shape_of
from recipes.memdlm.config import build_config
from recipes.memdlm.data.prepare import prepare_data

OPTIONS = ["--preset", "smoke", "--train.epochs", "1", "--train.group_by_length", "true"]
OPTIONS += ["--train.eval_every", "0.5", "--train.ckpt_every", "0.5"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("est") / "run"
    assert main(["train", *OPTIONS, "--out", str(out), "--quiet"]) == 0
    return out


def config():
    return build_config(
        "smoke",
        overrides={"train": {"epochs": 1, "group_by_length": True, "eval_every": 0.5,
                             "ckpt_every": 0.5}},
    )  # fmt: skip


def test_steps_and_tokens_are_the_ones_train_logs(trained):
    cfg = config()
    data = prepare_data(cfg)
    found = describe(
        cfg, gpus=1, rows=[len(r) for r in data.train], eval_rows=[len(r) for r in data.loss_eval]
    )
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["phase"] == "train"]
    evals = [r for r in records if r["phase"] == "train_eval"]
    assert found["plan"].steps == len(steps) == math.ceil(len(data.train) / cfg.train.batch_size)
    # one epoch: the mean padded tokens per step is exactly what the steps logged
    assert found["tokens"]["per_step"] * len(steps) == sum(r["tokens"] for r in steps)
    assert found["tokens"]["evals"] == len(evals) == 1
    assert found["tokens"]["eval"] == sum(len(r) for r in data.loss_eval)


def test_disk_is_the_size_of_the_files_train_writes(trained):
    shape = shape_of(config())
    disk = est.disk(shape, mode="ddp")
    # checkpoint.pt also holds the schedule, the sampler and RNG states (a few KiB) and
    # torch.save's framing: within 10% and 64 KiB of the formula at this tiny size.
    for name, key in (("checkpoint.pt", "checkpoint"), ("model.pt", "model")):
        actual = (trained / name).stat().st_size / est.GIB
        assert disk[key] <= actual <= disk[key] * 1.1 + 64 / 2**20, name
    assert disk["peak"] == pytest.approx(2 * disk["checkpoint"] + disk["model"])


@pytest.mark.parametrize("mode", ["lora", "qlora"])
def test_a_lora_runs_disk_is_its_adapter_and_moments_only(mode):
    """A LoRA or QLoRA run saves what trains (loop/checkpoint.py), never the frozen base:
    fp32 adapter weights in model.pt, and those plus AdamW's two moments in checkpoint.pt."""
    shape = shape_of(config())
    trainable = est.trainable_parameters(shape, mode=mode, lora_rank=8)
    disk = est.disk(shape, mode=mode, lora_rank=8)
    assert disk["model"] == pytest.approx(4 * trainable / est.GIB)
    assert disk["checkpoint"] == pytest.approx(12 * trainable / est.GIB)
    assert trainable < shape.parameters()


def test_time_is_tokens_over_throughput():
    t = est.run_time(steps=100, tokens_per_step=8192, tokens_per_second=4096, gpus=2,
                     eval_tokens=3 * 4096)  # fmt: skip
    assert t["step"] == 1.0 and t["train"] == 100.0 and t["eval"] == pytest.approx(0.5)
    assert t["total"] == pytest.approx(100.5)
    with pytest.raises(ValueError, match="tokens_per_second"):
        est.run_time(steps=1, tokens_per_step=1, tokens_per_second=0, gpus=1)


def test_the_command_says_what_fits_and_how_long(capsys):
    code = main(["estimate", *OPTIONS, "--gpus", "2", "--gpu-memory", "0.001",
                 "--tokens-per-second", "1000", "--quiet"])  # fmt: skip
    text = capsys.readouterr().out
    assert code == 0
    assert "global batch 8 (4 per process)" in text
    assert "fits: NO" in text  # a tiny model in a 1 MiB GPU
    assert "s per step" in text and "evaluations" in text
    assert main(["estimate", "--preset", "smoke", "--gpus", "0"]) == 2


def test_a_probe_measures_the_throughput(capsys):
    assert main(["estimate", "--preset", "smoke", "--probe-steps", "2", "--quiet"]) == 0
    assert "tokens/s per GPU" in capsys.readouterr().out


def test_train_shows_the_estimate_at_its_start(trained, capsys):
    out = trained.parent / "again"
    assert main(["train", *OPTIONS, "--train.epochs", "0.1", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "estimate: memory per GPU" in err and "plan: 4 steps = 0.1 epochs" in err


def test_a_config_json_the_estimate_cannot_read_does_not_stop_training(tmp_path):
    from types import SimpleNamespace

    from recipes.memdlm.commands.estimate import note_at_start
    from recipes.memdlm.data.batches import Encoded

    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))  # no head count
    cfg = build_config("smoke", overrides={"model": {"path": str(tmp_path)}})
    rows = [Encoded((1,), (2, 3))] * 4
    notes = []
    reporter = SimpleNamespace(note=notes.append)
    note_at_start(cfg, SimpleNamespace(train=rows, loss_eval=rows), 1, reporter)
    assert len(notes) == 1 and notes[0].startswith("estimate: not available")
