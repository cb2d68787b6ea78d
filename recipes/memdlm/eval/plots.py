"""The comparison's and a `train` run's PNG plots: training curves, the inner loop (same-batch
gap, inner gradient norms), needle accuracy per context length and the exposure-bias curve.

They read the summary (`eval.report`'s schema: a comparison's means, or a `train` run's own
per-seed record) and the run's metrics.jsonl records; `commands.runs.write_outputs` calls them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_all(summary: dict[str, Any], metrics: list[dict[str, Any]], folder: Path) -> list[Path]:
    """PNG plots: training curves, gap and inner gradient norms, NIAH accuracy, R_EB curve, for
    a comparison's summary or a `train` run's (one method); a plot with no data is left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name: str) -> None:
        path = folder / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    train = [r for r in metrics if r.get("phase") == "train"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for (method, seed), rows in _group(train).items():
        steps = [r["step"] for r in rows]
        ax.plot(steps, _smooth([r["loss"] for r in rows]), label=f"{method} seed {seed}")
        if method == "memdlm" and any("loss_off" in r for r in rows):
            off = [r for r in rows if "loss_off" in r]
            ax.plot(
                [r["step"] for r in off],
                _smooth([r["loss_off"] for r in off]),
                linestyle="--",
                label=f"memdlm fast weights off, seed {seed}",
            )
    ax.set(xlabel="step", ylabel="training loss (smoothed)", title="Fine-tuning loss")
    ax.legend(fontsize=7)
    save(fig, "training_loss.png")

    mem_rows = [r for r in train if r.get("method") == "memdlm"]
    if mem_rows:
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        for (_, seed), rows in _group(mem_rows).items():
            gap = [r for r in rows if "gap" in r]
            left.plot(
                [r["step"] for r in gap], _smooth([r["gap"] for r in gap]), label=f"seed {seed}"
            )
            for k in (1, 2):
                key = f"inner_grad_norm_{k}"
                right.plot(
                    [r["step"] for r in rows if key in r],
                    [r[key] for r in rows if key in r],
                    label=f"step {k}, seed {seed}",
                )
        left.set(xlabel="step", ylabel="nats", title="Same-batch gap (off - adapted)")
        right.set(xlabel="step", ylabel="norm", yscale="log", title="Inner gradient norm")
        left.legend(fontsize=7)
        right.legend(fontsize=7)
        save(fig, "inner_loop.png")

    std, mem = summary.get("standard", {}), summary.get("memdlm", {})  # `train`: one of them
    accuracy = [
        (label, acc)
        for label, acc in [
            ("Standard", std.get("niah_accuracy")),
            ("MemDLM Train-Only", mem.get("niah_accuracy")),
            ("MemDLM Train & Inf.", mem.get("niah_accuracy_adapted")),
        ]
        if acc
    ]
    if accuracy:
        lengths = list(accuracy[0][1])
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [int(k) for k in lengths]
        for label, acc in accuracy:
            ax.plot(xs, [100 * acc[k] for k in lengths], marker="o", label=label)
        ax.set(xlabel="context length (bytes)", ylabel="accuracy (%)", title="Needle retrieval")
        ax.legend(fontsize=8)
        save(fig, "niah_accuracy.png")

    curves = [
        (label, curve)
        for label, curve in [
            # a comparison's mean curves, or a `train` run's own (its per-seed record)
            ("Standard", std.get("exposure_bias_curve", std.get("exposure_bias"))),
            ("MemDLM Train-Only", mem.get("exposure_bias_curve", mem.get("exposure_bias"))),
            (
                "MemDLM Train & Inf.",
                mem.get("exposure_bias_adapted_curve", mem.get("exposure_bias_adapted")),
            ),
        ]
        if curve
    ]
    if curves:
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, curve in curves:
            ax.plot(range(1, len(curve) + 1), curve, label=label)
        ax.set(xlabel="denoising step", ylabel="L_seq / L_static", title="Exposure-bias ratio")
        ax.legend(fontsize=8)
        save(fig, "exposure_bias.png")
    return written


def _group(rows: list[dict[str, Any]]) -> dict[tuple[str, int], list[dict[str, Any]]]:
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r.get("method"), r.get("seed")), []).append(r)
    return groups


def _smooth(values: list[float], window: int = 20) -> list[float]:
    out, total, queue = [], 0.0, []
    for v in values:
        queue.append(v)
        total += v
        if len(queue) > window:
            total -= queue.pop(0)
        out.append(total / len(queue))
    return out
