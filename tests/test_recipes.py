"""Named recipes (configs/*.json), `--config NAME|FILE`, `--show-config` and config-file
checks (odis_core/train/recipes.py, PretrainConfig.from_dict)."""

import dataclasses
import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from odis_cli.app import app
from odis_core.demo import DemoSettings
from odis_core.train.config import PretrainConfig, load_config_file
from odis_core.train.recipes import config_rows, load_recipe, meaning_of, resolve_config

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(path.stem for path in (REPO / "configs").glob("*.json"))


def test_the_named_recipes_exist():
    assert {"cpu-demo", "vit_small-ibot", "vit_base-ibot", "vit_large-ibot"} <= set(RECIPES)


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_loads_by_name_and_by_path_and_is_documented(name, monkeypatch):
    by_name = load_recipe(name).resolved()
    monkeypatch.chdir(REPO)
    assert load_recipe(f"configs/{name}.json").resolved() == by_name
    values = json.loads((REPO / "configs" / f"{name}.json").read_text())
    assert values.get("_comment"), f"{name}: no _comment saying where its numbers come from"
    options = {key: value for key, value in values.items() if not key.startswith("_")}
    for key, value in options.items():  # every option the file names reaches the config
        loaded = getattr(by_name, key)
        assert (list(loaded) if isinstance(loaded, tuple) else loaded) == value, key


def test_ibot_recipes_hold_the_published_settings():
    small = load_recipe("vit_small-ibot")
    assert (small.arch, small.patch_size, small.epochs, small.teacher_temp) == (
        "vit_small", 16, 800, 0.07)
    assert (small.global_scale, small.local_scale, small.n_local_crops) == (
        (0.25, 1.0), (0.05, 0.25), 10)
    assert small.norm_last_layer is False and small.warmup_teacher_temp_epochs == 30
    base = load_recipe("vit_base-ibot")
    assert (base.epochs, base.global_scale, base.local_scale, base.norm_last_layer) == (
        400, (0.32, 1.0), (0.05, 0.32), True)
    assert load_recipe("vit_large-ibot").arch == "vit_large"


def test_the_demo_reads_cpu_demo_with_its_measured_settings():
    recipe = load_recipe("cpu-demo")
    assert DemoSettings().pretrain == recipe
    # The values the demo was tuned with (configs/cpu-demo.json "_reasons").
    assert (recipe.arch, recipe.depth, recipe.patch_size, recipe.global_size) == (
        "vit_tiny", 4, 8, 64)
    assert (recipe.lr, recipe.teacher_temp, recipe.epochs, recipe.out_dim) == (
        4e-3, 0.04, 12, 1024)


def test_unknown_names_and_paths_say_which_recipes_exist(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="no-such-recipe: no such config file or recipe.*cpu-demo"):
        resolve_config("no-such-recipe")
    # The repository's path works from anywhere; other missing paths do not.
    assert resolve_config("configs/cpu-demo.json").is_file()
    with pytest.raises(ValueError, match="no such config file"):
        resolve_config("elsewhere/cpu-demo.json")


def test_comment_keys_are_ignored_and_bad_values_name_file_and_key(tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"_comment": "why", "_reasons": {"depth": "x"}, "depth": 3,
                                "lr": 1, "global_scale": [0.3, 1]}))
    config = load_config_file(good)
    assert (config.depth, config.lr, config.global_scale) == (3, 1, (0.3, 1))
    for values, key in [({"depth": "four"}, "depth"), ({"lr": "fast"}, "lr"),
                        ({"global_scale": [0.3]}, "global_scale"),
                        ({"compile": 1}, "compile"), ({"epochs": True}, "epochs")]:
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(values))
        with pytest.raises(ValueError, match=rf"^{re.escape(str(bad))}: {key}: expected "):
            load_config_file(bad)


def test_cli_bad_config_file_is_one_line_naming_file_and_key(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"depth": "four"}))
    result = runner.invoke(app, ["pretrain", "--config", str(bad), "--show-config"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0] and "depth" in lines[0], result.output


def _shown_values(output: str) -> dict[str, str]:
    """key -> value column of the --show-config table (first line of each row)."""
    rows = {}
    for line in output.splitlines():
        cells = [cell.strip() for cell in line.split("│")[1:-1]]
        if len(cells) == 4 and cells[0] and cells[0] not in rows:
            rows[cells[0]] = cells[1]
    return rows


def test_show_config_lists_every_key_and_takes_recipe_and_command_line():
    result = runner.invoke(
        app,
        ["pretrain", "--show-config", "--config", "cpu-demo", "--depth", "6",
         "--teacher-temp", "0.05", "--momentum-teacher", "0.98", "--warmup-epochs", "2",
         "--global-scale", "0.3", "1", "--local-scale", "0.1", "0.3", "--out-dim", "512",
         "--n-local-crops", "2", "--global-size", "48", "--local-size", "24",
         "--patch-size", "8"],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    shown = _shown_values(result.output)
    assert set(shown) >= {field.name for field in dataclasses.fields(PretrainConfig)}
    assert shown["depth"] == "6" and shown["teacher_temp"] == "0.05"
    assert shown["momentum_teacher"] == "0.98" and shown["warmup_epochs"] == "2"
    assert shown["global_scale"] == "(0.3, 1.0)" and shown["local_scale"] == "(0.1, 0.3)"
    assert (shown["out_dim"], shown["n_local_crops"]) == ("512", "2")
    assert (shown["global_size"], shown["local_size"], shown["patch_size"]) == ("48", "24", "8")
    assert shown["lr"] == "0.004"  # from the recipe, not the default


def test_every_key_has_a_meaning_and_a_default():
    for key, _value, _default, meaning in config_rows(PretrainConfig()):
        assert meaning, f"{key}: no one-line meaning (recipes.MEANINGS or a # comment)"
    assert meaning_of("teacher_temp")
