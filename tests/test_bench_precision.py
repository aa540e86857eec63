"""The bf16/fp32 benchmark runs both precisions of both models side by side (tiny here)."""

import json
import runpy
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_precision.py"


def test_bench_precision_quick_times_both_precisions(tmp_path, monkeypatch):
    out = tmp_path / "precision.json"
    argv = [str(BENCH), "--quick", "--rounds", "1", "--steps", "1", "--warmup", "0",
            "--threads", "1", "--json", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    threads = torch.get_num_threads()
    try:
        runpy.run_path(str(BENCH), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    report = json.loads(out.read_text())
    assert len(report["models"]) == 2
    for row in report["models"].values():
        assert row["fp32_s"] > 0 and row["bf16_s"] > 0
        assert row["speedup"] == row["fp32_s"] / row["bf16_s"]
