"""The pretraining benchmark runs on CPU at a tiny size and reports every figure."""

import json
import runpy
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_pretrain.py"


def test_bench_pretrain_quick_runs_and_writes_all_figures(tmp_path, monkeypatch):
    out = tmp_path / "bench.json"
    monkeypatch.setattr(sys, "argv", [str(BENCH), "--quick", "--threads", "1", "--json", str(out)])
    args = ["--steps", "1", "--warmup", "0"]
    monkeypatch.setattr(sys, "argv", sys.argv + args)
    import torch

    threads = torch.get_num_threads()
    try:
        runpy.run_path(str(BENCH), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    report = json.loads(out.read_text())
    assert set(report["steps"]) == {
        "odis (split attn)",
        "odis (dense mask)",
        "image (iBOT)",
        "plain timm",
    }
    for row in report["steps"].values():
        assert row["flops"] > 0 and row["step_ms"] > 0 and row["img_s"] > 0
    assert [name for name, *_ in report["attention"]][0] == "unmasked SDPA"


def test_bench_pretrain_loader_only_times_both_places_to_render(tmp_path, monkeypatch):
    out = tmp_path / "loader.json"
    argv = [
        str(BENCH),
        "--quick",
        "--loader-only",
        "--augment-on",
        "both",
        "--steps",
        "2",
        "--json",
        str(out),
    ]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(BENCH), run_name="__main__")
    figures = json.loads(out.read_text())["loader"]
    assert figures["loader"]["loader_only_images_per_second"] > 0
    assert figures["device"]["loader_only_images_per_second"] > 0
    assert figures["device"]["render_images_per_second"] > 0


def test_bench_pretrain_objective_ratio_times_every_loader_stage_of_both(tmp_path, monkeypatch):
    out = tmp_path / "ratio.json"
    argv = [str(BENCH), "--quick", "--objective-ratio", "--recipe", "args", "--n-scenes", "10"]
    argv += ["--scene-size", "64", "--profile-samples", "4", "--steps", "1", "--json", str(out)]
    argv += ["--scenes-dir", str(tmp_path / "scenes")]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(BENCH), run_name="__main__")
    summary = json.loads(out.read_text())
    assert (tmp_path / "scenes" / "scenes" / "train" / "images" / "train_00000.jpg").exists()
    for objective in ("odis", "image"):
        figures = summary["median"][objective]
        assert figures["loader_images_per_second"] > 0
        assert figures["crops"] == 4 * (2 + 4)  # --quick: 2 global + 4 local crops per image
        stages = figures["stages_ms"]
        assert all(stages[name] > 0 for name in stages)
        # The stages account for the sample (clock overhead and the store lookup aside).
        assert sum(stages.values()) <= figures["sample_ms"] * 1.001
        assert sum(stages.values()) > 0.5 * figures["sample_ms"]
    assert summary["median"]["image"]["crop_fallbacks"] == 0
    assert summary["ratio"]["loader"] > 0 and summary["ratio"]["sample_cost"] > 0
