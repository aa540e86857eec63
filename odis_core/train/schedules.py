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
    schedule = cosine_schedule_steps(
        base_value,
        final_value,
        n_epochs * iters_per_epoch,
        warmup_epochs * iters_per_epoch,
        start_warmup_value,
    )
    if len(schedule) != n_epochs * iters_per_epoch:
        raise ValueError(
            f"schedule length {len(schedule)} != {n_epochs} epochs x {iters_per_epoch} iterations"
        )
    return schedule


def cosine_schedule_steps(
    base_value: float,
    final_value: float,
    total_steps: int,
    warmup_steps: int = 0,
    start_warmup_value: float = 0.0,
) -> np.ndarray:
    """(total_steps,) values of the same shape counted in steps: a linear warm-up over
    `warmup_steps`, then a half cosine over the rest (`cosine_schedule` is this with
    epochs x iterations)."""
    warmup = np.linspace(start_warmup_value, base_value, warmup_steps)
    cosine_iters = np.arange(total_steps - warmup_steps)
    cosine = final_value + 0.5 * (base_value - final_value) * (
        1 + np.cos(np.pi * cosine_iters / max(len(cosine_iters), 1))
    )
    return np.concatenate((warmup, cosine))
