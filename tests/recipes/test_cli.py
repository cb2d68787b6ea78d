"""The command line through a subprocess: help, user errors (one line, exit 2, no run folder),
and a full smoke comparison that writes the documented run folder."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]  # the repository: `recipes` imports from this checkout


def run(*args, cwd=None, timeout=600, block=None):
    """`python -m recipes.memdlm ARGS`; block: a module name that then fails to import (as if
    the optional package were not installed)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "120"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.pop("MEMDLM_DEBUG", None)
    command = [sys.executable, "-m", "recipes.memdlm"]
    if block is not None:
        command = [
            sys.executable,
            "-c",
            f"import runpy, sys; sys.modules[{block!r}] = None; sys.argv[0] = 'memdlm'; "
            "runpy.run_module('recipes.memdlm', run_name='__main__')",
        ]
    return subprocess.run(
        [*command, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )


def one_line_error(result) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.mark.parametrize(
    "command", [[], ["compare"], ["train"], ["eval"], ["sample"], ["inner-lr"], ["data"]]
)
def test_help(command):
    result = run(*command, "--help")
    assert result.returncode == 0 and "usage: python -m recipes.memdlm" in result.stdout


def test_help_lists_every_command_the_docs_use():
    """`--help` names every command, `harness` (lm-eval's command line, which `main` hands over
    before parsing) included."""
    from recipes.memdlm.cli import COMMANDS, build_parser

    text = build_parser().format_help()
    listed = re.findall(r"^    (\S+)  ", text, flags=re.M)
    assert listed == [
        "compare", "train", "eval", "sample", "inner-lr", "data", "export", "estimate", "harness"
    ]  # fmt: skip
    assert sorted(listed) == sorted(COMMANDS) and "lm-evaluation-harness" in text


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--memdlm.inner_lrr", "1"], "unknown config key 'memdlm.inner_lrr'"),
        (["--train.steps", "-3"], "train.steps"),
        (["--preset", "nope"], "invalid choice"),
        (["--data.train_file", "missing.jsonl"], "does not exist"),
        (["--model.max_seq_len", "64"], "no example fits"),
    ],
)
def test_user_errors_are_one_line_and_leave_no_run_folder(tmp_path, args, expected):
    out = tmp_path / "run"
    result = run("compare", "--preset", "smoke", "--out", str(out), *args, cwd=tmp_path)
    if expected == "invalid choice":  # argparse's own message and exit code
        assert result.returncode == 2 and expected in result.stderr
    else:
        assert expected in one_line_error(result)
    assert not out.exists()


@pytest.mark.parametrize("command", [["eval"], ["sample", "--prompt", "hi"]])
def test_a_checkpoint_or_a_model_path_is_required(tmp_path, command):
    result = run(*command, "--preset", "smoke", cwd=tmp_path)
    assert "give a checkpoint (model.pt or a run folder), or --model PATH" in one_line_error(result)


def test_malformed_jsonl_names_the_line(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "hi", "response": "there"}\n{"prompt": 3, "response": "x"}\n')
    result = run(
        "train",
        "--preset",
        "smoke",
        "--data.train_file",
        str(data),
        "--out",
        str(tmp_path / "run"),
        cwd=tmp_path,
    )
    assert f"{data}:2: missing string field 'prompt'" in one_line_error(result)
    assert not (tmp_path / "run").exists()


def test_existing_run_folder_and_bad_resume(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "file").write_text("x")
    result = run("compare", "--preset", "smoke", "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert "exists and is not empty" in one_line_error(result)
    result = run("compare", "--resume", str(tmp_path / "nothing"), cwd=tmp_path)
    assert "cannot resume" in one_line_error(result)


@pytest.mark.slow
def test_smoke_compare_writes_the_documented_run_folder(tmp_path):
    out = tmp_path / "run"
    result = run(
        "compare",
        "--preset",
        "smoke",
        "--out",
        str(out),
        "--cache",
        str(tmp_path / "cache"),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "MemDLM Train-Only" in result.stdout and "Standard MDLM" in result.stdout
    for name in (
        "config.json",
        "metrics.jsonl",
        "summary.json",
        "base/model.pt",
        "seed1/standard/model.pt",
        "seed1/memdlm/checkpoint.pt",
        "plots/training_loss.png",
        "plots/niah_accuracy.png",
        "plots/exposure_bias.png",
        "plots/inner_loop.png",
    ):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    for method in ("standard", "memdlm"):
        entry = summary[method]
        for key in ("train_loss_final", "eval_loss", "seconds_per_step", "niah_accuracy"):
            assert key in entry, (method, key)
        assert set(entry["niah_accuracy"]) == {"96"}
    # The schema: the *_adapted entries are "Train & Inference" (prompt-only adaptation).
    expected = {"eval_loss_adapted", "niah_accuracy_adapted", "eval_loss_answer_adapted"}
    assert expected <= set(summary["memdlm"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    memdlm_steps = [r for r in records if r["method"] == "memdlm"]
    assert memdlm_steps and all("gap" in r and "inner_grad_norm_1" in r for r in memdlm_steps)

    # `train` is one run of the same pipeline (`commands.runs`): from the same base, seed and
    # method it gives the same record as the comparison's job, and the same files.
    trained = run(
        "train", "--preset", "smoke", "--method", "memdlm", "--seed", "1",
        "--base", str(out / "base" / "model.pt"), "--out", str(tmp_path / "train"), cwd=tmp_path,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    alone = json.loads((tmp_path / "train" / "summary.json").read_text())["memdlm"]
    in_compare = summary["memdlm"]["per_seed"][0]
    assert set(alone) == set(in_compare)
    for key in set(alone) - {"seconds_per_step"}:
        assert alone[key] == in_compare[key], key
    for name in ("eval.json", "metrics.jsonl", "model.pt", "plots/training_loss.png"):
        assert (tmp_path / "train" / name).is_file(), name

    # The pretrained base is cached and reused by a second comparison.
    again = run(
        "compare",
        "--preset",
        "smoke",
        "--out",
        str(tmp_path / "again"),
        "--cache",
        str(tmp_path / "cache"),
        "--train.steps",
        "2",
        cwd=tmp_path,
    )
    assert again.returncode == 0, again.stderr
    assert "reusing the cached base" in again.stderr

    # eval and sample read the run folder's checkpoints.
    # Overrides' values before the checkpoint are not taken for the checkpoint.
    evaluated = run(
        "eval",
        "--seed",
        "1",
        "--eval.batch_size",
        "4",
        str(out / "seed1" / "memdlm"),
        "--method",
        "memdlm",
        cwd=tmp_path,
    )
    assert evaluated.returncode == 0, evaluated.stderr
    assert "eval_loss_adapted" in json.loads(evaluated.stdout)
    sampled = run(
        "sample",
        str(out / "seed1" / "memdlm"),
        "--prompt",
        "amber code is 1234. ",
        "--gen-length",
        "8",
        "--adapt",
        cwd=tmp_path,
    )
    assert sampled.returncode == 0, sampled.stderr
    too_long = run("sample", str(out / "seed1" / "memdlm"), "--prompt", "x" * 300, cwd=tmp_path)
    assert "exceeds the model's maximum length" in one_line_error(too_long)
