"""Checkpoints of an outer-LoRA run on a LLaDA-MoE stand-in (loop/checkpoint.py): they hold only
what trains (the adapter, its optimizer moments, schedule, data position, RNG) and name their
base; a resume is bitwise equal to an uninterrupted run; a different base is refused in one line,
a copy of the same base is not."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from recipes.memdlm.build import new_model
from recipes.memdlm.config import build_config
from recipes.memdlm.data.batches import BatchSampler
from recipes.memdlm.data.prepare import prepare_data
from recipes.memdlm.errors import UserError
from recipes.memdlm.loop import checkpoint as ckpt
from recipes.memdlm.loop import phase as train
from recipes.memdlm.loop import steps as loop_steps
from recipes.memdlm.loop.progress import Reporter
from tests.recipes.backbones import standins


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return standins.write("llada_moe", tmp_path_factory.mktemp("lora") / "base")


def lora_config(path: Path):
    tree = {
        "model": {"path": str(path), "trust_remote_code": True, "lora_rank": 32},
        "memdlm": {"layer_fraction": 0.5},
        "data": {"eval_per_cell": 2},
    }
    return build_config("smoke", overrides=tree)


@pytest.fixture(scope="module")
def setup(base):
    cfg = lora_config(base)
    return cfg, prepare_data(cfg)


def run_phase(cfg, data, folder, *, steps=4, sampler_hook=None):
    phase = cfg.train.model_copy(update={"steps": steps, "ckpt_every": 2})
    model = new_model(cfg, data.tokenizer, seed=cfg.seed, device="cpu")
    sampler = BatchSampler(
        data.train, phase.batch_size, seed=cfg.seed, eos_id=data.tokenizer.eos_id
    )
    if sampler_hook is not None:
        sampler.next = sampler_hook(sampler.next)
    log = loop_steps.MetricsLog(folder / "metrics.jsonl", {"phase": "train", "method": "memdlm"})
    train.train_phase(
        model,
        train.StepSettings("memdlm", cfg.memdlm, data.tokenizer.mask_id),
        phase=phase,
        sampler=sampler,
        seed=cfg.seed,
        folder=folder,
        log=log,
        reporter=Reporter(quiet=True),
    )
    return model, [r["loss"] for r in log.records()]


def interrupt_at_call(n: int):
    def hook(next_batch):
        calls = [0]

        def wrapped():
            calls[0] += 1
            if calls[0] == n:
                raise KeyboardInterrupt
            return next_batch()

        return wrapped

    return hook


def trainable_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def test_a_lora_run_checkpoints_only_the_adapter_and_resumes_bit_identically(setup, tmp_path):
    cfg, data = setup
    model_a, straight = run_phase(cfg, data, tmp_path / "a")
    with pytest.raises(loop_steps.Interrupted):
        run_phase(cfg, data, tmp_path / "b", sampler_hook=interrupt_at_call(4))
    checkpoint = tmp_path / "b" / "checkpoint.pt"
    state = ckpt.load(checkpoint)
    trainable = {n for n, p in model_a.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert set(state["model"]) == trainable and state["trainable_only"]
    assert state["base"] == model_a.base_identity
    assert state["base"]["path"] == cfg.model.path and len(state["base"]["fingerprint"]) == 16
    # The bound at the paper's rank 32: weights, two AdamW moments, schedule, data
    # position, RNG (and torch.save's few hundred bytes per tensor, large for tiny tensors).
    assert checkpoint.stat().st_size <= 4 * trainable_bytes(model_a)
    # What `estimate.disk` counts for a LoRA run: fp32 adapter weights and two AdamW moments,
    # 12 bytes per trainable parameter, no base; the file holds at least that.
    assert checkpoint.stat().st_size >= 3 * trainable_bytes(model_a)
    done = ckpt.load(tmp_path / "a" / "model.pt")
    assert set(done["model"]) == trainable and done["base"] == state["base"]

    model_b, resumed = run_phase(cfg, data, tmp_path / "b")
    assert resumed == straight  # bit-identical losses, one record per step
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), name


def perturbed_copy(base: Path, folder: Path) -> Path:
    """A copy of `base` with one weight changed: another base of the same architecture."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(base, folder)
    weights = load_file(folder / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name] + 0.01
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_resuming_on_another_base_stops_in_one_line_and_a_copy_of_the_base_resumes(
    setup, base, tmp_path
):
    cfg, data = setup
    with pytest.raises(loop_steps.Interrupted):
        run_phase(cfg, data, tmp_path / "run", steps=4, sampler_hook=interrupt_at_call(4))
    other = perturbed_copy(base, tmp_path / "other")
    other_cfg = lora_config(other)
    with pytest.raises(UserError) as error:
        run_phase(other_cfg, data, tmp_path / "run", steps=4)
    message = str(error.value)
    assert "\n" not in message and str(base) in message and str(other) in message
    assert "fingerprint" in message
    # A copy at another path (as a local copy of a hub snapshot) is the same base.
    same = tmp_path / "copy"
    shutil.copytree(base, same)
    _, losses = run_phase(lora_config(same), data, tmp_path / "run", steps=4)
    assert len(losses) == 4


def test_a_full_state_checkpoint_is_unchanged_for_a_model_that_trains_whole(tmp_path):
    """The reference Transformer (everything trains): the whole state, as before."""
    model = torch.nn.Linear(3, 2)
    payload = ckpt.model_payload(model)
    assert set(payload) == {"model"} and set(payload["model"]) == {"weight", "bias"}
    ckpt.save(tmp_path / "m.pt", payload)
    other = torch.nn.Linear(3, 2)
    ckpt.load_model_state(other, ckpt.load(tmp_path / "m.pt"), tmp_path / "m.pt")
    assert torch.equal(other.weight, model.weight) and torch.equal(other.bias, model.bias)


def test_a_trainable_only_checkpoint_refuses_another_lora_layout(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    model[0].requires_grad_(False)
    model.base_identity = {"path": "b", "fingerprint": "f"}
    payload = ckpt.model_payload(model)
    assert set(payload["model"]) == {"1.weight", "1.bias"} and payload["base"]["path"] == "b"
    other = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    other[1].requires_grad_(False)
    other.base_identity = {"path": "b", "fingerprint": "f"}
    with pytest.raises(UserError, match="another LoRA layout"):
        ckpt.load_model_state(other, payload, tmp_path / "x.pt")
