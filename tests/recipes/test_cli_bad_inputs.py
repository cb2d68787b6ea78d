"""Malformed inputs, files and arguments through the command line (issue 15): each gives one line
naming the problem and the fix, exit code 2, no traceback, and leaves no run folder or file."""

from __future__ import annotations

import shutil

import pytest
import torch

from tests.recipes.test_cli import one_line_error, run

SMOKE = ("--preset", "smoke", "--quiet")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished smoke run folder (standard, 2 steps): model.pt, checkpoint.pt, config.json."""
    folder = tmp_path_factory.mktemp("trained") / "run"
    result = run("train", *SMOKE, "--method", "standard", "--train.steps", "2", "--out", folder)
    assert result.returncode == 0, result.stderr
    return folder


def bad_checkpoint(tmp_path, kind: str, trained) -> str:
    path = tmp_path / "bad" / "model.pt"
    path.parent.mkdir()
    good = (trained / "model.pt").read_bytes()
    path.write_bytes(
        {"empty": b"", "garbage": b"not a checkpoint at all\n" * 10, "truncated": good[:1000]}[kind]
    )
    return str(path)


@pytest.mark.parametrize("kind", ["empty", "garbage", "truncated"])
@pytest.mark.parametrize("command", [["eval"], ["sample", "--prompt", "hi"]])
def test_unreadable_checkpoint(tmp_path, trained, kind, command):
    path = bad_checkpoint(tmp_path, kind, trained)
    line = one_line_error(run(*command, path, *SMOKE, cwd=tmp_path))
    assert f"checkpoint '{path}' is not a readable checkpoint (" in line
    assert "train it again or point at another model.pt" in line


@pytest.mark.parametrize("command", ["train", "compare"])
def test_corrupt_base_leaves_no_run_folder(tmp_path, trained, command):
    base = bad_checkpoint(tmp_path, "truncated", trained)
    out = tmp_path / "run"
    line = one_line_error(run(command, *SMOKE, "--base", base, "--out", out, cwd=tmp_path))
    assert f"checkpoint '{base}' is not a readable checkpoint" in line
    assert not out.exists()


def test_corrupt_cached_base_names_the_cache_file_and_pretrain_replaces_it(tmp_path, trained):
    from recipes.memdlm.commands.bases import base_key
    from recipes.memdlm.config import build_config

    cache = tmp_path / "cache"
    cache.mkdir()
    cached = cache / f"base-{base_key(build_config('smoke'))}.pt"
    cached.write_bytes((trained / "model.pt").read_bytes()[:1000])
    out = tmp_path / "run"
    args = ("compare", *SMOKE, "--cache", cache, "--workers", "1")
    line = one_line_error(run(*args, "--out", out, cwd=tmp_path))
    assert f"the cached base '{cached}' cannot be used: delete it, or run with --pretrain" in line
    assert not out.exists()  # nothing was copied into a run folder
    result = run(*args, "--out", out, "--pretrain", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert cached.read_bytes() == (out / "base" / "model.pt").read_bytes()  # replaced by it


@pytest.mark.parametrize("quiet", [(), ("--quiet",)])
@pytest.mark.parametrize("kind", ["garbage", "truncated"])
def test_resume_with_a_corrupt_checkpoint_keeps_the_folder(tmp_path, trained, kind, quiet):
    """One line also without --quiet: the file is checked before the backbone line."""
    folder = tmp_path / "run"
    shutil.copytree(trained, folder)
    for name in ("model.pt", "summary.json"):  # an unfinished run
        (folder / name).unlink()
    checkpoint = folder / "checkpoint.pt"
    bad = bad_checkpoint(tmp_path, kind, trained)
    shutil.copy(bad, checkpoint)
    line = one_line_error(run("train", "--resume", folder, *quiet, cwd=tmp_path))
    assert f"checkpoint '{checkpoint}' is not a readable checkpoint" in line
    assert folder.is_dir() and (folder / "config.json").is_file()  # the user's folder stays


@pytest.mark.parametrize("command", ["train", "compare"])
def test_corrupt_base_is_one_line_without_quiet(tmp_path, trained, command):
    base = bad_checkpoint(tmp_path, "truncated", trained)
    out = tmp_path / "run"
    workers = ("--workers", "1") if command == "compare" else ()
    line = one_line_error(run(command, "--preset", "smoke", "--base", base, "--out", out, *workers))
    assert f"checkpoint '{base}' is not a readable checkpoint" in line
    assert not out.exists()


def pickled_payload(path, marker):
    """A .pt that would create `marker` if it were unpickled with the full unpickler."""

    class RunsCode:
        def __reduce__(self):
            return (shutil.copyfile, (__file__, str(marker)))

    torch.save({"model": {}, "result": RunsCode()}, path)


@pytest.mark.parametrize(
    "command",
    [
        ["eval", "{pt}"],
        ["sample", "{pt}", "--prompt", "hi"],
        ["train", *SMOKE, "--base", "{pt}", "--out", "{out}"],
        ["compare", *SMOKE, "--base", "{pt}", "--out", "{out}", "--workers", "1"],
        ["train", "--resume", "{resume}", "--quiet"],
    ],
    ids=["eval", "sample", "train-base", "compare-base", "resume"],
)
def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, trained, command):
    marker = tmp_path / "code-ran"
    resume = tmp_path / "resume"
    shutil.copytree(trained, resume)
    (resume / "model.pt").unlink()
    (resume / "summary.json").unlink()
    pt = resume / "checkpoint.pt" if "--resume" in command else tmp_path / "model.pt"
    pickled_payload(pt, marker)
    out = tmp_path / "run"
    argv = [str(a).format(pt=pt, out=out, resume=resume) for a in command]
    line = one_line_error(run(*argv, "--quiet", cwd=tmp_path))
    assert f"checkpoint '{pt}' was refused: it holds Python objects" in line
    assert "loading it could run code" in line
    assert not marker.exists() and not out.exists()


def test_a_cached_base_that_would_run_code_is_refused(tmp_path):
    from recipes.memdlm.commands.bases import base_key
    from recipes.memdlm.config import build_config

    cache = tmp_path / "cache"
    cache.mkdir()
    cached = cache / f"base-{base_key(build_config('smoke'))}.pt"
    marker = tmp_path / "code-ran"
    pickled_payload(cached, marker)
    args = ("compare", *SMOKE, "--cache", cache, "--workers", "1", "--out", tmp_path / "run")
    line = one_line_error(run(*args, cwd=tmp_path))
    assert f"the cached base '{cached}' cannot be used" in line and "was refused" in line
    assert not marker.exists()


BUG = (  # the training loop raises a ValueError of its own before the first checkpoint
    "import sys; from recipes.memdlm.loop import phase; from recipes.memdlm.cli import main\n"
    "def broken(*args, **kwargs): raise ValueError('an injected bug')\n"
    "phase.train_phase = broken\n"
    "sys.exit(main(sys.argv[1:]))"
)


def test_an_internal_bug_keeps_its_traceback_exit_1_and_the_run_folder(tmp_path):
    """A ValueError the recipe did not raise about the user's input is a bug: traceback, exit
    1, the run folder kept for the report (a UserError would give one line, exit 2, no folder)."""
    import os
    import subprocess
    import sys

    from tests.recipes.test_cli import ROOT

    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    argv = ["train", *SMOKE, "--method", "standard", "--train.steps", "2", "--out", str(out)]
    result = subprocess.run(
        [sys.executable, "-c", BUG, *argv], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" in result.stderr and "ValueError: an injected bug" in result.stderr
    assert (out / "config.json").is_file()  # kept, though no checkpoint was written yet
    user = run("train", *SMOKE, "--memdlm.targets", "nothing_here", "--out", out / "x")
    assert one_line_error(user).startswith("error: ") and not (out / "x").exists()


def test_checkpoint_of_another_shape(tmp_path, trained):
    args = ("--model.d_model", "64", "--model.d_ff", "128")
    line = one_line_error(run("eval", trained / "model.pt", *args, "--quiet", cwd=tmp_path))
    assert "does not fit this model: " in line and "differ in shape (first: " in line
    assert "pass the same --preset/--config/model options it was trained with" in line
    out = tmp_path / "run"
    base = str(trained / "model.pt")
    result = run("train", *SMOKE, *args, "--base", base, "--out", out, cwd=tmp_path)
    assert "does not fit this model" in one_line_error(result)
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--device", "banana"], "device 'banana' is not a device; use auto, cpu, cuda"),
        (["--train.lr", "inf"], "train.lr"),
        (["--train.lr", "nan"], "train.lr"),
        (["--memdlm.inner_lr", "Infinity"], "memdlm.inner_lr"),
        (["--memdlm.targets", "nope_proj,up_proj"], "['nope_proj'] match no nn.Linear"),
        (["--seeds", "-1"], "seeds"),
        (["--train.steps", "abc"], "train.steps"),
        (["--data.train_file", "."], "is a folder but not a `datasets` save_to_disk folder"),
        (["--config", "."], "is a folder; give a TOML file"),
    ],
)
def test_bad_options_leave_no_run_folder(tmp_path, args, expected):
    out = tmp_path / "run"
    assert expected in one_line_error(run("compare", *SMOKE, "--out", out, *args, cwd=tmp_path))
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda(tmp_path):
    out = tmp_path / "run"
    line = one_line_error(run("train", *SMOKE, "--device", "cuda", "--out", out, cwd=tmp_path))
    assert "CUDA is not available; use --device cpu" in line
    assert not out.exists()


def test_out_naming_a_file(tmp_path):
    out = tmp_path / "results.txt"
    out.write_text("mine\n")
    for command in ("train", "compare", "inner-lr"):
        line = one_line_error(run(command, *SMOKE, "--out", out, cwd=tmp_path))
        assert "is a file; give --out a new folder's path" in line
    assert out.read_text() == "mine\n"


def test_triton_kernels_without_triton(tmp_path):
    out = tmp_path / "run"
    result = run("train", *SMOKE, "--kernels", "triton", "--out", out, cwd=tmp_path, block="triton")
    assert "needs the optional package triton, which is not installed" in one_line_error(result)
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_triton_kernels_on_cpu(tmp_path, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out = tmp_path / "run"
    result = run("train", *SMOKE, "--kernels", "triton", "--out", out, cwd=tmp_path)
    assert "kernels='triton' runs on CUDA, not on cpu" in one_line_error(result)
    assert not out.exists()


def test_hf_model_without_the_extra(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    out = tmp_path / "run"
    result = run(
        "train", *SMOKE, "--model", model, "--out", out, cwd=tmp_path, block="transformers"
    )
    assert 'pip install -e ".[hf]"' in one_line_error(result)
    assert not out.exists()


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (
            b'{"prompt": "a", "response": "b"}\n{"prompt": "\xff\xfe", "response": "c"}\n',
            ":2: not UTF-8",
        ),
        (b"", "holds no examples"),
        (b"\n\n", "holds no examples"),
        (b'{"prompt": "a"}\n', ":1: missing string field 'response'"),
        (b'{"response": "a"}\n', ":1: missing string field 'prompt'"),
        (b'["a", "b"]\n', ":1: expected an object, got list"),
        (b'{"prompt": "a", "response": "b"\n', ":1: not valid JSON"),
    ],
)
def test_bad_data_files(tmp_path, content, expected):
    data = tmp_path / "data.jsonl"
    data.write_bytes(content)
    out = tmp_path / "run"
    result = run("train", *SMOKE, "--data.train_file", data, "--out", out, cwd=tmp_path)
    line = one_line_error(result)
    assert expected in line and str(data) in line
    assert not out.exists()


def test_config_file_not_utf8(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_bytes(b"[train]\nsteps = 3 # \xff\n")
    out = tmp_path / "run"
    result = run("train", *SMOKE, "--config", config, "--out", out, cwd=tmp_path)
    assert "is not UTF-8 text" in one_line_error(result)
    assert not out.exists()


def test_resume_with_a_corrupt_config(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "config.json").write_text('{"train": {"steps": "many"}}')
    line = one_line_error(run("train", "--resume", folder, cwd=tmp_path))
    assert line.startswith("error: cannot resume: ") and "train.steps" in line
    line = one_line_error(run("train", "--resume", tmp_path / "missing", cwd=tmp_path))
    assert "cannot resume" in line and "does not exist" in line


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--steps", "0"], "--steps must be at least 1"),
        (["--steps", "-2"], "--steps must be at least 1"),
        (["--gen-length", "0"], "--gen-length must be at least 1"),
        (["--block-length", "0"], "--block-length must be at least 1"),
        (["--gen-length", "8", "--block-length", "3"], "must be a multiple of block_length=3"),
        (["--temperature", "nan"], "--temperature must be a finite number"),
    ],
)
def test_bad_sample_options(tmp_path, trained, args, expected):
    result = run("sample", trained, "--prompt", "hi", *args, "--quiet", cwd=tmp_path)
    assert expected in one_line_error(result)


def test_base_is_a_folder_and_bad_inner_lr_options(tmp_path):
    out = tmp_path / "run"
    line = one_line_error(run("compare", *SMOKE, "--base", tmp_path, "--out", out, cwd=tmp_path))
    assert "is a folder; give its model.pt" in line
    for args, expected in [
        (["--batches", "0"], "--batches must be at least 1"),
        (["--lrs", "0.1,inf"], "--lrs needs finite non-negative numbers"),
        (["--target-gap", "0"], "--target-gap must be a positive number"),
    ]:
        result = run("inner-lr", *SMOKE, "--out", out, *args, cwd=tmp_path)
        assert expected in one_line_error(result)
    assert not out.exists()


def test_a_train_run_folder_has_its_plots(trained):
    """Every run folder holds plots (DESIGN: recipes), `train`'s too: one method's curves."""
    plots = trained / "plots"
    for name in ("training_loss.png", "niah_accuracy.png", "exposure_bias.png"):
        assert (plots / name).stat().st_size > 1000, name
    assert not (plots / "inner_loop.png").exists()  # a Standard run has no inner loop
