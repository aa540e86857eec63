"""What a run records: one JSON line per step, TensorBoard scalars, the collapse watch.

`metrics.jsonl` and `tensorboard/` live in the run directory. On resume both are cut back
to the checkpoint's step, so the steps replayed after a crash appear once, not twice.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from odis_core.atomic import atomic_write

METRICS_NAME = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
# JSONL key -> TensorBoard tag
_TAGS = {
    "loss": "loss/total",
    "loss_obj": "loss/obj",
    "loss_mim": "loss/mim",
    "lr": "schedule/lr",
    "wd": "schedule/weight_decay",
    "momentum": "schedule/teacher_momentum",
    "teacher_temp": "schedule/teacher_temp",
    "teacher_entropy": "teacher/entropy",
    "grad_norm": "optim/grad_norm",
    "images_per_second": "speed/images_per_second",
    "data_wait_share": "speed/data_wait_share",
    "knn_top1": "eval/knn_top1",
    "knn_top5": "eval/knn_top5",
    "effective_rank": "eval/effective_rank",
    "eval_seconds": "eval/seconds",
}


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep the lines of `path` up to `last_step` (a killed run wrote past its checkpoint)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by the kill
    with atomic_write(path, "w", encoding="utf-8") as handle:
        handle.write("".join(f"{line}\n" for line in kept))


class RunLog:
    """Appends step records to metrics.jsonl and, optionally, TensorBoard event files."""

    def __init__(self, out_dir: Path, start_step: int, tensorboard: bool = True) -> None:
        self.path = out_dir / METRICS_NAME
        truncate_metrics(self.path, start_step)
        self.handle = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close)
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a killed run wrote after its last checkpoint.
            self.writer = SummaryWriter(
                str(out_dir / TENSORBOARD_DIR), purge_step=start_step + 1 if start_step else None
            )

    def write(self, record: dict[str, Any]) -> None:
        self.handle.write(json.dumps(record) + "\n")
        self.handle.flush()  # every step: `tail -f metrics.jsonl` follows the run
        if self.writer is not None:
            for key, tag in _TAGS.items():
                value = record.get(key)
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(tag, value, record["step"])

    def flush(self) -> None:
        self.handle.flush()
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        self.handle.close()
        if self.writer is not None:
            self.writer.close()


class CollapseWatch:
    """Flags the collapse signature of spec §11: the teacher's [OBJ] distribution close to
    uniform (entropy near ln(out_dim), the loss stuck there) for `patience` steps in a row."""

    def __init__(self, out_dim: int, ratio: float = 0.98, patience: int = 10) -> None:
        self.threshold = ratio * math.log(out_dim)
        self.max_entropy = math.log(out_dim)
        self.patience = max(1, patience)
        self.run_length = 0

    def update(self, entropy: float) -> bool:
        """True once every `patience` consecutive near-uniform steps."""
        self.run_length = self.run_length + 1 if entropy >= self.threshold else 0
        if self.run_length >= self.patience:
            self.run_length = 0
            return True
        return False
