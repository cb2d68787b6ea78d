"""Hub ids for `model.path` / `model.adapter` (backbones/hf/hub.py), with no network: a fake
Hugging Face cache laid out as huggingface_hub writes it (`models--org--name/refs/main` holding a
commit, `snapshots/<commit>/` the files), found through `HF_HOME` or `HF_HUB_CACHE`, offline.
A name that resolves to nothing is one line naming it, before the tokenizer is loaded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("huggingface_hub")

from recipes.memdlm.backbones import hf  # noqa: E402
from recipes.memdlm.cli import main  # noqa: E402
from recipes.memdlm.errors import UserError  # noqa: E402
from tests.recipes.backbones import standins  # noqa: E402

COMMIT = "3f2c9a1e0b7d4c6a8e5f1029384756abcdef0123"
REPO = "org/tiny-llada"


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory) -> Path:
    """HF_HOME with the stand-in LLaDA as hub repo org/tiny-llada in its cache (hub/)."""
    home = tmp_path_factory.mktemp("hf_home")
    repo = home / "hub" / "models--org--tiny-llada"
    standins.write("llada", repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return home


@pytest.fixture
def offline(hf_home, monkeypatch) -> Path:
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hf_home / "hub" / "models--org--tiny-llada" / "snapshots" / COMMIT


def test_a_hub_id_resolves_to_its_snapshot_in_the_offline_cache(offline, hf_home, monkeypatch):
    assert hf.resolve(REPO) == offline
    assert hf.resolve(f"{REPO}@main") == offline
    assert hf.resolve(str(offline)) == offline  # a folder is itself
    # HF_HUB_CACHE names the cache itself and wins over HF_HOME
    monkeypatch.setenv("HF_HOME", str(hf_home / "elsewhere"))
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_home / "hub"))
    assert hf.resolve(REPO) == offline


COMMON = ["--preset", "smoke", "--quiet", "--data.eval_per_cell", "2"]
COMMON += ["--eval.exposure_examples", "4", "--model.trust_remote_code", "true"]


def test_eval_of_a_hub_id_equals_eval_of_its_folder(offline, capsys):
    assert main(["eval", *COMMON, "--model", REPO]) == 0
    by_id = json.loads(capsys.readouterr().out)
    assert main(["eval", *COMMON, "--model", str(offline)]) == 0
    assert json.loads(capsys.readouterr().out) == by_id


@pytest.fixture
def no_tokenizer(monkeypatch):
    """Loading any tokenizer fails the test: the name must be refused before."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"a tokenizer was loaded: {args}")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)


@pytest.mark.parametrize(
    ("option", "name", "said"),
    [
        ("--model", "/no/such/model-folder", "is not a folder"),
        ("--model", "org/not-in-the-cache", "offline (HF_HUB_OFFLINE)"),
        ("--model.adapter", "org/no-such-adapter", "offline (HF_HUB_OFFLINE)"),
    ],
)
@pytest.mark.parametrize("command", ["eval", "train"])
def test_a_name_that_resolves_to_nothing_is_one_line_before_anything_loads(
    offline, no_tokenizer, capsys, tmp_path, option, name, said, command
):
    args = [command, *COMMON, option, name]
    if option == "--model.adapter":
        args += ["--model", REPO]
    if command == "train":
        args += ["--out", str(tmp_path / "run")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and name in err and said in err
    assert ("model.adapter" if option == "--model.adapter" else "model.path") in err
    assert not (tmp_path / "run").exists()


def test_a_file_is_not_a_model(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(UserError, match="is a file"):
        hf.resolve(str(tmp_path / "weights.bin"))


def test_the_fingerprint_names_the_weights_not_the_folder(offline, tmp_path):
    """A copy elsewhere (a local copy of the hub snapshot) has the same fingerprint, and so has
    a config that differs only in how it runs (use_cache); one changed weight changes it."""
    from safetensors.torch import load_file, save_file

    copy = shutil.copytree(offline, tmp_path / "copy")
    assert hf.fingerprint(copy) == hf.fingerprint(offline)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "use_cache": False}))
    assert hf.fingerprint(copy) == hf.fingerprint(offline)
    weights = load_file(copy / "model.safetensors")
    name = sorted(weights)[0]
    weights[name][0] += 1.0  # the first tensor's first row: inside the sampled bytes
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    assert hf.fingerprint(copy) != hf.fingerprint(offline)
