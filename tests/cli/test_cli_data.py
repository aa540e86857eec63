"""`odis data scenes fashion-mnist` end to end on tiny IDX files."""

import json

from typer.testing import CliRunner

from odis_cli.app import app

runner = CliRunner()


def test_fashion_mnist_scenes_command_writes_both_splits_with_its_options(
    fashion_idx_dir, tmp_path
):
    out = tmp_path / "scenes"
    result = runner.invoke(
        app,
        [
            "data",
            "scenes",
            "fashion-mnist",
            "--source",
            str(fashion_idx_dir),
            "--out",
            str(out),
            "--train",
            "3",
            "--test",
            "2",
            "--seed",
            "4",
            "--canvas-size",
            "48",
            "--object-scale",
            "0.3",
            "0.5",
            "--background",
            "black",
            "--tint",
            "0",
            "--occlusion-limit",
            "0.2",
            "--min-objects",
            "1",
            "--max-objects",
            "3",
        ],
    )
    assert result.exit_code == 0, result.output
    for split, n_images in (("train", 3), ("test", 2)):
        coco = json.loads((out / split / "annotations.json").read_text())
        assert len(coco["images"]) == n_images
        assert len(list((out / split / "images").glob("*.png"))) == n_images
        settings = coco["info"]["config"]
        assert settings["canvas_size"] == 48 and settings["object_scale"] == [0.3, 0.5]
        assert settings["background"] == "black" and settings["tint"] == 0.0
        assert settings["occlusion_limit"] == 0.2 and settings["max_objects"] == 3
        assert coco["info"]["seed"] != 4  # per-split seeds derived from --seed
        assert [c["name"] for c in coco["categories"]][:2] == ["T-shirt/top", "Trouser"]
    assert "train" in result.output and "test" in result.output


def test_fashion_mnist_scenes_command_fails_in_one_line(tmp_path, fashion_idx_dir):
    missing = tmp_path / "nowhere"
    result = runner.invoke(
        app,
        [
            "data",
            "scenes",
            "fashion-mnist",
            "--source",
            str(missing),
            "--out",
            str(tmp_path / "out"),
        ],
    )
    assert result.exit_code == 1
    assert "error:" in result.output and str(missing) in result.output
    assert "Traceback" not in result.output

    result = runner.invoke(
        app,
        [
            "data",
            "scenes",
            "fashion-mnist",
            "--source",
            str(fashion_idx_dir),
            "--out",
            str(tmp_path / "out"),
            "--occlusion-limit",
            "1.5",
        ],
    )
    assert result.exit_code == 1 and "occlusion_limit must be in [0, 1)" in result.output
