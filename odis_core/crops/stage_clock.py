"""Where a loader sample's time goes: seconds per stage, summed over samples.

Off by default (`ObjectCropDataset.clock is None`, one `if` per stage). The benchmark
(`benchmarks/bench_pretrain.py --objective-ratio`) switches it on in its own process to
compare the ODIS loader's per-sample cost with the image objective's, stage by stage.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

# The stages in the order a sample passes through them.
STAGES: tuple[str, ...] = (
    "decode image",  # read + decode the file (PIL), EXIF orientation
    "decode mask",  # the target object's RLE -> (H, W) bool (pycocotools)
    "mask integral",  # summed-area table and tight box of that mask
    "crop sampling",  # RandomResizedCrop draws incl. the object-aware re-draws and checks
    "patch masks",  # per-view patch coverage, flip, threshold
    "render + photometric",  # resize, flip, colour augmentation, normalise (or the plan)
    "mim masks",  # iBOT block masks of the global crops
)


@dataclass
class StageClock:
    """Accumulated seconds per stage; `lap` closes one stage and starts the next.

    timer: wall time by default; `time.thread_time` counts this thread's CPU time only,
    which other processes on a shared machine disturb far less (one torch thread)."""

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    samples: int = 0
    timer: Callable[[], float] = time.perf_counter

    def now(self) -> float:
        return self.timer()

    def lap(self, stage: str, started: float) -> float:
        """Add the time since `started` to `stage`; returns now (the next stage's start)."""
        now = self.timer()
        self.seconds[stage] += now - started
        return now

    def per_sample_ms(self) -> dict[str, float]:
        """Milliseconds per sample and stage (0 before any sample)."""
        return {
            stage: 1000 * total / self.samples if self.samples else 0.0
            for stage, total in self.seconds.items()
        }
