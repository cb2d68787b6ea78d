"""`model.adapter`: a LoRA adapter saved by `peft` itself (as the authors' released MemDLM models,
all-linear, over LLaDA-MoE and LLaDA2.1) on the remote-code stand-ins, loaded onto `model.path`.
Oracles: peft's own `PeftModel.from_pretrained` on the raw base, and the adapter merged by peft
(`merge_and_unload`) into a plain model folder."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from recipes.memdlm.backbones import hf  # noqa: E402
from recipes.memdlm.cli import main  # noqa: E402
from recipes.memdlm.config import build_config  # noqa: E402
from recipes.memdlm.errors import UserError  # noqa: E402
from recipes.memdlm.eval.harness_setup import load_run  # noqa: E402
from tests.recipes.backbones import standins  # noqa: E402

NAMES = ("llada_moe", "llada21")
HUB_BASES = {
    "llada_moe": "inclusionAI/LLaDA-MoE-7B-A1B-Base",
    "llada21": "inclusionAI/LLaDA2.1-mini",
}


def raw(folder: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)


def write_adapter(base: Path, out: Path, *, seed: int = 0):
    """The authors' recipe in small: peft LoRA (alpha = 2r, dropout 0.05, all-linear), B made
    non-zero (a trained adapter), saved by peft; its config names the hub base, as theirs do."""
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules="all-linear")
    model = peft.get_peft_model(raw(base), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    model.save_pretrained(out)
    return model


def write_merged(peft_model, base: Path, out: Path) -> Path:
    """The adapter merged by peft into a model folder with the base's tokenizer and code."""
    peft_model.merge_and_unload().save_pretrained(out)
    for path in base.iterdir():
        if path.suffix == ".py" or path.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(path, out / path.name)
    shutil.copy(base / "config.json", out / "config.json")
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("adapters")
    found = {}
    for name in NAMES:
        base = standins.write(name, root / name / "base")
        adapter = root / name / "adapter"
        model = write_adapter(base, adapter)
        settings = json.loads((adapter / "adapter_config.json").read_text())
        settings["base_model_name_or_path"] = HUB_BASES[name]  # not this base's name
        (adapter / "adapter_config.json").write_text(json.dumps(settings))
        merged = write_merged(model, base, root / name / "merged")
        found[name] = {"base": base, "adapter": adapter, "merged": merged}
    return found


def config(base: Path, adapter: Path | None = None):
    tree = {
        "model": {
            "path": str(base),
            "trust_remote_code": True,
            "adapter": adapter and str(adapter),
        },
        "memdlm": {"layer_fraction": 0.5},
    }
    return build_config("smoke", overrides=tree)


def tokens(shape=(2, 11), seed=0, vocab=300) -> torch.Tensor:
    return torch.randint(5, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", NAMES)
def test_the_adapter_gives_peft_own_logits_and_only_its_lora_weights_train(folders, name):
    f = folders[name]
    model = hf.load_model(config(f["base"], f["adapter"]), device="cpu").eval()
    oracle = peft.PeftModel.from_pretrained(raw(f["base"]), f["adapter"]).eval()
    x = tokens()
    with torch.no_grad():
        ours, theirs = model(x), oracle(input_ids=x).logits
    # Equal up to float rounding: the adapter's MoE dispatch sums the experts in another order.
    torch.testing.assert_close(ours, theirs[..., : ours.shape[-1]], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, raw(f["base"]).eval()(input_ids=x).logits, atol=1e-3)
    trainable = {n.split("hf.base_model.model.", 1)[1] for n, p in model.named_parameters()
                 if p.requires_grad}  # fmt: skip
    saved = peft.utils.load_peft_weights(str(f["adapter"]))
    as_saved = {n.replace(".default", "") for n in trainable}
    assert {n.removeprefix("base_model.model.") for n in saved} == as_saved
    params = dict(model.named_parameters())
    for name, tensor in saved.items():  # training starts from the adapter's own weights
        here = name.replace("base_model.model.", "hf.base_model.model.", 1)
        here = here.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")
        assert torch.equal(params[here], tensor), name


@pytest.mark.slow
def test_compare_fine_tunes_from_the_adapter_and_its_runs_keep_only_the_adapter(
    folders, tmp_path, capsys
):
    """compare's base is model.path with model.adapter; its fine-tuned runs continue the
    adapter, and their model.pt holds the adapter's tensors only, naming the base."""
    f = folders["llada_moe"]
    common = ["--preset", "smoke", "--quiet", "--data.eval_per_cell", "2"]
    common += ["--eval.exposure_examples", "4", "--memdlm.layer_fraction", "0.5"]
    common += ["--model", str(f["base"]), "--model.trust_remote_code", "true"]
    common += ["--model.adapter", str(f["adapter"])]
    out = tmp_path / "cmp"
    assert main(["compare", *common, "--train.steps", "1", "--out", str(out), "--no-cache"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    capsys.readouterr()
    assert main(["eval", *common]) == 0
    adapted = json.loads(capsys.readouterr().out)
    assert summary["base"]["eval_loss"] == pytest.approx(adapted["eval_loss"], rel=1e-6)
    saved = peft.utils.load_peft_weights(str(f["adapter"]))
    runs = sorted(out.glob("seed*/*/model.pt"))
    assert len(runs) == 2
    for path in runs:
        state = torch.load(path, weights_only=True)
        assert state["trainable_only"] and len(state["model"]) == len(saved)
        assert state["base"]["path"] == str(f["base"])


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_eval_with_the_adapter_equals_eval_of_the_merged_model(folders, name, capsys):
    """The issue's check: `eval --model BASE --model.adapter ADAPTER` = `eval --model MERGED`."""
    f = folders[name]
    common = ["--preset", "smoke", "--quiet", "--data.eval_per_cell", "2"]
    common += ["--eval.exposure_examples", "4", "--model.trust_remote_code", "true"]
    assert (
        main(["eval", *common, "--model", str(f["base"]), "--model.adapter", str(f["adapter"])])
        == 0
    )
    adapted = json.loads(capsys.readouterr().out)
    assert main(["eval", *common, "--model", str(f["merged"])]) == 0
    merged = json.loads(capsys.readouterr().out)
    assert adapted["eval_loss"] == pytest.approx(merged["eval_loss"], rel=1e-5)
    assert main(["eval", *common, "--model", str(f["base"])]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert abs(plain["eval_loss"] - merged["eval_loss"]) > 1e-3  # the adapter matters


def test_the_lm_eval_model_arg_peft_loads_the_adapter(folders):
    f = folders["llada_moe"]
    loaded = load_run(None, pretrained=str(f["base"]), peft=str(f["adapter"]),
                      trust_remote_code=True)  # fmt: skip
    merged = load_run(None, pretrained=str(f["merged"]), trust_remote_code=True)
    x = tokens(seed=1)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), merged.model(x), rtol=1e-5, atol=1e-5)
    assert loaded.config.model.adapter == str(f["adapter"])


def test_an_adapter_of_another_model_is_refused_in_one_line_naming_both(folders):
    """LLaDA-MoE's adapter (q_proj, ..., experts) onto LLaDA2.1 (query_key_value, ...)."""
    moe, other = folders["llada_moe"], folders["llada21"]
    with pytest.raises(UserError) as error:
        hf.load_model(config(other["base"], moe["adapter"]), device="cpu")
    message = str(error.value)
    assert "\n" not in message and "does not fit" in message
    assert str(moe["adapter"]) in message and str(other["base"]) in message


def test_an_adapter_whose_shapes_differ_is_refused_in_one_line(folders, tmp_path):
    from safetensors.torch import load_file, save_file

    f = folders["llada_moe"]
    adapter = shutil.copytree(f["adapter"], tmp_path / "adapter")
    weights = load_file(adapter / "adapter_model.safetensors")
    name = next(k for k in sorted(weights) if "lora_A" in k)
    weights[name] = torch.zeros(weights[name].shape[0], weights[name].shape[1] + 3)
    save_file(weights, adapter / "adapter_model.safetensors")
    with pytest.raises(UserError) as error:
        hf.load_model(config(f["base"], adapter), device="cpu")
    message = str(error.value)
    assert "\n" not in message and str(adapter) in message and str(f["base"]) in message


def test_a_folder_that_is_not_an_adapter_is_refused(folders):
    f = folders["llada_moe"]
    with pytest.raises(UserError, match="no adapter_config.json"):
        hf.load_model(config(f["base"], f["merged"]), device="cpu")


def test_an_adapter_needs_a_hugging_face_model():
    with pytest.raises(ValueError, match="set model.path"):
        build_config("smoke", overrides={"model": {"adapter": "org/adapter"}})


def test_the_model_arg_peft_goes_with_pretrained_not_with_a_run():
    from recipes.memdlm.eval.harness_setup import parse_model_args

    options, _ = parse_model_args({"pretrained": "org/base", "peft": "org/adapter"})
    assert options.peft == "org/adapter"
    with pytest.raises(ValueError, match="peft apply to pretrained="):
        parse_model_args({"run": "runs/x", "peft": "org/adapter"})
