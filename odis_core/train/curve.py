"""A run's learning curve: its k-NN evaluations and loss terms, read back from metrics.jsonl
and drawn to RUN_DIR/curve.png.

metrics.jsonl holds two kinds of rows: one per optimizer step ({"step", "loss", "loss_obj",
"loss_mim", ...}) and one per evaluation of the k-NN monitor ({"step", "knn_top1",
"knn_top5", "effective_rank", "eval_seconds"}); the file is cut back to the checkpoint's
step on resume, so the curve read here is the resumed run's whole, continuous curve.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from odis_core.atomic import atomic_write

CURVE_NAME = "curve.png"
LOSS_TERMS = ("loss", "loss_obj", "loss_mim")


def read_rows(metrics_path: Path) -> list[dict[str, Any]]:
    """Every whole JSON row of metrics.jsonl (a line cut by a kill is left out)."""
    if not metrics_path.is_file():
        return []
    rows = []
    for line in metrics_path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def evaluation_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [row for row in rows if "knn_top1" in row]


def curve_table(rows: list[dict[str, Any]]) -> list[list[float]]:
    """report.json's "curve": [[step, knn_top1, knn_top5, effective_rank], ...] by step."""
    return [
        [row["step"], row["knn_top1"], row["knn_top5"], row["effective_rank"]]
        for row in sorted(evaluation_rows(rows), key=lambda row: row["step"])
    ]


def plot_curve(metrics_path: Path, png_path: Path, title: str = "") -> None:
    """k-NN top-1 (left) and the loss terms (right) against the step, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rows = read_rows(metrics_path)
    curve = curve_table(rows)
    figure, (knn_axis, loss_axis) = plt.subplots(1, 2, figsize=(10, 4))
    if curve:
        steps = [point[0] for point in curve]
        knn_axis.plot(steps, [point[1] for point in curve], "o-", label="top-1")
        knn_axis.plot(steps, [point[2] for point in curve], "s--", alpha=0.5, label="top-5")
        knn_axis.legend()
    knn_axis.set(xlabel="step", ylabel="k-NN accuracy (%)", title="teacher k-NN (held-out)")
    step_rows = [row for row in rows if "loss" in row]
    for term in LOSS_TERMS:
        points = [(row["step"], row[term]) for row in step_rows if term in row]
        if points:
            loss_axis.plot(*zip(*points, strict=True), label=term, linewidth=1)
    if step_rows:
        loss_axis.legend()
    loss_axis.set(xlabel="step", ylabel="loss", title="training loss")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    with atomic_write(png_path, "wb") as handle:
        figure.savefig(handle, format="png", dpi=100)
    plt.close(figure)
