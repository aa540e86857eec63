"""The issue-7 experiment script runs end to end (tiny size, tiny IDX files), so it cannot rot."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "fashion_mnist_experiment.py"
ARMS = {
    "odis": {"objective": "odis", "masked_attention": True, "object_crops": True, "feature": "obj"},
    "ibot_image_objective": {
        "objective": "image",
        "masked_attention": False,
        "object_crops": False,
        "feature": "obj",
    },
    "odis_no_masked_attention": {
        "objective": "odis",
        "masked_attention": False,
        "object_crops": True,
        "feature": "obj",
    },
    "odis_no_object_aware_crops": {
        "objective": "odis",
        "masked_attention": True,
        "object_crops": False,
        "feature": "obj",
    },
    "odis_meanpool_feature": {"objective": "odis", "object_crops": True, "feature": "meanpool"},
}
MODES = ("masked", "crop", "blackout", "full-image", "meanpool")


def test_experiment_trains_every_arm_on_one_budget_and_scores_every_mode(fashion_idx_dir, tmp_path):
    completed = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--workdir",
            str(tmp_path / "work"),
            "--tiny",
            "--source",
            str(fashion_idx_dir),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    work = tmp_path / "work"

    budgets = set()
    for slug, expected in ARMS.items():
        config = json.loads((work / "runs" / slug / "config.json").read_text())
        assert {key: config[key] for key in expected} == expected, slug
        budgets.add((config["max_steps"], config["batch_size"], config["seed"], config["arch"]))
        assert json.loads((work / "runs" / slug / "report.json").read_text())["steps"] == 2
    assert len(budgets) == 1

    summary = json.loads((work / "results.json").read_text())
    assert len(summary["results"]) == len(ARMS) + 1  # the five arms and the untrained floor
    n_objects = len(
        json.loads((work / "scenes" / "test" / "annotations.json").read_text())["annotations"]
    )
    for arm, reports in summary["results"].items():
        assert set(reports) == set(MODES), arm
        for mode, report in reports.items():
            assert set(report["results"]) == {"10", "20", "100", "200"}
            assert report["n_test"] == n_objects, (arm, mode)  # one row per test object
            assert 0.0 <= report["results"]["20"]["top1"] <= 100.0

    table = (work / "results.md").read_text()
    assert "| arm | masked | crop | blackout | full-image | meanpool |" in table
    assert table.count("\n| ") == 1 + len(ARMS) + 2  # header, arms, untrained, chance
    assert (work / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
