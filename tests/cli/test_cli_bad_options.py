"""Issue 15 cases 7-10: every bad option or input is one line on stderr naming the option or
file and the problem, a non-zero exit, before any work (no progress bar, nothing written);
wrong-but-accepted inputs are refused or warned about."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from bad_inputs import good_annotations
from PIL import Image
from pretrain_fixtures import make_store, pretrain_args
from typer.testing import CliRunner

from odis_cli.app import app
from odis_core.embed.features import write_features

runner = CliRunner()
NO_GPU = not torch.cuda.is_available()


def _error_line(result) -> str:
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    return lines[0]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp("bad_options_store"), n_images=8)


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"max_steps": -5}, ["--max-steps", "-5", ">= 1"]),
        ({"lr": -1}, ["--lr", "-1", ">= 0"]),
        ({"batch_size": 0}, ["--batch-size", ">= 1"]),
        ({"workers": -1}, ["--workers", ">= 0"]),
        ({"device": "gpu"}, ["--device gpu", "auto, cpu or cuda"]),
        pytest.param({"device": "cuda"}, ["--device cuda", "no GPU"],
                     marks=pytest.mark.skipif(not NO_GPU, reason="a GPU is present")),
    ],
)
def test_pretrain_option_errors_come_before_any_work(store, tmp_path, options, words):
    run = tmp_path / "run"
    result = runner.invoke(app, pretrain_args(store, run, tmp_path / "tiny.json", **options))
    line = _error_line(result)
    assert all(word in line for word in words), line
    assert "pretraining" not in result.output  # no progress bar before the error
    assert not run.exists()


def test_a_config_value_of_the_wrong_type_names_the_file_and_key(store, tmp_path):
    config = tmp_path / "bad.json"
    config.write_text(json.dumps({"depth": "four"}))
    result = runner.invoke(app, pretrain_args(store, tmp_path / "run", config))
    line = _error_line(result)
    assert str(config) in line and "depth" in line and '"four"' in line and "int" in line


def _write_features(path: Path, n: int, seed: int, weights: str | None = "w1") -> Path:
    rng = np.random.default_rng(seed)
    labels = rng.integers(3, size=n)
    features = rng.normal(size=(3, 8))[labels] * 3 + rng.normal(size=(n, 8))
    meta = [{"image": f"{i}.png", "object_id": i, "category_id": int(c)}
            for i, c in enumerate(labels)]
    info = {"backbone": "vit_tiny", "level": "object"}
    if weights is not None:
        info["weights"] = weights
    write_features(path, features.astype(np.float32), labels, meta, info)
    return path


@pytest.fixture
def banks(tmp_path):
    return _write_features(tmp_path / "train", 80, 0), _write_features(tmp_path / "test", 20, 1)


def _knn(banks, *extra):
    train, test = banks
    return runner.invoke(app, ["knn", "--train", str(train), "--test", str(test), "--k", "5",
                               *extra])


def test_knn_device_errors_are_one_line(banks):
    assert _knn(banks, "--backend", "torch", "--device", "auto").exit_code == 0
    line = _error_line(_knn(banks, "--device", "gpu"))
    assert "--device gpu" in line
    if NO_GPU:
        line = _error_line(_knn(banks, "--backend", "torch", "--device", "cuda"))
        assert "--device cuda" in line and "no GPU" in line


def test_knn_result_is_printed_when_the_json_path_cannot_be_written(banks, tmp_path):
    target = tmp_path / "nonexistent_dir" / "k.json"
    result = _knn(banks, "--json", str(target))
    line = _error_line(result)
    assert f"--json {target}" in line and ".tmp" not in line
    assert "top-1" in result.output  # the computed table came first
    assert not target.parent.exists()


def test_knn_refuses_features_without_a_weights_fingerprint(tmp_path):
    # The demo's feature directories used to carry none: pretrained vs untrained compared.
    train = _write_features(tmp_path / "train", 40, 0, weights=None)
    test = _write_features(tmp_path / "test", 10, 1, weights="w2")
    line = _error_line(_knn((train, test)))
    assert str(train) in line and "weights fingerprint" in line
    assert _knn((train, test), "--allow-mismatch").exit_code == 0


def test_knn_warns_when_ivf_cells_outnumber_the_bank(banks):
    result = _knn(banks, "--ivf", "16", "--nprobe", "2", "--k", "50")
    assert result.exit_code == 0, result.output
    warning = " ".join(result.output.split())
    assert "--ivf 16: more cells than 80 bank vectors / 39 = 2" in warning
    assert "the effective k is about 10" in warning


def test_embed_errors_are_one_line(tmp_path, store):
    base = ["embed", "--checkpoint", str(tmp_path / "none.pt"), "--out", str(tmp_path / "f"),
            "--masks", str(store)]
    line = _error_line(runner.invoke(app, [*base, "--images", str(tmp_path / "nonexistent")]))
    assert "--images" in line and "no such directory" in line
    line = _error_line(runner.invoke(app, [*base, "--images", str(tmp_path), "--batch-size", "0"]))
    assert "--batch-size 0" in line
    line = _error_line(runner.invoke(app, [*base, "--images", str(tmp_path), "--device", "gpu"]))
    assert "--device gpu" in line
    assert not (tmp_path / "f").exists()


def test_masks_sam_names_a_safetensors_checkpoint(tmp_path):
    from safetensors.torch import save_file

    checkpoint = tmp_path / "x.safetensors"
    save_file({"w": torch.zeros(2)}, checkpoint)
    result = runner.invoke(app, ["masks", "sam", "--images", str(tmp_path), "--checkpoint",
                                 str(checkpoint), "--out", str(tmp_path / "s"), "--model-type",
                                 "vit_b", "--device", "cpu"])
    line = _error_line(result)
    assert "x.safetensors" in line and "safetensors file" in line and ".pth" in line


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (["--epochs", "0"], "--epochs 0"),
        (["--train-scenes", "0"], "--train-scenes 0"),
        pytest.param(["--device", "cuda"], "no GPU",
                     marks=pytest.mark.skipif(not NO_GPU, reason="a GPU is present")),
    ],
)
def test_demo_refuses_bad_options_before_generating_scenes(tmp_path, options, words):
    workdir = tmp_path / "demo"
    line = _error_line(runner.invoke(app, ["demo", "--workdir", str(workdir), *options]))
    assert words in line
    assert not workdir.exists()


def test_masks_coco_warns_of_missing_images_and_lists_a_late_truncated_jpeg(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), np.uint8))
    picture.save(images / "plain.jpg")
    picture.save(images / "gray.png")
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG")
    # Cut at 90%: the header (and the size it states) stays intact.
    (images / "late_cut.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) * 9 // 10])
    dataset = good_annotations()
    dataset["images"][1]["file_name"] = "grey.png"  # a typo
    dataset["images"].append({"id": 3, "file_name": "late_cut.jpg", "width": 64, "height": 48})
    annotations = tmp_path / "instances.json"
    annotations.write_text(json.dumps(dataset))
    out = tmp_path / "store"
    result = runner.invoke(app, ["masks", "coco", "--images", str(images), "--annotations",
                                 str(annotations), "--out", str(out)])
    assert result.exit_code == 0, result.output
    warning = " ".join(result.output.split())
    assert f"warning: {annotations}: 2 image(s) missing or unreadable under {images}" in warning
    skipped = (out / "skipped.txt").read_text()
    assert "grey.png" in skipped and "late_cut.jpg: truncated" in skipped
    assert "plain.jpg" not in skipped


def test_demo_says_it_replaces_its_own_artifacts(tmp_path, monkeypatch):
    import odis_core.scenes.synthetic as synthetic

    workdir = tmp_path / "demo"
    (workdir / "run").mkdir(parents=True)
    (workdir / "demo.json").write_text("{}")

    def stop_here(*args, **kwargs):
        raise RuntimeError("scene generation reached")

    monkeypatch.setattr(synthetic, "generate_scenes", stop_here)
    result = runner.invoke(app, ["demo", "--workdir", str(workdir), "--device", "cpu"])
    assert "scene generation reached" in _error_line(result)
    assert f"replacing the previous demo's scenes, masks, run and features in {workdir}" in (
        " ".join(result.output.split()))
