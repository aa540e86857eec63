"""The issue-17 sweep harness and raw-pixel floor run end to end on tiny IDX files."""

import json
import subprocess
import sys
from pathlib import Path

from odis_core.train.config import PretrainConfig, load_config_file

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def test_shipped_small_data_recipe_loads_with_its_comments():
    config = load_config_file(ROOT / "configs" / "small-data.json").resolved()
    assert (config.arch, config.global_size, config.n_local_crops) == ("vit_tiny", 64, 4)
    assert config.koleo_weight == 0.1 and config.grayscale_prob == 1.0
    assert config.pos_embed == "sincos" and config.epochs == 25


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    completed = subprocess.run([sys.executable, str(EXAMPLES / script), *args],
                               capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-2000:]
    return completed


def test_sweep_writes_resumable_curves_per_arm_and_the_results_json(fashion_idx_dir, tmp_path):
    work, recipe = tmp_path / "work", tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"_comment": "why", "lr": 0.001, "color_jitter": 0.5}))
    common = ["--workdir", str(work), "--tiny", "--source", str(fashion_idx_dir),
              "--config", str(recipe), "--name", "r", "--arms", "odis,ibot,readout_all"]
    run("small_data_sweep.py", *common, "--milestones", "0,1")
    odis = json.loads((work / "curves" / "r@odis.json").read_text())
    ibot = json.loads((work / "curves" / "r@ibot.json").read_text())
    assert [p["step"] for p in odis["curve"]] == [0, 1]
    assert odis["settings"]["color_jitter"] == 0.5 and odis["settings"]["lr"] == 0.001
    assert ibot["settings"]["objective"] == "image" and odis["settings"]["objective"] == "odis"
    assert odis["curve"][0]["top1"] == ibot["curve"][0]["top1"]  # one untrained network
    assert odis["curve"][1]["cpu_s"] > 0 and odis["curve"][1]["participation_ratio"] >= 1
    # --tiny: batch 4, 2 globals + 2 locals: 24 [OBJ] terms per step for the target alone
    assert odis["curve"][1]["object_pairs"] == 24
    every = json.loads((work / "curves" / "r@readout_all.json").read_text())
    assert every["settings"]["objects_per_image"] == 0 and every["settings"]["obj_readout"]
    assert every["curve"][1]["object_pairs"] >= 24

    # A longer curve resumes the run: the finished points are kept as they were.
    run("small_data_sweep.py", *common, "--milestones", "0,1,2")
    longer = json.loads((work / "curves" / "r@odis.json").read_text())
    assert longer["curve"][:2] == odis["curve"] and longer["curve"][2]["step"] == 2
    assert len((work / "runs" / "r@odis" / "metrics.jsonl").read_text().splitlines()) == 2

    run("raw_pixel_baseline.py", "--workdir", str(work), "--source", str(fashion_idx_dir),
        "--train-scenes", "12", "--test-scenes", "6", "--bank-scenes", "8",
        "--canvas-size", "32")
    raw = json.loads((work / "raw_pixels.json").read_text())
    assert 0 <= raw["top1"] <= 100 and raw["n_test"] == odis["curve"][0]["n_test"]

    results = tmp_path / "results.json"
    run("small_data_sweep.py", *common, "--report", "--results-json", str(results))
    summary = json.loads(results.read_text())
    assert summary["arms"]["odis"]["curve"] == [[p["step"], round(p["top1"], 2)]
                                                for p in longer["curve"]]
    assert set(summary["arms"]) == {"odis", "ibot"} and "meanpool" in summary["missing_arms"]
    assert "readout_all" not in summary["missing_arms"]  # issue 17's arms only there
    assert set(summary["readout_arms"]) == {"readout_all"}
    assert summary["readout_arms"]["readout_all"]["object_pairs"][-1][1] >= 24
    assert summary["untrained"]["top1"] == round(odis["curve"][0]["top1"], 2)
    assert summary["raw_pixels"]["top1"] == round(raw["top1"], 2)
    assert (work / "curves.png").is_file() and "r@ibot" in (work / "curves.md").read_text()
    assert (work / "arms.png").is_file()  # the arms at equal steps and equal CPU seconds


def load_sweep():
    import importlib.util

    spec = importlib.util.spec_from_file_location("small_data_sweep",
                                                  EXAMPLES / "small_data_sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_run_recorded_before_a_key_counts_as_its_default_never_as_a_readout_arm():
    sweep = load_sweep()
    paper = json.loads(json.dumps(PretrainConfig().resolved().to_dict()))
    old_run = {key: value for key, value in paper.items()
               if key not in ("obj_readout", "objects_per_image")}
    assert sweep.same_recipe(old_run, paper)
    readout = {**paper, "obj_readout": True}
    assert not sweep.same_recipe(old_run, readout)
    assert sweep.same_recipe({**old_run, "obj_readout": True}, readout)
    assert not sweep.same_recipe({**paper, "lr": 1.0}, paper)
    assert set(sweep.ISSUE17_ARMS) < set(sweep.ARMS)
    assert sweep.ARMS["readout_all"] == {"obj_readout": True, "objects_per_image": 0}


def test_supervised_ceiling_trains_the_recipes_network_and_evaluates_it_like_the_sweep(
        fashion_idx_dir, tmp_path):
    work, recipe = tmp_path / "work", tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"_comment": "why", "pos_embed": "sincos"}))
    common = ["--workdir", str(work), "--tiny", "--source", str(fashion_idx_dir),
              "--config", str(recipe)]
    run("supervised_ceiling.py", *common, "--milestones", "0,3", "--batch-size", "4")
    ceiling = json.loads((work / "supervised_ceiling.json").read_text())
    assert [p["step"] for p in ceiling["curve"]] == [0, 3]
    assert ceiling["curve"][0]["loss"] is None and ceiling["curve"][1]["loss"] > 0
    assert ceiling["curve"][1]["cpu_s"] > 0
    # Step 0 is the recipe's own untrained network, read the sweep's way.
    run("small_data_sweep.py", *common, "--name", "r", "--milestones", "0")
    swept = json.loads((work / "curves" / "r@odis.json").read_text())
    assert ceiling["curve"][0]["top1"] == swept["curve"][0]["top1"]
    assert ceiling["curve"][0]["n_test"] == swept["curve"][0]["n_test"]
