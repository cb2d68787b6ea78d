"""Recorded results that stay true (docs/results/cpu-tiny-default-{3,5}seeds).

- The README and docs/memdlm.md say what the recorded files say: every results block equals its
  rewrite from the files (`commands.quotes`), and the headline's numbers, formatted here
  independently, are in the README.
- The recorded runs are of today's default configuration, and today's code gives their numbers:
  seed 1 of both methods, re-run, equals the recorded per-seed records of the 3-seed summary
  exactly (everything but the step times). A change that moves them must re-record them
  (`python -m recipes.memdlm.commands.record`) in the same commit.
"""

from __future__ import annotations

import json
import pathlib

import pytest

from recipes.memdlm.commands import quotes, record

ROOT = pathlib.Path(__file__).resolve().parents[2]
RESULTS = ROOT / "docs" / "results"


def _summary(seeds: int) -> dict:
    return json.loads((RESULTS / quotes.FOLDERS[seeds] / "summary.json").read_text())


def test_the_docs_say_what_the_recorded_files_say():
    recorded = quotes.Recorded.load(RESULTS)
    used = set()
    for name in quotes.QUOTING:
        text = (ROOT / name).read_text()
        assert quotes.rewrite(text, recorded, where=name) == text, (
            f"{name} disagrees with docs/results: run "
            "`python -m recipes.memdlm.commands.record --docs-only`"
        )
        used |= {m.group(1) for m in quotes.MARKER.finditer(text)}
    assert used == set(quotes.BLOCKS)  # every block is quoted somewhere


def _ci(delta: dict, scale: float, digits: int) -> str:
    low, high = (scale * v for v in delta["ci95"])
    return f"[{low:+.{digits}f}, {high:+.{digits}f}]"


def test_the_readme_headline_is_the_5_seed_run_and_its_first_command_the_3_seed_one():
    """Formatted here, not by `quotes`: the README's numbers are those of the summaries."""
    flat = " ".join((ROOT / "README.md").read_text().split())
    findings = flat.split("## What the comparison finds", 1)[1].split(" ## ", 1)[0]
    three, five = _summary(3)["paired"], _summary(5)["paired"]
    for pair in (three, five):
        loss, acc = pair["eval_loss_delta"], pair["niah_accuracy_delta"]
        assert f"{loss['mean']:+.3f} {_ci(loss, 1, 3)} nats" in findings
        assert f"{100 * acc['mean']:+.1f} {_ci(acc, 100, 1)} points" in findings
    assert findings.index(f"{five['eval_loss_delta']['mean']:+.3f}") < findings.index(
        "The README's first command runs seeds 1-3"
    )
    assert f"costs {five['step_time_ratio']['mean']:.2f}x a standard step in that run" in flat
    assert "at 3 seeds the verdict flips with rounding" in findings
    if all(d > 0 for d in five["eval_loss_delta"]["per_seed"]):
        assert "higher in every seed" in findings
    seconds = json.loads((RESULTS / quotes.FOLDERS[3] / "recorded.json").read_text())
    assert quotes.duration(seconds["wall_seconds"]) in flat.split("## What the comparison")[0]


def test_rewrite_fills_named_blocks_and_refuses_broken_ones():
    recorded = quotes.Recorded.load(RESULTS)
    text = "a\n<!-- results:readme-time -->\nstale\n<!-- /results:readme-time -->\nb\n"
    once = quotes.rewrite(text, recorded)
    assert once.startswith("a\n<!-- results:readme-time -->\nHow long it takes:")
    assert once.endswith("<!-- /results:readme-time -->\nb\n") and "stale" not in once
    assert quotes.rewrite(once, recorded) == once
    with pytest.raises(ValueError, match="unknown results block"):
        quotes.rewrite("<!-- results:nope -->\n<!-- /results:nope -->", recorded)
    with pytest.raises(ValueError, match="without a closing marker"):
        quotes.rewrite("<!-- results:readme-time -->\n", recorded)


def test_verdicts_claim_a_sign_only_where_the_interval_excludes_zero():
    assert quotes.verdict({"ci95": [0.01, 0.04]}) == "MemDLM is higher"
    assert quotes.verdict({"ci95": [-0.04, -0.01]}) == "MemDLM is lower"
    assert quotes.verdict({"ci95": [-0.01, 0.05]}) == "no difference detectable"
    assert quotes.interval({"mean": 0.0272, "ci95": [0.0114, 0.0431]}) == "+0.027 [+0.011, +0.043]"
    assert quotes.duration(222.4) == "3 min 42 s" and quotes.duration(59.6) == "1 min 0 s"
    idle = {"load_average": 0.2, "load_average_end": 0.9, "cpus": 2}
    assert quotes.load(idle) == "load average 0.2 at the start and 0.9 at the end"
    assert quotes.busy(idle) == "" and quotes.busy({**idle, "load_average_end": 1.9}) == ""
    assert "busy" in quotes.busy({**idle, "load_average": 1.1})  # others' work before the run
    assert "busy" in quotes.busy({**idle, "load_average_end": 2.1})  # more than its 2 workers'
    assert "busy" in quotes.busy(idle, {**idle, "load_average": 1.5})  # either of two runs


def test_record_keeps_the_run_and_what_it_replaces(tmp_path):
    """`record.keep`: the run's files replace the recorded folder's, and recorded.json keeps the
    replaced record's per-seed eval losses and paired difference for the docs."""
    folder, out = tmp_path / "recorded", tmp_path / "run"
    (out / "plots").mkdir(parents=True)
    old = _summary(3)
    folder.mkdir()
    (folder / "summary.json").write_text(json.dumps(old))
    (folder / "recorded.json").write_text(json.dumps({"date": "2026-12-05"}))
    (folder / "stale.png").write_bytes(b"x")
    (out / "summary.json").write_text("{}")
    (out / "config.json").write_text('{"seeds": 3}')
    (out / "plots" / "niah_accuracy.png").write_bytes(b"png")
    record.keep(out, folder, "table\n", {"date": "2026-12-07"})
    kept = json.loads((folder / "recorded.json").read_text())
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json",
        "niah_accuracy.png",
        "recorded.json",
        "summary.json",
        "table.txt",
    ]
    assert kept["date"] == "2026-12-07" and kept["previous"]["date"] == "2026-12-05"
    assert kept["previous"]["eval_loss"]["memdlm"] == [
        r["eval_loss"] for r in old["memdlm"]["per_seed"]
    ]
    assert kept["previous"]["eval_loss_delta"] == old["paired"]["eval_loss_delta"]
    assert record.command(3) == ["python", "-m", "recipes.memdlm", "--seeds", "3"]


def _default_config():
    from recipes.memdlm.config import build_config

    return build_config("cpu-tiny")


def test_the_recorded_runs_are_of_the_default_configuration():
    """config.json of both recorded runs is today's `cpu-tiny` preset (with its seed count):
    a preset change must re-record."""
    for seeds, folder in quotes.FOLDERS.items():
        expected = json.loads(json.dumps(_default_config().model_dump()))
        expected["seeds"] = seeds
        assert json.loads((RESULTS / folder / "config.json").read_text()) == expected, folder


@pytest.mark.slow
def test_seed_1_of_both_methods_gives_the_recorded_numbers(tmp_path):
    """Standard and MemDLM fine-tuned on seed 1 from the shipped base, as `compare` runs them
    (spawned one-thread workers), give the per-seed records of the recorded 3-seed summary bit
    for bit: eval losses, needle accuracies per length and task, exposure-bias curves, samples,
    training losses, gap and inner gradient norm. Only the step times may differ."""
    from recipes.memdlm.commands.bases import shipped_base
    from recipes.memdlm.commands.compare import fine_tune_and_evaluate
    from recipes.memdlm.loop.progress import Reporter
    from recipes.memdlm.loop.workers import Job, run_jobs

    cfg = _default_config()
    base_file = shipped_base(cfg)
    assert base_file is not None, "the default configuration has no shipped base"
    common = {"cfg": cfg, "out": tmp_path, "base_file": base_file, "device": "cpu", "seed": 1}
    jobs = [
        Job(f"seed1/{method}", fine_tune_and_evaluate, {**common, "method": method})
        for method in ("standard", "memdlm")
    ]
    recorded = _summary(3)
    for job, result in run_jobs(jobs, workers=2, reporter=Reporter(quiet=True)):
        method = job.kwargs["method"]
        expected = next(r for r in recorded[method]["per_seed"] if r["seed"] == 1)
        got = json.loads(json.dumps(result))  # as summary.json holds it
        timed = "seconds_per_step"  # the one value that depends on the machine's speed
        expected = {k: v for k, v in expected.items() if k != timed}
        assert {k: v for k, v in got.items() if k != timed} == expected, (
            f"{method} seed 1 no longer gives the recorded numbers: if the change is meant, "
            "re-record with `python -m recipes.memdlm.commands.record` in the same commit"
        )


def test_the_docs_say_how_far_a_re_record_moved_the_3_seed_run():
    """`quotes.moved`: the largest per-seed eval-loss shift against the replaced record, and
    the verdict change when there is one."""
    summary = _summary(3)
    shift = {"standard": [0.0, 0.0, 0.0], "memdlm": [0.0, -0.0125, 0.002]}
    before = {"mean": 0.021, "ci95": [-0.010, 0.052]}
    previous = {
        "date": "2026-12-05",
        "eval_loss": {
            m: [r["eval_loss"] + d for r, d in zip(summary[m]["per_seed"], shift[m], strict=True)]
            for m in shift
        },
        "eval_loss_delta": before,
    }
    recorded = quotes.Recorded({3: summary}, {3: {"date": "2026-12-07", "previous": previous}}, {})
    note = quotes.moved(recorded)
    assert note.startswith("Re-recording on 2026-12-07 moved the per-seed eval losses of the")
    assert "record of 2026-12-05 by up to 0.0125 nats" in note
    assert (
        f"from +0.021 [-0.010, +0.052] to {quotes.interval(summary['paired']['eval_loss_delta'])}"
        in note
    )
    now = quotes.verdict(summary["paired"]["eval_loss_delta"])
    assert ("verdict: no difference detectable, now" in note) == (now != "no difference detectable")
    assert quotes.moved(quotes.Recorded({3: summary}, {3: {"date": "x"}}, {})) == ""
