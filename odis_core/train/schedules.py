"""Per-iteration schedules as pure functions of the step (iBOT's `cosine_scheduler`).

Precomputed arrays indexed by the global step: trivially testable and trivially resumable.
"""

from __future__ import annotations

import numpy as np


def cosine_schedule(
    base_value: float,
    final_value: float,
    n_epochs: int,
    iters_per_epoch: int,
    warmup_epochs: int = 0,
    start_warmup_value: float = 0.0,
) -> np.ndarray:
    """(n_epochs * iters_per_epoch,) values: linear warm-up from `start_warmup_value` to
    `base_value` over `warmup_epochs`, then a half cosine from `base_value` to `final_value`."""
    warmup_iters = warmup_epochs * iters_per_epoch
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters)
    cosine_iters = np.arange(n_epochs * iters_per_epoch - warmup_iters)
    cosine = final_value + 0.5 * (base_value - final_value) * (
        1 + np.cos(np.pi * cosine_iters / len(cosine_iters))
    )
    schedule = np.concatenate((warmup, cosine))
    if len(schedule) != n_epochs * iters_per_epoch:
        raise ValueError(
            f"schedule length {len(schedule)} != {n_epochs} epochs x {iters_per_epoch} iterations"
        )
    return schedule
