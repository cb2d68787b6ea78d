"""Epochs, fractional periods and the periodic held-out loss (loop/plan.py, loop/periodic.py):
Hugging Face Trainer's step arithmetic, and resume bit-exactness with epoch batches."""

from __future__ import annotations

import math

import pytest
import torch

from recipes.memdlm.build import new_model
from recipes.memdlm.commands.runs import held_out_metrics
from recipes.memdlm.config import ConfigError, build_config
from recipes.memdlm.data.batches import Encoded
from recipes.memdlm.data.epochs import EpochSampler
from recipes.memdlm.data.prepare import prepare_data
from recipes.memdlm.loop import phase as train
from recipes.memdlm.loop import steps as loop_steps
from recipes.memdlm.loop.periodic import PeriodicEval
from recipes.memdlm.loop.plan import every_steps, plan_phase, resolved, sampler_for
from recipes.memdlm.loop.progress import Reporter


def phase_of(**train):
    return build_config("smoke", overrides={"train": train}).train


def test_steps_from_epochs_as_the_trainer_counts_them():
    # LongAlpaca-12k's 95% split (11,400 rows), 2 per device on 1 and on 8 GPUs, 5 epochs.
    p = phase_of(epochs=5, batch_per_device=2, ckpt_every=0.1, eval_every=0.1)
    one = plan_phase(p, 11400, world_size=1)
    assert (one.batch_size, one.steps_per_epoch, one.steps) == (2, 5700, 28500)
    assert (one.ckpt_every, one.eval_every) == (2850, 2850)
    eight = plan_phase(p, 11400, world_size=8)
    assert (eight.batch_size, eight.per_device, eight.steps_per_epoch) == (16, 2, 713)
    assert eight.steps == 3565 and eight.ckpt_every == math.ceil(0.1 * 3565) == 357
    fractional = plan_phase(phase_of(epochs=2.5, batch_size=4), 10, 1)
    assert fractional.steps == math.ceil(2.5 * 3) == 8  # ceil(epochs * ceil(rows / batch))
    assert "28500 steps = 5 epochs x 5700 steps" in one.describe()


def test_without_epochs_the_steps_and_batch_are_the_configured_ones():
    plan = plan_phase(phase_of(steps=40, batch_size=8, ckpt_every=10), 1000, 2)
    assert (plan.steps, plan.batch_size, plan.ckpt_every, plan.eval_every) == (40, 8, 10, None)
    assert plan.steps_per_epoch is None
    assert every_steps(0.25, 40) == 10 and every_steps(0.26, 40) == 11 and every_steps(7, 40) == 7
    assert every_steps(0.001, 40) == 1


def test_bad_periods_and_pretraining_epochs_are_config_errors():
    for bad in ({"ckpt_every": 0}, {"ckpt_every": 1.5}, {"eval_every": -0.1}, {"epochs": 0}):
        with pytest.raises(ConfigError):
            build_config("smoke", overrides={"train": bad})
    with pytest.raises(ConfigError, match="train"):
        build_config("smoke", overrides={"pretrain": {"epochs": 1}})


def varied_rows(n=30):
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        tokens = torch.randint(0, 256, (8 + 3 * (i % 7),), generator=g).tolist()
        rows.append(Encoded(tuple(tokens[:6]), (*tokens[6:], 258)))
    return rows


@pytest.fixture(scope="module")
def setup():
    cfg = build_config(
        "smoke",
        overrides={"train": {"epochs": 2, "batch_size": 8, "group_by_length": True,
                             "ckpt_every": 0.25, "eval_every": 2}},
    )  # fmt: skip
    return cfg, prepare_data(cfg)


def run(cfg, data, folder, method_name, *, stop_at=None):
    rows = varied_rows()
    plan = plan_phase(cfg.train, len(rows))
    sampler = sampler_for(cfg.train, plan, rows, seed=cfg.seed, eos_id=data.tokenizer.eos_id)
    assert isinstance(sampler, EpochSampler)
    if stop_at is not None:
        calls, real = {"n": 0}, sampler.next

        def next_batch():
            calls["n"] += 1
            if calls["n"] == stop_at + 1:
                raise KeyboardInterrupt
            return real()

        sampler.next = next_batch
    model = new_model(cfg, data.tokenizer, seed=cfg.seed, device="cpu")
    log = loop_steps.MetricsLog(folder / "metrics.jsonl", {"phase": "train", "method": method_name})
    train.train_phase(
        model, train.StepSettings(method_name, cfg.memdlm, data.tokenizer.mask_id),
        phase=resolved(cfg.train, plan), sampler=sampler, seed=cfg.seed, folder=folder, log=log,
        reporter=Reporter(quiet=True),
        evaluate=PeriodicEval(plan.eval_every, held_out_metrics(cfg, data, method_name)),
    )  # fmt: skip
    return model, loop_steps.MetricsLog(log.path, {}).records()


@pytest.mark.parametrize("method_name", ["standard", "memdlm"])
def test_epoch_runs_resume_bit_exactly_with_their_evaluations(setup, tmp_path, method_name):
    cfg, data = setup
    model_a, straight = run(cfg, data, tmp_path / "a", method_name)
    steps = [r["step"] for r in straight if r["phase"] == "train"]
    assert steps == list(range(8))  # 2 epochs x ceil(30 / 8)
    evals = [r for r in straight if r["phase"] == "train_eval"]
    assert [r["step"] for r in evals] == [2, 4, 6]
    assert all(math.isfinite(r["eval_loss"]) for r in evals)
    assert ("eval_loss_answer_adapted" in evals[0]) == (method_name == "memdlm")

    with pytest.raises(loop_steps.Interrupted, match="interrupted at step 5"):
        run(cfg, data, tmp_path / "b", method_name, stop_at=5)  # in the second epoch
    model_b, resumed = run(cfg, data, tmp_path / "b", method_name)

    def key(records):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in records]

    assert sorted(key(resumed), key=str) == sorted(key(straight), key=str)
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), name


def test_the_evaluations_do_not_change_the_training(setup, tmp_path):
    cfg, data = setup
    _, with_evals = run(cfg, data, tmp_path / "a", "memdlm")
    quiet = cfg.model_copy(update={"train": cfg.train.model_copy(update={"eval_every": 100})})
    _, without = run(quiet, data, tmp_path / "b", "memdlm")
    losses = [r["loss"] for r in with_evals if r["phase"] == "train"]
    assert losses == [r["loss"] for r in without if r["phase"] == "train"]


@pytest.mark.parametrize(("total", "ratio"), [(28500, 0.1), (37, 0.1), (10, 0.25), (5, 0.0)])
def test_the_trainer_schedule_is_transformers_cosine_with_warmup(tmp_path, total, ratio):
    transformers = pytest.importorskip("transformers")
    from recipes.memdlm.loop.schedule import lr_factor

    warmup = transformers.TrainingArguments(
        output_dir=str(tmp_path), warmup_ratio=ratio, report_to=[]
    ).get_warmup_steps(total)
    param = torch.nn.Parameter(torch.zeros(1))
    theirs = transformers.get_cosine_schedule_with_warmup(
        torch.optim.SGD([param], lr=1.0), warmup, total
    )
    ours = lr_factor(phase_of(steps=total, warmup_ratio=ratio, min_lr_ratio=0.0,
                              schedule="trainer"))  # fmt: skip
    for step in range(total):
        assert ours(step) == pytest.approx(theirs.lr_lambdas[0](step), abs=1e-12), step


def test_the_new_options_keep_the_shipped_base_and_schedule_shapes_it():
    from recipes.memdlm.commands.bases import base_key, shipped_base

    default = build_config()
    assert shipped_base(default) is not None  # the cpu-tiny base still ships for the default
    paper_style = build_config(
        overrides={"train": {"epochs": 5, "group_by_length": True, "eval_every": 0.1,
                             "ckpt_every": 0.1, "schedule": "trainer"}},
    )  # fmt: skip
    assert base_key(paper_style) == base_key(default)  # fine-tuning options only
    trainer = build_config(overrides={"pretrain": {"schedule": "trainer"}})
    assert base_key(trainer) != base_key(default)  # a pretraining schedule shapes the base
