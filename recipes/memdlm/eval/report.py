"""The comparison's outputs: summary.json and the printed table (the plots: `eval.plots`).

summary.json schema ("memdlm-compare/1"); every number is a mean over seeds, `spread` holds the
sample standard deviations and `per_seed` the raw values:

    {"schema", "preset", "seeds", "device", "versions",
     "base": {"eval_loss", "niah_accuracy", "niah_accuracy_by_task", "seconds_per_step"} | null,
     "standard": {"train_loss_final", "eval_loss", "seconds_per_step",
                  "niah_accuracy": {context_len: acc}, "niah_accuracy_by_task",
                  "exposure_bias_final", "spread", "per_seed"},
     "memdlm": {... as standard, plus "eval_loss_answer_adapted", "eval_loss_adapted",
                "niah_accuracy_adapted", "exposure_bias_adapted_final", "train_loss_off_final",
                "gap_final", "inner_grad_norm_final"},
     "paired": {"seeds", "eval_loss_delta", "niah_accuracy_delta", "niah_char_accuracy_delta",
                "step_time_ratio", "verdict", "dropped_seeds"}}

A seed whose value is not finite (a diverged run) is left out of that value's mean and spread,
never silently: each method's `dropped_seeds` and the paired one name them per value
({"eval_loss": [seed, ...]}; empty when none), the comparison table's caption counts and names
them, and a verdict computed without some seeds says which.

Each `*_delta` is MemDLM Train-Only minus Standard on the same seed: {"per_seed", "mean", "sd",
"ci95": [low, high] | null, "detectable"} (`eval.stats.paired_interval`: Student's t over seeds,
and the smallest difference this run would have detected with 80% power); `verdict` holds the
printed sentences, which claim a sign only where the 95% interval excludes zero.

`eval_loss` is always the fast-weights-off loss (Standard; MemDLM "Train-Only"); the `*_adapted`
entries are after prompt-only adaptation ("Train & Inference"); `eval_loss_answer_adapted` is after
the training-time inner loop on the answer itself (what the paper plots; it flatters MemDLM).
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from rich.console import Console
from rich.table import Table

from recipes.memdlm.eval.stats import paired_interval, verdict


def _mean(values: list[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(finite) if finite else math.nan


def _sd(values: list[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.stdev(finite) if len(finite) > 1 else 0.0


def _finite(value) -> bool:
    return value is not None and math.isfinite(value)


def _non_finite_seeds(seeds: list[int], values: list[float]) -> list[int]:
    """The seeds whose value is left out of a mean (None, NaN or infinite)."""
    return [seed for seed, value in zip(seeds, values, strict=True) if not _finite(value)]


def _keyed_mean(dicts: list[dict]) -> dict[str, float]:
    keys = sorted({k for d in dicts for k in d}, key=lambda k: (len(str(k)), str(k)))
    return {str(k): _mean([d.get(k, math.nan) for d in dicts]) for k in keys}


def _overall(accuracy: dict) -> float:
    return _mean(list(accuracy.values()))


def per_seed_record(seed: int, result, evaluation: dict[str, Any]) -> dict[str, Any]:
    """Flatten one run's training result and evaluation into the per-seed record."""
    record = {
        "seed": seed,
        "train_loss_final": result.train_loss_final,
        "seconds_per_step": result.seconds_per_step,
        "skipped_steps": result.skipped_steps,
        "skipped_inner_nonfinite": result.inner_nonfinite_steps,
        "eval_loss": evaluation["eval_loss"],
        "niah_accuracy": {str(k): v for k, v in evaluation["niah"]["by_length"].items()},
        "niah_char_accuracy": {str(k): v for k, v in evaluation["niah"]["chars_by_length"].items()},
        "niah_accuracy_by_task": {
            task: {str(k): v for k, v in accs.items()}
            for task, accs in evaluation["niah"]["by_task"].items()
        },
        "exposure_bias": evaluation["exposure_bias"],
        "samples": evaluation["niah"]["samples"][:8],
    }
    if "eval_loss_answer_adapted" in evaluation:
        record.update(
            eval_loss_answer_adapted=evaluation["eval_loss_answer_adapted"],
            eval_loss_adapted=evaluation["eval_loss_adapted"],
            niah_accuracy_adapted={
                str(k): v for k, v in evaluation["niah_adapted"]["by_length"].items()
            },
            niah_char_accuracy_adapted={
                str(k): v for k, v in evaluation["niah_adapted"]["chars_by_length"].items()
            },
            exposure_bias_adapted=evaluation["exposure_bias_adapted"],
            train_loss_off_final=result.extra.get("loss_off", math.nan),
            gap_final=result.extra.get("gap", math.nan),
            inner_grad_norm_final=result.extra.get("inner_grad_norm_final", math.nan),
        )
    return record


SCALARS = (
    "train_loss_final",
    "eval_loss",
    "seconds_per_step",
    "eval_loss_answer_adapted",
    "eval_loss_adapted",
    "train_loss_off_final",
    "gap_final",
    "inner_grad_norm_final",
)


def method_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    spread: dict[str, Any] = {}
    seeds = [r["seed"] for r in records]
    dropped: dict[str, list[int]] = {}

    def note(key: str, values: list[float]) -> None:
        left_out = _non_finite_seeds(seeds, values)
        if left_out:
            dropped[key] = left_out

    for key in SCALARS:
        if key in records[0]:
            values = [r[key] for r in records]
            summary[key], spread[key] = _mean(values), _sd(values)
            note(key, values)
    for key in (
        "niah_accuracy",
        "niah_accuracy_adapted",
        "niah_char_accuracy",
        "niah_char_accuracy_adapted",
    ):
        if key in records[0]:
            summary[key] = _keyed_mean([r[key] for r in records])
            overall = [_overall(r[key]) for r in records]
            spread[key] = _sd(overall)
            note(key, overall)
    tasks = sorted({t for r in records for t in r["niah_accuracy_by_task"]})
    summary["niah_accuracy_by_task"] = {
        t: _keyed_mean([r["niah_accuracy_by_task"].get(t, {}) for r in records]) for t in tasks
    }
    for key in ("exposure_bias", "exposure_bias_adapted"):
        if key in records[0]:
            finals = [r[key][-1] for r in records if r[key]]
            summary[f"{key}_final"], spread[f"{key}_final"] = _mean(finals), _sd(finals)
            note(f"{key}_final", [r[key][-1] if r[key] else math.nan for r in records])
            summary[f"{key}_curve"] = [_mean(list(v)) for v in zip(*[r[key] for r in records])]
    summary["spread"] = spread
    summary["dropped_seeds"] = dropped
    summary["per_seed"] = records
    return summary


def paired(
    standard: list[dict],
    memdlm: list[dict],
    *,
    label: str = "MemDLM",
    loss_name: str = "fast-weights-off eval loss (nats)",
) -> dict[str, Any]:
    """MemDLM (or the run `label`, e.g. a compare variant) minus Standard on the same seed
    (same data order and anchor masks)."""
    by_seed = {r["seed"]: r for r in standard}
    pairs = [(by_seed[m["seed"]], m) for m in memdlm if m["seed"] in by_seed]
    if not pairs:
        return {}
    loss = [m["eval_loss"] - s["eval_loss"] for s, m in pairs]
    acc = [_overall(m["niah_accuracy"]) - _overall(s["niah_accuracy"]) for s, m in pairs]
    chars = [
        _overall(m["niah_char_accuracy"]) - _overall(s["niah_char_accuracy"]) for s, m in pairs
    ]
    time_ratio = [m["seconds_per_step"] / s["seconds_per_step"] for s, m in pairs]
    loss_interval, acc_interval = paired_interval(loss), paired_interval(acc)
    seeds = [s["seed"] for s, _ in pairs]
    dropped = {
        key: left_out
        for key, values in (
            ("eval_loss_delta", loss),
            ("niah_accuracy_delta", acc),
            ("niah_char_accuracy_delta", chars),
            ("step_time_ratio", time_ratio),
        )
        if (left_out := _non_finite_seeds(seeds, values))
    }

    def said(sentence: str, key: str) -> str:
        if key not in dropped:
            return sentence
        return f"{sentence} Left out: seed(s) {dropped[key]} (non-finite difference)."

    return {
        "seeds": seeds,
        "eval_loss_delta": _delta(loss, loss_interval),
        "niah_accuracy_delta": _delta(acc, acc_interval),
        "niah_char_accuracy_delta": _delta(chars, paired_interval(chars)),
        "step_time_ratio": {"per_seed": time_ratio, "mean": _mean(time_ratio)},
        "verdict": [
            said(verdict(loss_name, loss_interval, label=label), "eval_loss_delta"),
            said(
                verdict(
                    "NIAH exact-match accuracy", acc_interval, unit=" pt", scale=100, label=label
                ),
                "niah_accuracy_delta",
            ),
        ],
        "dropped_seeds": dropped,
    }


def _delta(differences: list[float], interval: dict[str, Any]) -> dict[str, Any]:
    """Paired differences with their mean, sd, 95% interval and smallest detectable difference
    (`interval`: their `paired_interval`)."""
    low, high = interval["low"], interval["high"]
    return {
        "per_seed": differences,
        "mean": _mean(differences),
        "sd": _sd(differences),
        "ci95": None if low is None else [low, high],
        "detectable": interval["detectable"],
    }


def _fmt(mean: float, sd: float | None, n: int, digits: int = 4) -> str:
    if mean is None or not math.isfinite(mean):
        return "-"
    text = f"{mean:.{digits}f}"
    return f"{text} ± {sd:.{digits}f}" if n > 1 and sd is not None else text


def comparison_table(summary: dict[str, Any]) -> Table:
    """Rows like the paper's Table 1: Standard, MemDLM Train-Only, MemDLM Train & Inference.

    NIAH cells: exact-match accuracy % (per-character accuracy % in brackets).
    """
    std, mem = summary["standard"], summary["memdlm"]
    n = len(summary["seeds"])
    lengths = list(std["niah_accuracy"])
    table = Table(title=f"MemDLM vs Standard ({n} seed{'s' * (n > 1)}, mean ± sd over seeds)")
    columns = ["method", "eval loss", *[f"NIAH {k} exact (char)" for k in lengths], "R_EB end"]
    for column in columns:
        table.add_column(column, justify="right" if column != "method" else "left")

    def cells(exact: dict[str, float], chars: dict[str, float]) -> list[str]:
        return [
            f"{100 * exact.get(k, math.nan):.1f} ({100 * chars.get(k, math.nan):.1f})"
            for k in lengths
        ]

    rows = [
        ("Standard MDLM", std, "eval_loss", "", "exposure_bias_final"),
        ("MemDLM Train-Only", mem, "eval_loss", "", "exposure_bias_final"),
        (
            "MemDLM Train & Inf.",
            mem,
            "eval_loss_adapted",
            "_adapted",
            "exposure_bias_adapted_final",
        ),
    ]
    caption = dropped_caption({"Standard": std, "MemDLM": mem})
    if caption:
        table.caption = caption
    for label, entry, loss_key, suffix, bias_key in rows:
        table.add_row(
            label,
            _fmt(entry.get(loss_key), entry["spread"].get(loss_key), n),
            *cells(
                entry.get(f"niah_accuracy{suffix}", {}),
                entry.get(f"niah_char_accuracy{suffix}", {}),
            ),
            _fmt(entry.get(bias_key), entry["spread"].get(bias_key), n, 2),
        )
    return table


def dropped_caption(entries: dict[str, dict[str, Any]]) -> str:
    """The comparison table's caption from each entry's `dropped_seeds`, e.g. "Non-finite
    values left out of the means (1 of them): MemDLM eval_loss seed [2]"; "" when none."""
    parts = [
        f"{label} {key} seed{'s' * (len(seeds) > 1)} {seeds}"
        for label, entry in entries.items()
        for key, seeds in (entry.get("dropped_seeds") or {}).items()
    ]
    count = sum(
        len(seeds) for e in entries.values() for seeds in (e.get("dropped_seeds") or {}).values()
    )
    if not parts:
        return ""
    return f"Non-finite values left out of the means ({count} of them): " + "; ".join(parts)


def training_table(summary: dict[str, Any]) -> Table:
    std, mem = summary["standard"], summary["memdlm"]
    n = len(summary["seeds"])
    table = Table(title="Training (last 10% of steps) and cost")
    for column in [
        "method",
        "train loss",
        "fast-weights-off loss",
        "same-batch gap",
        "inner grad norm",
        "s/step",
    ]:
        table.add_column(column, justify="right" if column != "method" else "left")
    table.add_row(
        "Standard MDLM",
        _fmt(std["train_loss_final"], std["spread"]["train_loss_final"], n),
        "-",
        "-",
        "-",
        f"{std['seconds_per_step']:.3f}",
    )
    ratio = mem["seconds_per_step"] / std["seconds_per_step"]
    table.add_row(
        "MemDLM (post-adaptation)",
        _fmt(mem["train_loss_final"], mem["spread"]["train_loss_final"], n),
        _fmt(mem.get("train_loss_off_final"), mem["spread"].get("train_loss_off_final"), n),
        _fmt(mem.get("gap_final"), mem["spread"].get("gap_final"), n),
        _fmt(mem.get("inner_grad_norm_final"), None, 1),
        f"{mem['seconds_per_step']:.3f} ({ratio:.2f}x)",
    )
    return table


def print_report(summary: dict[str, Any], console: Console) -> None:
    console.print(comparison_table(summary))
    console.print(training_table(summary))
    pair = summary.get("paired") or {}
    if pair:
        d_loss, d_acc = pair["eval_loss_delta"], pair["niah_accuracy_delta"]
        d_char = pair["niah_char_accuracy_delta"]
        console.print(
            f"Paired MemDLM Train-Only - Standard over seeds {pair['seeds']}: eval loss "
            f"{d_loss['mean']:+.4f} (sd {d_loss['sd']:.4f}), NIAH exact "
            f"{100 * d_acc['mean']:+.1f} pt (sd {100 * d_acc['sd']:.1f}), per-character "
            f"{100 * d_char['mean']:+.1f} pt (sd {100 * d_char['sd']:.1f}); a MemDLM step costs "
            f"{pair['step_time_ratio']['mean']:.2f}x a standard step."
        )
        for sentence in pair.get("verdict", []):
            console.print(f"Verdict, {sentence}", markup=False, highlight=False)
    mem = summary["memdlm"]
    if "eval_loss_answer_adapted" in mem:
        console.print(
            f"MemDLM eval loss after adapting on the answer itself (what the paper plots; it "
            f"flatters MemDLM): {mem['eval_loss_answer_adapted']:.4f}."
        )
