"""Every sentence of README.md and docs/*.md that quotes the recorded default experiment, written
from the recorded files, so that the prose and the files cannot disagree.

A quoting passage sits between two marker comments, `<!-- results:NAME -->` and
`<!-- /results:NAME -->`; `BLOCKS[NAME](recorded)` writes what goes between them from
docs/results/cpu-tiny-default-{3,5}seeds/ (summary.json, the comparison's output, and
recorded.json, when and how long the recording ran: `commands.record`). `rewrite` puts them in
place; `tests/recipes/test_recorded_results.py` checks that the committed docs equal their
rewrite, and `python -m recipes.memdlm.commands.record` rewrites them after a re-run.

Numbers are rounded as the rest of the docs round them: losses to 3 decimals (4 in the tables),
accuracies to 0.1 point. A sign is claimed only where the 95% interval excludes zero
(`eval.stats.verdict`'s rule).
"""

from __future__ import annotations

import json
import re
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[3]
RESULTS = ROOT / "docs" / "results"
FOLDERS = {3: "cpu-tiny-default-3seeds", 5: "cpu-tiny-default-5seeds"}
QUOTING = ("README.md", "docs/memdlm.md")  # the files with results blocks
MARKER = re.compile(r"<!-- results:([\w-]+) -->\n(.*?)<!-- /results:\1 -->", re.S)
LENGTHS = ("128", "256", "384")
WIDTH = 100  # the docs' line length
FILL = {"break_long_words": False, "break_on_hyphens": False}


@dataclass(frozen=True)
class Recorded:
    """The recorded runs by seed count: summary.json, recorded.json and config.json of each."""

    summaries: dict[int, dict[str, Any]]
    records: dict[int, dict[str, Any]]
    configs: dict[int, dict[str, Any]]

    @classmethod
    def load(cls, results: Path = RESULTS) -> Recorded:
        def read(name: str) -> dict[int, dict[str, Any]]:
            return {n: json.loads((results / f / name).read_text()) for n, f in FOLDERS.items()}

        return cls(read("summary.json"), read("recorded.json"), read("config.json"))


def duration(seconds: float) -> str:
    """3 min 42 s."""
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"


def ci(delta: dict[str, Any], scale: float = 1.0, digits: int = 3) -> str:
    """A paired difference's 95% interval over seeds as "[+0.011, +0.043]"."""
    low, high = (scale * v for v in delta["ci95"])
    return f"[{low:+.{digits}f}, {high:+.{digits}f}]"


def interval(delta: dict[str, Any], scale: float = 1.0, digits: int = 3) -> str:
    """A paired difference as "+0.027 [+0.011, +0.043]" (mean, then its 95% interval)."""
    return f"{scale * delta['mean']:+.{digits}f} {ci(delta, scale, digits)}"


def verdict(delta: dict[str, Any], higher: str = "higher", lower: str = "lower") -> str:
    """MemDLM's side of Standard only where the 95% interval excludes zero."""
    low, high = delta["ci95"]
    if low > 0:
        return f"MemDLM is {higher}"
    if high < 0:
        return f"MemDLM is {lower}"
    return "no difference detectable"


def points(values: list[float]) -> str:
    """Per-seed accuracy differences in points: "0.0, -1.6 and 0.0"."""
    return listed([f"{100 * v:.1f}" for v in values])


def listed(items: list[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def pct(value: float) -> str:
    return f"{100 * value:.1f}"


def spread_range(values: list[float], scale: float = 100.0, digits: int = 0) -> str:
    """The smallest and largest of `values` as "15-32" (scaled, rounded)."""
    low, high = scale * min(values), scale * max(values)
    return f"{low:.{digits}f}-{high:.{digits}f}"


def adaptation_effect(summary: dict[str, Any]) -> str:
    """What adapting on the prompt does to MemDLM's needle accuracy over the context lengths:
    "lowers needle accuracy by 15-32 points" (or "changes ... by -3 to +5 points")."""
    mem = summary["memdlm"]
    changes = [100 * (mem["niah_accuracy_adapted"][k] - mem["niah_accuracy"][k]) for k in LENGTHS]
    if max(changes) < 0:
        return f"lowers needle accuracy by {-max(changes):.0f}-{-min(changes):.0f} points"
    return f"changes needle accuracy by {min(changes):+.0f} to {max(changes):+.0f} points"


def by_task(summary: dict[str, Any], who: str, task: str) -> list[float]:
    return [summary[who]["niah_accuracy_by_task"][task][k] for k in LENGTHS]


def moved(recorded: Recorded) -> str:
    """How far re-recording moved the 3-seed run: its per-seed eval losses and the paired
    difference, against the record it replaced (recorded.json "previous"); "" for a first one."""
    record, summary = recorded.records[3], recorded.summaries[3]
    previous = record.get("previous")
    if not previous:
        return ""
    shifts = [
        abs(new["eval_loss"] - old)
        for method in ("standard", "memdlm")
        for new, old in zip(summary[method]["per_seed"], previous["eval_loss"][method], strict=True)
    ]
    since = f" of {previous['date']}" if previous.get("date") else ""
    before, now = previous["eval_loss_delta"], summary["paired"]["eval_loss_delta"]
    flipped = f" (verdict: {verdict(before)}, now {verdict(now)})"
    return (
        f"Re-recording on {record['date']} moved the per-seed eval losses of the previous "
        f"record{since} by up to {max(shifts):.4f} nats and the 3-seed eval-loss difference "
        f"from {interval(before)} to {interval(now)}"
        f"{flipped if verdict(before) != verdict(now) else ''}."
    )


def load(record: dict[str, Any]) -> str:
    """The machine's 1-minute load average around a recorded run: "load average 3.2 at the
    start" (and "... and 11.0 at the end" where it was recorded)."""
    text = f"load average {record['load_average']:.1f} at the start"
    if "load_average_end" in record:
        text += f" and {record['load_average_end']:.1f} at the end"
    return text


def busy(*records: dict[str, Any]) -> str:
    """A remark when a run shared its machine, which then took longer than an idle one would:
    a load average above half the cores at the start (others' work: the run has not begun),
    or above the cores at the end (the run's own side-by-side workers account for up to one
    runnable process per core just before it ends)."""
    cpus = records[0]["cpus"]
    started = max(r.get("load_average", 0.0) for r in records)
    ended = max(r.get("load_average_end", 0.0) for r in records)
    if started > cpus / 2 or ended > cpus:
        return "; the machine was busy, so an idle one is faster"
    return ""


def readme_time(recorded: Recorded) -> str:
    record = recorded.records[3]
    return (
        f"How long it takes: the first command's comparison took "
        f"{duration(record['wall_seconds'])} on {record['date']}, on a {record['cpus']}-core "
        f"CPU machine ({load(record)}{busy(record)}). Installing added about one minute "
        "(measured 2026-12-02).\n"
    )


def readme_headline(recorded: Recorded) -> str:
    three, five = recorded.summaries[3], recorded.summaries[5]
    loss3, acc3 = three["paired"]["eval_loss_delta"], three["paired"]["niah_accuracy_delta"]
    loss5, acc5 = five["paired"]["eval_loss_delta"], five["paired"]["niah_accuracy_delta"]
    every = " It is higher in every seed." if all(d > 0 for d in loss5["per_seed"]) else ""
    single = by_task(five, "base", "single")
    multikey = by_task(five, "standard", "multikey") + by_task(five, "memdlm", "multikey")
    ratio = five["paired"]["step_time_ratio"]["mean"]
    return (
        "On the default `cpu-tiny` preset (a 0.7M-parameter byte-level model) over 5 paired seeds "
        "(`python -m recipes.memdlm compare --seeds 5`), MemDLM does not beat Standard. "
        "MemDLM Train-Only minus Standard, mean and 95% interval over seeds:\n\n"
        f"- Fast-weights-off eval loss: {interval(loss5)} nats: "
        f"{verdict(loss5, 'higher (worse)', 'lower (better)')}.{every}\n"
        f"- Needle accuracy at 128-384 bytes: {interval(acc5, 100, 1)} points: "
        f"{verdict(acc5)}.\n"
        f"- Adapting on the prompt at inference {adaptation_effect(five)}.\n"
        f"- A MemDLM step costs {ratio:.2f}x a standard step in that run.\n\n"
        "The README's first command runs seeds 1-3 of these and prints: eval loss "
        f"{interval(loss3)} nats ({verdict(loss3)}), needle accuracy {interval(acc3, 100, 1)} "
        f"points ({verdict(acc3)}). The smallest eval-loss difference 3 seeds would detect is "
        f"±{loss3['detectable']:.3f} nats, 5 seeds ±{loss5['detectable']:.3f}.\n\n"
        f"The shipped base retrieves `single` needles ({pct(single[0])}% at 128 bytes, "
        f"{pct(single[-1])}% at 384), so the needle columns are graded and fine-tuning has "
        f"something to teach. Both methods answer `multikey` needles at {spread_range(multikey)}% "
        "(one of the three values at random: 33%).\n"
    )


def table_rows(summary: dict[str, Any], *, chars: bool) -> list[str]:
    """Markdown rows: Standard, MemDLM Train-Only, MemDLM Train & Inference."""
    std, mem = summary["standard"], summary["memdlm"]
    rows = []
    for label, entry, loss, suffix, bias in (
        ("Standard MDLM", std, "eval_loss", "", "exposure_bias_final"),
        ("MemDLM Train-Only", mem, "eval_loss", "", "exposure_bias_final"),
        (
            "MemDLM Train & Inference",
            mem,
            "eval_loss_adapted",
            "_adapted",
            "exposure_bias_adapted_final",
        ),
    ):
        cell = f"{entry[loss]:.4f} ± {entry['spread'][loss]:.4f}"
        exact, char = entry[f"niah_accuracy{suffix}"], entry[f"niah_char_accuracy{suffix}"]
        if chars:
            niah = [f"{pct(exact[k])} ({pct(char[k])})" for k in LENGTHS]
            tail = f"{entry[bias]:.2f} ± {entry['spread'][bias]:.2f}"
            rows.append(f"| {label} | {cell} | {' | '.join(niah)} | {tail} |")
        else:
            rows.append(f"| {label} | {cell} | {' / '.join(pct(exact[k]) for k in LENGTHS)} |")
    return rows


def docs_time(recorded: Recorded) -> str:
    three, five = recorded.records[3], recorded.records[5]
    return (
        f"- Paired seeds run side by side on the {three['cpus']} cores. From start to table on "
        f"{three['date']}: {duration(three['wall_seconds'])} with 3 seeds ({load(three)}) and "
        f"{duration(five['wall_seconds'])} with 5 ({load(five)}){busy(three, five)}. The same "
        "machine's speed also varies from day to day by up to a fifth.\n"
    )


def docs_three(recorded: Recorded) -> str:
    three = recorded.summaries[3]
    base, mem = three["base"], three["memdlm"]
    loss, acc = three["paired"]["eval_loss_delta"], three["paired"]["niah_accuracy_delta"]
    single, multikey = by_task(three, "base", "single"), by_task(three, "base", "multikey")
    tuned = by_task(three, "standard", "multikey") + by_task(three, "memdlm", "multikey")
    lines = [
        f"During fine-tuning the same-batch gap is {mem['gap_final']:.3f} ± "
        f"{mem['spread']['gap_final']:.3f} nats.",
        "",
        "| method (3 seeds, mean ± sd) | eval loss | NIAH 128 | NIAH 256 | NIAH 384 | R_EB end |",
        "|---|---|---|---|---|---|",
        f"| pretrained base (no fine-tuning) | {base['eval_loss']:.3f} | "
        + " | ".join(pct(base["niah_accuracy"][k]) for k in LENGTHS)
        + " | |",
        *table_rows(three, chars=True),
        "",
        "NIAH is exact match in %, with per-character % in brackets.",
        "",
        f"The base answers `single` needles at {listed([pct(v) for v in single])}% across the "
        f"three lengths, and `multikey` at {listed([pct(v) for v in multikey])}%. Fine-tuning "
        f"lifts `single` at 384 bytes to {pct(by_task(three, 'standard', 'single')[-1])}% "
        f"(Standard) and {pct(by_task(three, 'memdlm', 'single')[-1])}% (MemDLM). `multikey` "
        f"stays at {spread_range(tuned)}% for both, against the 33% of picking one of the three "
        "values at random.",
        "",
        "Paired, MemDLM Train-Only minus Standard:",
        "",
        *paired_lines(three),
        "",
        "Verdict: on the fast-weights-off eval loss, "
        f"{verdict(loss, 'higher (worse) than Standard', 'lower (better) than Standard')}. "
        f"On needle accuracy, {verdict(acc)}. A MemDLM step costs "
        f"{three['paired']['step_time_ratio']['mean']:.2f}x a standard step in this run.",
        "",
        f"Adapting on the prompt at inference (Train & Inference) {adaptation_effect(three)} "
        f"and changes the eval loss by {mem['eval_loss_adapted'] - mem['eval_loss']:+.2f} nats, "
        f"at the training-time inner lr of {recorded.configs[3]['memdlm']['inner_lr']:g}.",
    ]
    if note := moved(recorded):
        lines += ["", note]
    return "\n".join(lines) + "\n"


def paired_lines(summary: dict[str, Any]) -> list[str]:
    """The two bullets of paired differences: per seed, mean, 95% interval, detectable."""
    loss, acc = summary["paired"]["eval_loss_delta"], summary["paired"]["niah_accuracy_delta"]
    seeds = listed([f"{d:+.3f}" for d in loss["per_seed"]])
    return [
        f"- Eval loss: {seeds} nats; mean {loss['mean']:+.3f}, 95% CI {ci(loss)}; smallest "
        f"detectable ±{loss['detectable']:.3f}.",
        f"- NIAH exact: {points(acc['per_seed'])} points; mean {100 * acc['mean']:+.1f}, 95% CI "
        f"{ci(acc, 100, 1)}; smallest detectable ±{100 * acc['detectable']:.1f} points.",
    ]


def docs_five(recorded: Recorded) -> str:
    five = recorded.summaries[5]
    loss, acc = five["paired"]["eval_loss_delta"], five["paired"]["niah_accuracy_delta"]
    worse = [d for d in loss["per_seed"] if d > 0]
    n = len(loss["per_seed"])
    where = f"in all {n} seeds" if len(worse) == n else f"in {len(worse)} of {n} seeds"
    by = f", by {min(worse):.3f}-{max(worse):.3f} nats" if worse else ""
    std, mem = five["standard"]["niah_accuracy"], five["memdlm"]["niah_accuracy"]
    lines = [
        "**Five seeds** (`python -m recipes.memdlm compare --seeds 5`, seeds 1-3 as above; "
        "[results/cpu-tiny-default-5seeds/](results/cpu-tiny-default-5seeds/)):",
        "",
        "| method (5 seeds) | eval loss | NIAH exact, 128/256/384 (%) |",
        "|---|---|---|",
        *table_rows(five, chars=False),
        "",
        "Paired, Train-Only minus Standard:",
        "",
        *paired_lines(five),
        "",
        f"Verdict: eval loss, {verdict(loss, 'higher (worse)', 'lower (better)')}; needle "
        f"accuracy, {verdict(acc)}. MemDLM's fast-weights-off eval loss is higher than "
        f"Standard's {where}{by}. At 384 bytes Train-Only is "
        f"{100 * (mem['384'] - std['384']):+.1f} points from Standard over 5 seeds, a per-length "
        "difference this run does not test.",
    ]
    return "\n".join(lines) + "\n"


def wrap(markdown: str, width: int = WIDTH) -> str:
    """Paragraphs and bullets filled to `width` columns as the hand-written docs are; table rows
    kept whole."""
    lines = []
    for line in markdown.splitlines():
        if not line or line.startswith("|"):
            lines.append(line)
            continue
        # a code span or a duration stays on one line: its spaces are not break points
        kept = re.sub(r"`[^`]*`|\d+ min \d+ s", lambda m: m.group(0).replace(" ", "\0"), line)
        indent = "  " if line.startswith("- ") else ""
        filled = textwrap.wrap(kept, width, subsequent_indent=indent, **FILL)
        lines += [part.replace("\0", " ") for part in filled]
    return "\n".join(lines) + "\n"


BLOCKS: dict[str, Callable[[Recorded], str]] = {
    "readme-time": readme_time,
    "readme-headline": readme_headline,
    "default-time": docs_time,
    "default-3seeds": docs_three,
    "default-5seeds": docs_five,
}


def rewrite(text: str, recorded: Recorded, *, where: str = "text") -> str:
    """`text` with every results block rewritten from `recorded`. A block whose name is not in
    BLOCKS is an error, as is an opening marker without its closing one."""
    opened = re.findall(r"<!-- results:([\w-]+) -->", text)
    found = [m.group(1) for m in MARKER.finditer(text)]
    if opened != found:
        raise ValueError(f"{where}: results block(s) without a closing marker: {opened}")
    unknown = [name for name in found if name not in BLOCKS]
    if unknown:
        raise ValueError(f"{where}: unknown results block(s) {unknown}; known: {sorted(BLOCKS)}")

    def fill(match: re.Match) -> str:
        name = match.group(1)
        return f"<!-- results:{name} -->\n{wrap(BLOCKS[name](recorded))}<!-- /results:{name} -->"

    return MARKER.sub(fill, text)


def rewrite_docs(root: Path = ROOT, recorded: Recorded | None = None) -> list[Path]:
    """Rewrite the results blocks of README.md and docs/memdlm.md in place; the changed files."""
    recorded = recorded or Recorded.load(root / "docs" / "results")
    changed = []
    for name in QUOTING:
        path = root / name
        text = path.read_text()
        new = rewrite(text, recorded, where=name)
        if new != text:
            path.write_text(new)
            changed.append(path)
    return changed
