"""The training loop: golden losses, resume equality, non-finite steps, Ctrl-C checkpoints."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import signal

import pytest
import torch

from recipes.memdlm import method
from recipes.memdlm.build import new_model
from recipes.memdlm.config import build_config
from recipes.memdlm.data.batches import BatchSampler, Encoded
from recipes.memdlm.data.prepare import prepare_data
from recipes.memdlm.loop import phase as train
from recipes.memdlm.loop import steps as loop_steps
from recipes.memdlm.loop.progress import Reporter
from recipes.memdlm.method import step as method_step

# Losses of the four steps of the smoke preset (seed 1) on synthetic rows, recorded from this
# implementation (torch 2.13 CPU, float32). A change means the numerics of a training step changed.
GOLDEN = {
    "standard": [5.170366287231445, 5.353387832641602, 5.16005277633667, 4.276564598083496],
    "memdlm": [5.168340682983398, 5.353030204772949, 5.159125328063965, 4.27551794052124],
}


@pytest.fixture(scope="module")
def setup():
    cfg = build_config("smoke")
    return cfg, prepare_data(cfg)


def run_phase(cfg, data, folder, method_name, *, steps=None, sampler_hook=None, on_model=None):
    phase = cfg.train.model_copy(update={"steps": steps or cfg.train.steps, "ckpt_every": 2})
    model = new_model(cfg, data.tokenizer, seed=cfg.seed, device="cpu")
    if on_model is not None:
        on_model(model)
    sampler = BatchSampler(
        data.train, phase.batch_size, seed=cfg.seed, eos_id=data.tokenizer.eos_id
    )
    if sampler_hook is not None:
        sampler.next = sampler_hook(sampler.next)
    log = loop_steps.MetricsLog(folder / "metrics.jsonl", {"phase": "train", "method": method_name})
    result = train.train_phase(
        model,
        train.StepSettings(method_name, cfg.memdlm, data.tokenizer.mask_id),
        phase=phase,
        sampler=sampler,
        seed=cfg.seed,
        folder=folder,
        log=log,
        reporter=Reporter(quiet=True),
    )
    return model, result, [r["loss"] for r in log.records()]


def synthetic_rows(n=64, prompt=8, response=12):
    """Token rows that do not depend on the Python version's pydoc text."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (n, prompt + response), generator=g).tolist()
    return [Encoded(tuple(r[:prompt]), (*r[prompt:], 258)) for r in tokens]


@pytest.mark.parametrize("method_name", ["standard", "memdlm"])
def test_golden_losses(setup, tmp_path, method_name):
    cfg, data = setup
    data = dataclasses.replace(data, train=synthetic_rows())
    # A strong inner loop, so that the MemDLM losses differ clearly from the standard ones.
    cfg = cfg.model_copy(update={"memdlm": cfg.memdlm.model_copy(update={"inner_lr": 2.0})})
    _, result, losses = run_phase(cfg, data, tmp_path, method_name)
    assert len(losses) == cfg.train.steps and all(math.isfinite(v) for v in losses)
    expected = GOLDEN[method_name]
    if expected is None:
        pytest.fail(f"record golden losses for {method_name}: {losses}")
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize("method_name", ["standard", "memdlm"])
def test_the_backbone_is_resolved_once_per_phase(setup, tmp_path, monkeypatch, method_name):
    """The phase resolves the model's `Backbone` once and passes it to the method, the split
    and the losses: no step looks it up again."""
    from recipes.memdlm import backbones

    cfg, data = setup
    real, calls = backbones._make_backbone, []
    monkeypatch.setattr(backbones, "_make_backbone", lambda m: calls.append(m) or real(m))
    _, _, losses = run_phase(cfg, data, tmp_path, method_name, steps=3)
    assert len(losses) == 3 and len(calls) == 1


@pytest.mark.parametrize("method_name", ["standard", "memdlm"])
def test_resume_gives_the_losses_of_an_uninterrupted_run(setup, tmp_path, method_name):
    cfg, data = setup
    steps = 6
    model_a, _, straight = run_phase(cfg, data, tmp_path / "a", method_name, steps=steps)

    calls = {"n": 0}

    def interrupt_at_step_3(next_batch):
        def wrapped():
            calls["n"] += 1
            if calls["n"] == 4:
                raise KeyboardInterrupt
            return next_batch()

        return wrapped

    with pytest.raises(loop_steps.Interrupted, match="interrupted at step 3"):
        run_phase(
            cfg, data, tmp_path / "b", method_name, steps=steps, sampler_hook=interrupt_at_step_3
        )
    assert (tmp_path / "b" / "checkpoint.pt").exists()
    assert not (tmp_path / "b" / "model.pt").exists()
    model_b, _, resumed = run_phase(cfg, data, tmp_path / "b", method_name, steps=steps)
    assert resumed == straight  # bit-identical losses, one record per step
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), name


def test_finished_phase_is_reused_not_retrained(setup, tmp_path):
    cfg, data = setup
    model_a, result_a, _ = run_phase(cfg, data, tmp_path, "standard")
    calls = []
    model_b, result_b, _ = run_phase(
        cfg, data, tmp_path, "standard", sampler_hook=lambda f: lambda: calls.append(1) or f()
    )
    assert not calls and result_a == result_b
    assert all(torch.equal(a, b) for a, b in zip(model_a.parameters(), model_b.parameters()))


def test_non_finite_losses_are_skipped_counted_and_stop_training(setup, tmp_path, monkeypatch):
    cfg, data = setup
    real = method.standard_loss
    bad_steps = {1, 3, 4, 5, 6, 7, 8}

    def sometimes_nan(*args):
        loss = real(*args)
        sometimes_nan.calls += 1
        return loss * float("nan") if sometimes_nan.calls - 1 in bad_steps else loss

    sometimes_nan.calls = 0
    monkeypatch.setattr(method_step, "standard_loss", sometimes_nan)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_nonfinite_in_row": 3})})
    with pytest.raises(
        loop_steps.TrainingError, match="3 non-finite losses or gradients in a row at step 5"
    ):
        run_phase(cfg, data, tmp_path, "standard", steps=10)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("skipped", False) for r in records] == [False, True, False, True, True, True]
    assert (tmp_path / "checkpoint.pt").exists()


def test_a_skipped_step_leaves_the_weights_untouched(setup, tmp_path, monkeypatch):
    cfg, data = setup
    real = method.standard_loss

    def always_nan(*args):
        return real(*args) * float("nan")

    monkeypatch.setattr(method_step, "standard_loss", always_nan)
    initial = new_model(cfg, data.tokenizer, seed=cfg.seed, device="cpu").state_dict()
    with pytest.raises(loop_steps.TrainingError):
        model, _, _ = run_phase(cfg, data, tmp_path, "standard", steps=10)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(initial[k], v) for k, v in state.items())


def test_a_nonfinite_inner_loss_is_skipped_and_counted_like_an_outer_one(setup, tmp_path):
    """memdlm.inner_lr 1e30: the second inner step's loss overflows. bilevel's error is turned
    into the step's skip (weights untouched), counted in the result, never an exception."""
    cfg, data = setup
    cfg = cfg.model_copy(
        update={
            "memdlm": cfg.memdlm.model_copy(update={"inner_lr": 1e30}),
            "train": cfg.train.model_copy(update={"max_nonfinite_in_row": 100}),
        }
    )
    initial = new_model(cfg, data.tokenizer, seed=cfg.seed, device="cpu").state_dict()
    model, result, losses = run_phase(cfg, data, tmp_path, "memdlm", steps=3)
    assert all(math.isnan(loss) for loss in losses)
    assert (result.skipped_steps, result.inner_nonfinite_steps) == (3, 3)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["inner_nonfinite"] and r["skipped"] for r in records)
    assert all(torch.equal(initial[k], v) for k, v in model.state_dict().items())


def test_finite_inner_losses_are_not_counted(setup, tmp_path):
    cfg, data = setup
    _, result, losses = run_phase(cfg, data, tmp_path, "memdlm", steps=2)
    assert all(math.isfinite(loss) for loss in losses)
    assert (result.skipped_steps, result.inner_nonfinite_steps) == (0, 0)


def test_a_restart_before_the_first_checkpoint_keeps_one_record_per_step(setup, tmp_path):
    """kill -9 before any checkpoint: the phase starts again at step 0, and the records the
    killed run wrote are replaced, not duplicated; stale temporaries of a write are removed."""
    cfg, data = setup
    log = loop_steps.MetricsLog(
        tmp_path / "metrics.jsonl", {"phase": "train", "method": "standard"}
    )
    for step in range(5):  # what the killed run had logged
        log.write({"step": step, "loss": 1.0})
    other = loop_steps.MetricsLog(tmp_path / "metrics.jsonl", {"phase": "pretrain"})
    other.write({"step": 0, "loss": 2.0})  # another phase's record stays
    stale = tmp_path / ".checkpoint.pt.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    _, _, losses = run_phase(cfg, data, tmp_path, "standard", steps=3)
    assert len(losses) == 3 and 1.0 not in losses
    assert [r["step"] for r in log.records()] == [0, 1, 2]
    assert other.records() == [{"phase": "pretrain", "step": 0, "loss": 2.0}]
    assert not stale.exists()


def test_dropping_every_record_leaves_a_readable_log(tmp_path):
    log = loop_steps.MetricsLog(tmp_path / "metrics.jsonl", {"phase": "train"})
    log.write({"step": 0, "loss": 1.0})
    log.drop_after(-1)
    assert (tmp_path / "metrics.jsonl").read_text() == ""
    log.drop_after(-1)  # a second resume reads the empty file
    log.write({"step": 0, "loss": 0.5})
    assert log.records() == [{"phase": "train", "step": 0, "loss": 0.5}]


def sigint_at_call(k: int):
    """A model hook that sends this process SIGINT at the k-th call of any layer's attention,
    i.e. somewhere inside a step (an inner-loop or outer forward), as a user's Ctrl-C would. It
    hooks the attention, not the layer: a hooked layer is run whole (`can_split_mid_layer`), so
    the interrupted run would take another, not bitwise equal, path than the straight one."""
    calls = [0]

    def hook(module, args):
        del module, args
        calls[0] += 1
        if calls[0] == k:
            signal.raise_signal(signal.SIGINT)

    def attach(model):
        for layer in model.layers:
            layer.attn.register_forward_pre_hook(hook)

    return attach


@pytest.mark.parametrize("method_name", ["standard", "memdlm"])
def test_ctrl_c_anywhere_in_a_step_resumes_bit_identically(setup, tmp_path, method_name):
    """SIGINT at random points inside steps (not at a safe point): the step in flight finishes,
    a checkpoint is written, and the resumed run's losses and weights equal an uninterrupted
    run's exactly."""
    cfg, data = setup
    steps = 6
    model_a, _, straight = run_phase(cfg, data, tmp_path / "a", method_name, steps=steps)
    rng = random.Random(7 if method_name == "memdlm" else 8)
    layers = cfg.model.n_layers
    for trial in range(3):
        folder = tmp_path / f"b{trial}"
        k = rng.randrange(1, layers * 4)  # a layer call inside the first steps
        with pytest.raises(loop_steps.Interrupted):
            run_phase(cfg, data, folder, method_name, steps=steps, on_model=sigint_at_call(k))
        model_b, _, resumed = run_phase(cfg, data, folder, method_name, steps=steps)
        assert resumed == straight, f"SIGINT at layer call {k}"
        for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
            assert torch.equal(a, b), (k, name)


def test_a_second_ctrl_c_stops_at_once_with_exit_code_130():
    from recipes.memdlm.loop import interrupts

    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN in a background job
    with pytest.raises(SystemExit) as stopped, interrupts.deferred() as stop:
        signal.raise_signal(signal.SIGINT)
        assert stop.requested  # the first one only asks
        signal.raise_signal(signal.SIGINT)
    assert stopped.value.code == 130
    assert signal.getsignal(signal.SIGINT) is before  # restored
