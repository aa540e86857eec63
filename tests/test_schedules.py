"""Cosine schedules (iBOT `cosine_scheduler`) against the official reference values."""

from pathlib import Path

import numpy as np
import pytest

from odis_core.train.schedules import cosine_schedule

REFERENCE = Path(__file__).parent / "reference" / "ibot_schedules.npz"


@pytest.mark.parametrize("name", ["lr", "wd", "momentum"])
def test_reproduces_official_schedule(name):
    ref = np.load(REFERENCE)
    base, final, epochs, iters, warmup = ref[f"args_{name}"]
    schedule = cosine_schedule(base, final, int(epochs), int(iters), int(warmup))
    np.testing.assert_allclose(schedule, ref[name], rtol=1e-12, atol=0)


def test_warmup_starts_at_zero_and_ends_near_final():
    schedule = cosine_schedule(1.0, 0.1, 10, 5, warmup_epochs=2)
    assert schedule[0] == 0.0 and schedule[9] == pytest.approx(1.0)
    assert schedule[-1] == pytest.approx(0.1, abs=5e-3) and len(schedule) == 50
