"""The pretrained base: its identity, shipping one, finding it, and the base that ships for the
default configuration (its hash, a strict load, and its first pretraining losses reproduced)."""

from __future__ import annotations

import json

import pytest
import torch

from recipes.memdlm.build import new_model
from recipes.memdlm.commands import bases
from recipes.memdlm.commands.base_model import obtain_base
from recipes.memdlm.commands.compare import run_compare
from recipes.memdlm.config import build_config
from recipes.memdlm.data.prepare import prepare_data, pretrain_sampler
from recipes.memdlm.eval.metrics import niah_accuracy
from recipes.memdlm.loop import checkpoint as ckpt
from recipes.memdlm.loop.phase import phase_options, train_phase
from recipes.memdlm.loop.progress import Reporter
from recipes.memdlm.loop.steps import Interrupted, MetricsLog


class Notes(Reporter):
    def __init__(self, stop_after: int | None = None):
        super().__init__(quiet=True)
        self.notes, self.stop_after = [], stop_after

    def note(self, message):
        self.notes.append(message)

    def step(self, task, record, every):
        super().step(task, record, every)
        if self.stop_after is not None and self._runs[task]["done"] == self.stop_after:
            raise KeyboardInterrupt  # as a Ctrl-C: the loop checkpoints and stops


@pytest.mark.parametrize(
    "override",
    [
        {"data": {"eval_per_cell": 3}},
        {"data": {"train_context_lengths": [96]}},
        {"train": {"steps": 7}},
        {"memdlm": {"inner_lr": 1.0}},
        {"pretrain": {"log_every": 3, "ckpt_every": 4}},
        {"seeds": 5},
    ],
)
def test_what_does_not_shape_the_base_leaves_its_key(override):
    assert bases.base_key(build_config(overrides=override)) == bases.base_key(build_config())


@pytest.mark.parametrize(
    "override",
    [
        {"data": {"pretrain_context_lengths": [104]}},
        {"pretrain": {"steps": 10}},
        {"model": {"d_model": 64}},
        {"seed": 2},
        {"time_eps": 0.01},
    ],
)
def test_what_shapes_the_base_changes_its_key(override):
    assert bases.base_key(build_config(overrides=override)) != bases.base_key(build_config())


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke") / "run"
    cfg = build_config("smoke", overrides={"train": {"steps": 2}})
    run_compare(cfg, out, workers=1, reporter=Reporter(quiet=True))
    return cfg, out


def test_ship_writes_the_base_and_a_record_that_names_it(smoke_run, tmp_path):
    cfg, out = smoke_run
    shipped = bases.ship(out, tmp_path)
    record = json.loads(shipped.with_suffix(".json").read_text())
    assert record["key"] == bases.base_key(cfg) and shipped.name == record["file"]
    assert record["sha256"] == bases.file_sha256(shipped)
    assert record["identity"] == bases.base_identity(cfg)
    pretrain = [
        r["loss"] for r in MetricsLog(out / "metrics.jsonl", {"phase": "pretrain"}).records()
    ]
    assert record["first_losses"] == pretrain[: bases.RECORDED_LOSSES]
    assert record["steps"] == cfg.pretrain.steps
    original, copy = ckpt.load(out / "base" / "model.pt"), ckpt.load(shipped)
    assert all(torch.equal(original["model"][k], copy["model"][k]) for k in original["model"])
    assert bases.shipped_base(cfg, tmp_path) == shipped
    assert bases.shipped_base(build_config("smoke", overrides={"seed": 3}), tmp_path) is None
    changed = build_config("smoke", overrides={"pretrain": {"steps": 9}, "data": {"value_len": 3}})
    assert bases.differences(changed, tmp_path) == ["data.value_len", "pretrain.steps"]


def test_a_shipped_base_is_used_unless_pretraining_is_asked_for(smoke_run, tmp_path, monkeypatch):
    cfg, out = smoke_run
    assets = tmp_path / "assets"
    shipped = bases.ship(out, assets)
    monkeypatch.setattr(bases, "ASSETS", assets)
    data = prepare_data(cfg)

    def base_of(name, **options):
        reporter = Notes()
        model, result = obtain_base(
            cfg, data, tmp_path / name, base=None, reporter=reporter, device="cpu", **options
        )
        return reporter.notes, result, tmp_path / name / "base" / "model.pt"

    notes, result, weights = base_of("shipped", cache=tmp_path / "empty-cache")
    assert any("using the base shipped for this configuration" in n for n in notes)
    assert weights.read_bytes() == shipped.read_bytes()
    assert result["steps"] == cfg.pretrain.steps  # the shipped run's own result
    for name, options in {
        "forced": {"cache": tmp_path / "empty-cache", "pretrain": True},
        "no-cache": {"cache": None},
    }.items():
        notes, result, weights = base_of(name, **options)
        assert not any("shipped" in n for n in notes), name
        pretrained = MetricsLog(tmp_path / name / "metrics.jsonl", {"phase": "pretrain"})
        assert len(pretrained.records()) == cfg.pretrain.steps, name  # pretrained anew
    reporter = Notes()
    other = cfg.model_copy(update={"seed": 4})
    cache = tmp_path / "other-cache"
    obtain_base(
        other, data, tmp_path / "other", base=None, cache=cache, reporter=reporter, device="cpu"
    )
    assert "no shipped base for this configuration (it differs in seed)" in reporter.notes[0]


# ------------------------------------------------------------------ the base that ships


def default_record():
    cfg = build_config()
    records = [r for r in bases.shipped_records() if r["key"] == bases.base_key(cfg)]
    assert records, (
        "no shipped base for the default configuration: run the default comparison with "
        "--pretrain, then `python -m recipes.memdlm.commands.bases RUN_FOLDER`"
    )
    return cfg, records[0]


def test_the_default_configuration_has_its_shipped_base_with_its_hash():
    cfg, record = default_record()
    path = bases.ASSETS / record["file"]
    assert bases.file_sha256(path) == record["sha256"]
    assert bases.shipped_base(cfg) == path
    assert record["identity"] == bases.base_identity(cfg)
    model = new_model(cfg, prepare_data(cfg).tokenizer, seed=cfg.seed, device="cpu")
    model.load_state_dict(ckpt.load(path)["model"], strict=True)


def test_pretraining_reproduces_the_shipped_bases_first_losses(tmp_path):
    # The first steps of the default pretraining, run now, against those the shipped base was
    # trained with: the same data, initialisation, anchors and updates (float32; 1e-4 relative
    # leaves room for another CPU's kernels, far below a changed step, which moves losses ~1e-2).
    cfg, record = default_record()
    data = prepare_data(cfg)
    model = new_model(cfg, data.tokenizer, seed=cfg.seed, device="cpu")
    log = MetricsLog(tmp_path / "metrics.jsonl", {"phase": "pretrain"})
    sampler = pretrain_sampler(cfg, data)
    steps = len(record["first_losses"])
    with pytest.raises(Interrupted):
        train_phase(
            model,
            phase_options(cfg, data, "standard"),
            phase=cfg.pretrain,
            sampler=sampler,
            seed=cfg.seed,
            folder=tmp_path / "base",
            log=log,
            reporter=Notes(stop_after=steps),
        )
    losses = [r["loss"] for r in log.records()]
    assert losses == pytest.approx(record["first_losses"], rel=1e-4)


def test_the_shipped_base_finds_single_needles_at_the_fine_tuning_lengths():
    # What the pretraining curriculum is for (docs/memdlm.md, "The base"): the shipped base
    # answers the held-out `single` needles at 128 bytes (all 32 when it was shipped; a base that
    # does not retrieve gets 0-1 of them, a 2-character answer being right by chance 1 in 260).
    cfg, record = default_record()
    data = prepare_data(cfg)
    model = new_model(cfg, data.tokenizer, seed=cfg.seed, device="cpu")
    model.load_state_dict(ckpt.load(bases.ASSETS / record["file"])["model"])
    needles = [e for e in data.accuracy_eval if e.task == "single" and e.context_len == 128]
    assert len(needles) == cfg.data.eval_per_cell
    result = niah_accuracy(model, needles, data.tokenizer, batch_size=16, device="cpu")
    assert result["by_length"][128] >= 0.875


def test_a_user_data_file_keys_the_base_by_its_content_not_its_path(tmp_path):
    line = '{"prompt": "code is 7. code? ", "response": "7"}\n'
    first, second = tmp_path / "a.jsonl", tmp_path / "b" / "same.jsonl"
    second.parent.mkdir()
    first.write_text(line * 4)
    second.write_text(line * 4)

    def key(path):
        return bases.base_key(build_config(overrides={"data": {"train_file": str(path)}}))

    assert key(first) == key(second)  # the same examples at two paths: one base
    before = key(first)
    first.write_text(line * 5)  # edited in place: a new base
    assert key(first) != before
    assert key(first) != bases.base_key(build_config())  # and never the embedded data's
    identity = bases.base_identity(build_config(overrides={"data": {"train_file": str(first)}}))
    assert identity["data"]["train_file"] == f"sha256:{bases.file_sha256(first)}"


def test_a_missing_data_file_is_the_users_mistake(tmp_path):
    from recipes.memdlm.errors import UserError

    cfg = build_config(overrides={"data": {"train_file": str(tmp_path / "missing.jsonl")}})
    with pytest.raises(UserError, match="data.train_file .*missing.jsonl.* is not a file"):
        bases.base_key(cfg)


def test_a_datasets_folder_is_identified_by_its_files(tmp_path):
    """A `datasets` folder (data/formats.py) enters by content: the same files at two paths give
    one base; an edited or renamed file, a new base; `data.format` counts only with a file."""
    first, second = tmp_path / "a" / "ds", tmp_path / "b" / "ds"
    for folder in (first, second):
        (folder / "train").mkdir(parents=True)
        (folder / "dataset_dict.json").write_text('{"splits": ["train"]}')
        (folder / "train" / "data-00000-of-00001.arrow").write_bytes(b"\x00rows")

    def key(path, **data):
        return bases.base_key(build_config(overrides={"data": {"train_file": str(path), **data}}))

    assert key(first) == key(second)
    (second / "train" / "data-00000-of-00001.arrow").write_bytes(b"\x00rowz")
    assert key(first) != key(second)
    (second / "train" / "data-00000-of-00001.arrow").rename(second / "train" / "other.arrow")
    (second / "train" / "other.arrow").write_bytes(b"\x00rows")
    assert key(first) != key(second)
    assert key(first, format="chat") != key(first)
    assert bases.base_key(build_config(overrides={"data": {"format": "chat"}})) == bases.base_key(
        build_config()
    )
