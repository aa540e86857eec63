"""The four commands end to end through Typer's test runner, at a tiny size."""

import dataclasses
import json

import numpy as np
from typer.testing import CliRunner

from odis_cli.app import app
from odis_core.precision import resolve_precision
from odis_core.train.recipes import load_recipe

runner = CliRunner()


def test_demo_runs_the_whole_pipeline_and_writes_demo_json(tmp_path):
    workdir = tmp_path / "demo"
    result = runner.invoke(app, [
        "demo", "--workdir", str(workdir), "--train-scenes", "32", "--test-scenes", "16",
        "--epochs", "1", "--workers", "0", "--device", "cpu",
    ])
    assert result.exit_code == 0, result.output
    summary = json.loads((workdir / "demo.json").read_text())
    for network in ("pretrained", "untrained"):
        assert set(summary[network]) == {"10", "20", "100", "200"}
        for figures in summary[network].values():
            assert 0.0 <= figures["top1"] <= figures["top5"] <= 100.0
    assert 0 < summary["chance"]["top1"] < 100
    features = np.load(workdir / "features" / "pretrained_test" / "features.npy")
    labels = np.load(workdir / "features" / "pretrained_test" / "labels.npy")
    assert features.shape[0] == labels.shape[0] == summary["n_test"]
    assert (workdir / "run" / "checkpoint.pt").is_file()
    # The demo trains configs/cpu-demo.json: `--config cpu-demo` with the same run options
    # resolves to the run's config.json, key for key.
    recipe = runner.invoke(app, ["pretrain", "--show-config", "--config", "cpu-demo"])
    assert recipe.exit_code == 0, recipe.output
    expected = dataclasses.replace(
        load_recipe("cpu-demo"), epochs=1, workers=0, device="cpu", batch_size=32,
        augment_on="loader",  # what the run resolves "auto" to on a CPU
        precision=resolve_precision("auto", "cpu"),  # resolved once, kept in config.json
        # The demo's online k-NN monitor (run control, not part of the recipe).
        eval_masks=str(workdir / "masks" / "test"), eval_every=1, eval_max_objects=400,
    ).resolved()
    written = json.loads((workdir / "run" / "config.json").read_text())
    assert written == json.loads(json.dumps(expected.to_dict()))
    assert "top-1" in result.output
    # The online k-NN monitor on the test store: step 0 and the last (the only) step.
    assert [point[0] for point in summary["curve"]] == [0, 1]
    assert (workdir / "run" / "curve.png").read_bytes()[:4] == b"\x89PNG"
    assert "online k-NN top-1" in result.output


def test_commands_one_by_one_with_resume(tmp_path):
    from odis_core.scenes.synthetic import SceneConfig, generate_scenes

    splits = generate_scenes(tmp_path / "scenes", 12, 6, seed=3,
                             config=SceneConfig(image_size=32))
    store = tmp_path / "masks"
    result = runner.invoke(app, ["masks", "coco", "--images", str(splits["train"].images_dir),
                                 "--annotations", str(splits["train"].annotations),
                                 "--out", str(store)])
    assert result.exit_code == 0, result.output
    stats_json = tmp_path / "stats.json"
    result = runner.invoke(app, ["masks", "stats", str(store), "--json", str(stats_json)])
    assert result.exit_code == 0, result.output
    assert json.loads(stats_json.read_text())["images"] == 12

    run = tmp_path / "run"
    common = ["pretrain", "--masks", str(store), "--out", str(run), "--arch", "vit_tiny",
              "--patch-size", "8", "--global-size", "32", "--local-size", "16",
              "--n-local-crops", "2", "--out-dim", "64", "--batch-size", "4", "--epochs", "2",
              "--workers", "0", "--device", "cpu"]
    result = runner.invoke(app, common + ["--max-steps", "2"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, common + ["--resume", "--max-steps", "4"])
    assert result.exit_code == 0, result.output
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]

    exported = tmp_path / "teacher.safetensors"
    result = runner.invoke(app, ["export", str(run), "--out", str(exported)])
    assert result.exit_code == 0, result.output
    check_export_equals_teacher(run, exported)

    features = tmp_path / "features"
    result = runner.invoke(app, ["embed", "--checkpoint", str(run), "--images",
                                 str(splits["train"].images_dir), "--masks", str(store),
                                 "--out", str(features), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    report = tmp_path / "knn.json"
    result = runner.invoke(app, ["knn", "--train", str(features), "--test", str(features),
                                 "--k", "1,5", "--json", str(report)])
    assert result.exit_code == 0, result.output
    # With queries equal to the bank, every object whose feature is unique finds itself.
    # (Two objects of one image can share a feature when, at this 4x4 patch grid, their
    # patchified masks are identical; those may lose the tie.)
    bank = np.load(features / "features.npy")
    assert bank.shape[0] == len((features / "meta.jsonl").read_text().splitlines())
    unique_rows = np.unique(bank.round(5), axis=0, return_counts=True)[1]
    unique_share = 100.0 * (unique_rows == 1).sum() / bank.shape[0]
    assert json.loads(report.read_text())["results"]["1"]["top1"] >= unique_share - 1e-6


def check_export_equals_teacher(run, exported):
    """The exported file rebuilds the teacher in plain timm: same [CLS] features as odis's
    image-level inference, and not the untrained weights."""
    import timm
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    from odis_core.embed.inference import build_backbone, load_teacher_backbone

    with safe_open(str(exported), "pt") as handle:
        header = handle.metadata()
    plain = timm.create_model(header["arch"], pretrained=False, **json.loads(header["timm_kwargs"]))
    plain.load_state_dict(load_file(str(exported)), strict=True)
    teacher, config = load_teacher_backbone(run)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = teacher(images)[:, 0]
        theirs = plain.forward_features(images)[:, 0]
        untrained = build_backbone(config)(images)[:, 0]
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(untrained, ours, atol=1e-3)


def test_errors_are_one_line_and_name_the_file(tmp_path):
    missing = tmp_path / "nowhere"
    result = runner.invoke(app, ["knn", "--train", str(missing), "--test", str(missing)])
    assert result.exit_code != 0
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "nowhere" in lines[0] and "Traceback" not in result.output


def test_masks_sam_in_two_shards_then_pretrain_reads_the_store(tmp_path, tiny_sam_checkpoint):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for index in range(4):
        pixels = np.full((48, 48, 3), rng.integers(0, 256, 3), dtype=np.uint8)
        pixels[10:30, 12:36] = rng.integers(0, 256, 3)
        Image.fromarray(pixels).save(images / f"{index}.png")
    store = tmp_path / "sam_store"
    sam = ["masks", "sam", "--images", str(images), "--checkpoint", str(tiny_sam_checkpoint),
           "--model-type", "vit_b", "--out", str(store), "--device", "cpu",
           "--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-score-thresh", "0"]
    result = runner.invoke(app, sam + ["--shard", "0/2"])
    assert result.exit_code == 0, result.output
    assert not (store / "manifest.json").exists()  # half the images: no store yet
    result = runner.invoke(app, sam + ["--shard", "1/2"])
    assert result.exit_code == 0, result.output
    stats_json = tmp_path / "stats.json"
    result = runner.invoke(app, ["masks", "stats", str(store), "--json", str(stats_json)])
    assert result.exit_code == 0, result.output
    assert json.loads(stats_json.read_text())["images"] == 4

    result = runner.invoke(app, sam + ["--shard", "2/2"])
    assert result.exit_code != 0 and "--shard 2/2" in result.output

    result = runner.invoke(app, [
        "pretrain", "--masks", str(store), "--images", str(images), "--out", str(tmp_path / "run"),
        "--arch", "vit_tiny", "--patch-size", "8", "--global-size", "32", "--local-size", "16",
        "--n-local-crops", "1", "--out-dim", "32", "--batch-size", "2", "--max-steps", "1",
        "--workers", "0", "--device", "cpu",
    ])
    assert result.exit_code == 0, result.output
