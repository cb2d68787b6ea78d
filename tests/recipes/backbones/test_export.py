"""`python -m recipes.memdlm export` (recipes/memdlm/backbones/export.py): a LoRA run of the
LLaDA-MoE stand-in as a PEFT adapter and as a merged transformers folder, a fully fine-tuned run,
and the reference Transformer. Each export, loaded by peft / transformers / `load_reference`,
gives the run's own logits and evaluation numbers."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from recipes.memdlm.backbones.export import load_reference  # noqa: E402
from recipes.memdlm.cli import main  # noqa: E402
from recipes.memdlm.commands.folders import load_model  # noqa: E402
from tests.recipes.backbones import standins  # noqa: E402

COMMON = ["--preset", "smoke", "--quiet", "--data.eval_per_cell", "2"]
COMMON += ["--eval.exposure_examples", "4", "--memdlm.layer_fraction", "0.5"]
TRUST = ["--model.trust_remote_code", "true"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return standins.write("llada_moe", tmp_path_factory.mktemp("export") / "base")


def train(base: Path, out: Path, *options: str) -> Path:
    args = ["train", *COMMON, *TRUST, "--model", str(base), "--method", "standard", *options]
    assert main([*args, "--train.steps", "2", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def lora_run(base, tmp_path_factory) -> Path:
    return train(base, tmp_path_factory.mktemp("lora") / "run", "--model.lora_rank", "8")


def run_model(run: Path):
    """The run's model as `eval` loads it (the run's config, model.pt)."""
    args = argparse.Namespace(checkpoint=run / "model.pt", config=None, preset="smoke")
    cfg, tok, model, _ = load_model(args, [])
    return model, tok


def logits_of(model, tok, seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randint(5, tok.vocab_size, (2, 13), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return x, model(x)


def raw(folder: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()


def eval_loss(capsys, *args: str) -> float:
    capsys.readouterr()
    assert main(["eval", *COMMON, *args]) == 0
    return json.loads(capsys.readouterr().out)["eval_loss"]


def summary_loss(run: Path) -> float:
    return json.loads((run / "summary.json").read_text())["standard"]["eval_loss"]


def test_a_lora_run_exports_an_adapter_that_peft_loads_with_the_runs_numbers(
    lora_run, base, tmp_path, capsys
):
    out = tmp_path / "adapter"
    assert main(["export", str(lora_run), "--out", str(out), "--quiet"]) == 0
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in out.iterdir()}
    settings = json.loads((out / "adapter_config.json").read_text())
    assert settings["base_model_name_or_path"] == str(base) and settings["r"] == 8
    model, tok = run_model(lora_run)
    x, ours = logits_of(model, tok)
    oracle = peft.PeftModel.from_pretrained(raw(base), out).eval()
    with torch.no_grad():
        theirs = oracle(input_ids=x).logits[..., : ours.shape[-1]]
    # The same weights; equal up to float rounding (the recipe's MoE dispatch sums experts in
    # another order than the remote code's loop).
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    # Through the recipe again: exactly the run's evaluation.
    by_adapter = eval_loss(capsys, *TRUST, "--model", str(base), "--model.adapter", str(out))
    assert by_adapter == eval_loss(capsys, str(lora_run))
    assert by_adapter == pytest.approx(summary_loss(lora_run), rel=1e-6)


def test_a_lora_run_exports_a_merged_folder_that_transformers_loads(
    lora_run, base, tmp_path, capsys
):
    out = tmp_path / "merged"
    assert main(["export", str(lora_run), "--out", str(out), "--merged", "--quiet"]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= names
    assert {p.name for p in base.glob("*.py")} <= names  # the remote code travels along
    saved = json.loads((out / "config.json").read_text())
    original = json.loads((base / "config.json").read_text())
    assert {k: v for k, v in saved.items() if "dtype" not in k} == {
        k: v for k, v in original.items() if "dtype" not in k
    }
    model, tok = run_model(lora_run)
    x, ours = logits_of(model, tok, seed=1)
    with torch.no_grad():
        theirs = raw(out)(input_ids=x).logits[..., : ours.shape[-1]]
    # W + (alpha/r) B A rounded once to float32, and the MoE dispatch's order: float rounding.
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    merged = eval_loss(capsys, *TRUST, "--model", str(out))
    assert merged == pytest.approx(summary_loss(lora_run), rel=1e-5)


def test_a_fully_fine_tuned_run_exports_its_exact_weights(base, tmp_path):
    from safetensors.torch import load_file

    run = train(base, tmp_path / "full")
    out = tmp_path / "full-export"
    assert main(["export", str(run), "--out", str(out), "--quiet"]) == 0
    trained = torch.load(run / "model.pt", weights_only=True)["model"]
    assert not any(k.startswith("hf.base_model") for k in trained)  # no LoRA: whole weights
    written = load_file(out / "model.safetensors")
    for name, tensor in written.items():
        assert torch.equal(tensor, trained[f"hf.{name}"]), name
    before = load_file(base / "model.safetensors")
    assert any(not torch.equal(before[k], written[k]) for k in before)  # it did train
    model, tok = run_model(run)
    x, ours = logits_of(model, tok, seed=2)
    with torch.no_grad():
        theirs = raw(out)(input_ids=x).logits[..., : ours.shape[-1]]
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_the_reference_transformer_exports_safetensors_that_load_back_exactly(run_dir, tmp_path):
    out = tmp_path / "reference"
    assert main(["export", str(run_dir), "--out", str(out), "--merged", "--quiet"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["format"] == "memdlm-reference-transformer"
    model, tok = run_model(run_dir)
    x, ours = logits_of(model, tok)
    back = load_reference(out).eval()
    with torch.no_grad():
        assert torch.equal(back(x), ours)
    for (name, a), b in zip(model.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name


def test_export_refuses_a_folder_that_is_not_empty(run_dir, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")
    assert main(["export", str(run_dir), "--out", str(tmp_path / "taken")]) == 2
    assert "not empty" in capsys.readouterr().err
