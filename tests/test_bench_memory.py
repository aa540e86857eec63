"""The memory benchmark runs at a tiny size on the CPU and reports a growing peak."""

import json
import runpy
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_memory.py"


def test_bench_memory_measures_each_batch_in_its_own_process(tmp_path, monkeypatch):
    out = tmp_path / "memory.json"
    options = {
        "arch": "vit_tiny",
        "depth": 1,
        "global-size": 64,
        "local-size": 32,
        "patch-size": 8,
        "n-local-crops": 2,
        "out-dim": 64,
        "batch-sizes": "1,16",
        "device": "cpu",
        "extrapolate": 64,
        "json": out,
    }
    argv = [str(BENCH), "--grad-checkpointing"]
    for name, value in options.items():
        argv += [f"--{name}", str(value)]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(BENCH), run_name="__main__")
    report = json.loads(out.read_text())
    (b0, m0, s0), (b1, m1, s1) = report["rows"]
    assert (b0, b1) == (1, 16) and 0 < m0 <= m1 and s0 > 0 and s1 > 0
    assert report["extrapolated_gib"] >= m1
