"""The confusion matrix of a k-NN evaluation as a PNG (rows: true class, columns: the
top-1 prediction), normalised per row so rare classes are as visible as common ones."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from odis_core.atomic import atomic_write

# Past this many classes, tick labels would overlap: the matrix is drawn without them.
MAX_LABELLED_CLASSES = 40


def save_confusion_png(
    confusion: np.ndarray, class_names: Sequence[str], path: Path | str, title: str = ""
) -> None:
    """confusion: (C, C) counts of (true, predicted); class_names: C names, in class order."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window (headless servers)
    import matplotlib.pyplot as plt

    confusion = np.asarray(confusion, dtype=np.float64)
    rates = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1.0)
    n_classes = len(class_names)
    side = min(4.0 + 0.3 * n_classes, 20.0)
    figure, axes = plt.subplots(figsize=(side + 1.5, side))
    image = axes.imshow(rates, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="share of the true class")
    if n_classes <= MAX_LABELLED_CLASSES:
        axes.set_xticks(range(n_classes), class_names, rotation=90, fontsize=8)
        axes.set_yticks(range(n_classes), class_names, fontsize=8)
    axes.set_xlabel("predicted (top-1)")
    axes.set_ylabel("true")
    axes.set_title(title, fontsize=10)
    figure.tight_layout()
    with atomic_write(path) as handle:
        figure.savefig(handle, format="png", dpi=100)
    plt.close(figure)
