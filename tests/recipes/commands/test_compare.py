"""The comparison's jobs side by side: the same results as one after another, metrics merged,
Ctrl-C that resumes to the uninterrupted result, and no worker left behind by kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from recipes.memdlm.commands.compare import run_compare
from recipes.memdlm.config import build_config
from recipes.memdlm.loop.progress import Reporter

ROOT = Path(__file__).resolve().parents[3]
TIMINGS = {
    "seconds_per_step",
    "seconds",
    "step_time_ratio",
}  # measured, so never equal between two runs


def without_timings(value):
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k not in TIMINGS}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def per_seed(summary):
    return {m: without_timings(summary[m]["per_seed"]) for m in ("standard", "memdlm")}


@pytest.fixture(scope="module")
def two_ways(tmp_path_factory):
    cfg = build_config("smoke", overrides={"seeds": 2})
    runs = {}
    for workers in (1, 2):
        out = tmp_path_factory.mktemp(f"workers{workers}") / "run"
        summary = run_compare(cfg, out, workers=workers, reporter=Reporter(quiet=True))
        runs[workers] = (out, summary)
    return runs


def test_side_by_side_jobs_give_the_sequential_results(two_ways):
    (_, alone), (_, side_by_side) = two_ways[1], two_ways[2]
    assert per_seed(side_by_side) == per_seed(alone)
    assert [r["seed"] for r in side_by_side["memdlm"]["per_seed"]] == [1, 2]
    assert side_by_side["base"]["eval_loss"] == alone["base"]["eval_loss"]
    assert without_timings(side_by_side["paired"]) == without_timings(alone["paired"])


def test_metrics_of_every_run_are_merged_in_seed_and_method_order(two_ways):
    out, _ = two_ways[2]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    runs = [(r["phase"], r["seed"], r["method"]) for r in records]
    order = list(dict.fromkeys(runs))  # first appearance of each run
    assert order == [
        ("pretrain", 1, "standard"),
        ("train", 1, "standard"),
        ("train", 1, "memdlm"),
        ("train", 2, "standard"),
        ("train", 2, "memdlm"),
    ]
    for seed in (1, 2):
        for method in ("standard", "memdlm"):
            own = (out / f"seed{seed}" / method / "metrics.jsonl").read_text().splitlines()
            merged = [
                r
                for r in records
                if (r["phase"], r["seed"], r["method"]) == ("train", seed, method)
            ]
            assert [json.loads(line) for line in own] == merged
            assert [r["step"] for r in merged] == list(range(len(merged)))


def test_summary_holds_the_paired_intervals_and_the_verdict(two_ways):
    _, summary = two_ways[2]
    delta = summary["paired"]["eval_loss_delta"]
    assert len(delta["per_seed"]) == 2 and delta["ci95"][0] <= delta["mean"] <= delta["ci95"][1]
    assert delta["detectable"] > 0 or delta["sd"] == 0
    loss_verdict, niah_verdict = summary["paired"]["verdict"]
    assert loss_verdict.startswith("fast-weights-off eval loss (nats): ")
    assert niah_verdict.startswith("NIAH exact-match accuracy: ")


def compare_process(out: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "120"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "recipes.memdlm", "compare", "--preset", "smoke"]
    return subprocess.Popen(
        [*command, "--out", str(out), "--no-cache", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=out.parent,
        preexec_fn=answer_ctrl_c,
    )


def answer_ctrl_c() -> None:
    """As in a terminal: a test runner started in the background inherits SIGINT ignored (so
    its children would rightly ignore Ctrl-C, as under nohup); the child gets the default."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for_fine_tuning(process: subprocess.Popen, timeout: float = 240.0) -> list[str]:
    """Read progress lines until two fine-tuning runs have logged a step."""
    lines, running, deadline = [], set(), time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("train/") and " step " in line:
            running.add(line.split(" step ")[0])
            if len(running) >= 2:
                return lines
    raise AssertionError("no fine-tuning progress:\n" + "".join(lines))


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper has stopped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


SLOW_TRAIN = ("--seeds", "1", "--workers", "2", "--train.steps", "400", "--train.ckpt_every", "50")


@pytest.mark.slow
def test_ctrl_c_checkpoints_every_job_and_resume_gives_the_uninterrupted_result(tmp_path):
    reference = compare_process(tmp_path / "reference", *SLOW_TRAIN)
    assert reference.wait(timeout=600) == 0, reference.stderr.read()

    out = tmp_path / "interrupted"
    process = compare_process(out, *SLOW_TRAIN)
    wait_for_fine_tuning(process)
    process.send_signal(signal.SIGINT)  # as a terminal's Ctrl-C reaches the parent
    _, rest = process.communicate(timeout=300)
    assert process.returncode == 130, rest
    assert "continue with --resume" in rest and "Traceback" not in rest
    for method in ("standard", "memdlm"):
        folder = out / "seed1" / method
        assert (folder / "checkpoint.pt").is_file() and not (folder / "model.pt").exists()

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    resumed = subprocess.run(
        [sys.executable, "-m", "recipes.memdlm", "compare", "--resume", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr
    expected = json.loads((tmp_path / "reference" / "summary.json").read_text())
    got = json.loads((out / "summary.json").read_text())
    assert per_seed(got) == per_seed(expected)


@pytest.mark.slow
def test_workers_stop_and_checkpoint_when_the_parent_is_killed(tmp_path):
    out = tmp_path / "killed"
    process = compare_process(out, *SLOW_TRAIN)
    wait_for_fine_tuning(process)
    workers = children_of(process.pid)
    assert workers
    process.kill()  # kill -9: the parent cannot forward anything
    process.wait(timeout=30)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(alive(pid) for pid in workers):
        time.sleep(0.2)
    left = [pid for pid in workers if alive(pid)]
    for pid in left:  # do not leave them to the next test, then fail
        os.kill(pid, signal.SIGKILL)
    assert not left
    folders = [out / "seed1" / m for m in ("standard", "memdlm")]
    assert any((folder / "checkpoint.pt").is_file() for folder in folders)
    # Stopped, not finished: a worker that ran on without its parent would write model.pt.
    assert not any((folder / "model.pt").exists() for folder in folders)


def test_variants_get_paired_verdicts_and_leave_the_pair_unchanged(two_ways, tmp_path):
    """`--variants`: the controls run on the same seeds, each with its own paired verdict
    against Standard; Standard and MemDLM give the results of a run without variants."""
    cfg = build_config(
        "smoke", overrides={"seeds": 2, "variants": ["leak_free", "standard_matched"]}
    )
    summary = run_compare(cfg, tmp_path / "run", workers=1, reporter=Reporter(quiet=True))
    _, alone = two_ways[1]
    assert per_seed(summary) == per_seed(alone)
    variants = summary["variants"]
    assert list(variants) == ["leak_free", "standard_matched"]
    assert variants["leak_free"]["method"] == "memdlm"
    assert variants["standard_matched"]["method"] == "standard"
    assert variants["standard_matched"]["anchors"] == 3  # K = 2 inner passes + the outer one
    for entry in variants.values():
        pair = entry["paired"]
        assert pair["seeds"] == [1, 2]
        standard = {r["seed"]: r["eval_loss"] for r in summary["standard"]["per_seed"]}
        own = {r["seed"]: r["eval_loss"] for r in entry["per_seed"]}
        assert pair["eval_loss_delta"]["per_seed"] == pytest.approx(
            [own[s] - standard[s] for s in (1, 2)]
        )
        assert len(pair["verdict"]) == 2
        assert own != standard  # a different run, not a copy of Standard's
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert {r["method"] for r in records if r["phase"] == "train"} == {
        "standard",
        "memdlm",
        "leak_free",
        "standard_matched",
    }
