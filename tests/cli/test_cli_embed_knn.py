"""`odis embed` and `odis knn` end to end: crash safety (SIGKILL mid-run, then resume),
torchrun ranks, foreign checkpoints, viz, and the k-NN report, confusion PNG and checks."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from odis_cli.app import app
from odis_core.embed.features import read_features, write_features
from odis_core.masks.coco import import_coco
from odis_core.scenes.synthetic import SceneConfig, generate_scenes

runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]
ARCH = "vit_tiny_patch16_224"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed_cli")
    splits = generate_scenes(root / "scenes", 40, 2, seed=11, config=SceneConfig(image_size=32))
    images = splits["train"].images_dir
    import_coco(splits["train"].annotations, root / "store", images_root=images)
    torch.manual_seed(0)
    # The layout `odis export` writes (timm keys, architecture in the header): two blocks.
    kwargs = {"num_classes": 0, "img_size": 32, "patch_size": 8, "depth": 2}
    vit = timm.create_model(ARCH, pretrained=False, **kwargs)
    save_file(
        vit.state_dict(),
        root / "vit.safetensors",
        metadata={
            "format": "odis-teacher-backbone",
            "arch": ARCH,
            "timm_kwargs": json.dumps(kwargs),
        },
    )
    return {"images": images, "store": root / "store", "ckpt": root / "vit.safetensors"}


def embed_args(data, out, *extra):
    return [
        "embed",
        "--checkpoint",
        str(data["ckpt"]),
        "--arch",
        ARCH,
        "--images",
        str(data["images"]),
        "--masks",
        str(data["store"]),
        "--out",
        str(out),
        "--device",
        "cpu",
        *extra,
    ]


def odis_process(args):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "odis_cli", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def finished_shards(out):
    return len(list((out / "shards").glob("*/info.json"))) if (out / "shards").is_dir() else 0


def test_sigkill_mid_run_then_resume_gives_the_uninterrupted_features(tmp_path, data):
    slow = ["--shard-size", "1", "--batch-size", "1"]
    reference = tmp_path / "reference"
    result = runner.invoke(app, embed_args(data, reference, *slow))
    assert result.exit_code == 0, result.output

    out = tmp_path / "killed"
    process = odis_process(embed_args(data, out, *slow))
    deadline = time.monotonic() + 120
    while finished_shards(out) < 3 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stdout.read().decode()
    done = finished_shards(out)
    # Killed mid-run: some shards written, not all, no merged output yet.
    assert 3 <= done < 40 and not (out / "info.json").exists(), done

    result = runner.invoke(app, embed_args(data, out, *slow))
    assert result.exit_code == 0, result.output
    resumed, uninterrupted = read_features(out), read_features(reference)
    np.testing.assert_array_equal(resumed.features, uninterrupted.features)
    np.testing.assert_array_equal(resumed.labels, uninterrupted.labels)
    ids = [row["object_id"] for row in resumed.meta]
    assert ids == [row["object_id"] for row in uninterrupted.meta]
    assert len(set(ids)) == len(ids)  # no duplicate
    assert not list(out.glob("*.tmp")) and not (out / "shards").exists()


def test_torchrun_two_ranks_write_their_shards_and_rank0_merges(tmp_path, data):
    single = tmp_path / "single"
    assert runner.invoke(app, embed_args(data, single, "--shard-size", "7")).exit_code == 0
    out = tmp_path / "ranks"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            "29517",
            "-m",
            "odis_cli",
            *embed_args(data, out, "--shard-size", "7"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    both, one = read_features(out), read_features(single)
    np.testing.assert_allclose(both.features, one.features, atol=1e-5)
    assert [r["object_id"] for r in both.meta] == [r["object_id"] for r in one.meta]


def test_image_level_float16_and_viz(tmp_path, data):
    out = tmp_path / "feat"
    result = runner.invoke(
        app, embed_args(data, out, "--level", "image", "--dtype", "float16", "--viz", "2")
    )
    assert result.exit_code == 0, result.output
    features = np.load(out / "features.npy")
    assert features.dtype == np.float16 and features.shape == (40, 192)
    info = json.loads((out / "info.json").read_text())
    assert (info["level"], info["mode"], info["source"], info["backbone"]) == (
        "image",
        "cls",
        "timm",
        ARCH,
    )
    assert len(list((out / "viz").glob("*.png"))) == 2
    # A re-run with the same settings has nothing to do.
    result = runner.invoke(app, embed_args(data, out, "--level", "image", "--dtype", "float16"))
    assert result.exit_code == 0 and "already complete" in " ".join(result.output.split())


def test_mismatched_checkpoint_is_a_one_line_error(tmp_path, data):
    state = timm.create_model(
        ARCH, pretrained=False, num_classes=0, img_size=32, patch_size=8, depth=2
    ).state_dict()
    save_file(state, tmp_path / "vit.safetensors")  # no header: 2 blocks of a 12-block arch
    args = embed_args(data, tmp_path / "f")
    args[args.index("--checkpoint") + 1] = str(tmp_path / "vit.safetensors")
    result = runner.invoke(app, args)
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1
    assert "vit.safetensors" in lines[0] and "missing [blocks.2." in lines[0]
    assert "Traceback" not in result.output


def write_dir(path, features, labels, **info):
    meta = [
        {
            "image": f"{i}.png",
            "object_id": i,
            "category_id": int(label),
            "category": f"class{label}",
        }
        for i, label in enumerate(labels)
    ]
    write_features(
        path,
        features,
        labels,
        meta,
        {"backbone": "vit_tiny", "level": "object", "weights": "abc", **info},
    )


def test_knn_report_confusion_backends_and_mismatch(tmp_path):
    rng = np.random.default_rng(0)
    means = rng.normal(size=(3, 16)) * 3
    train_labels, test_labels = rng.integers(3, size=120), rng.integers(3, size=30)
    write_dir(tmp_path / "train", (means[train_labels] + rng.normal(size=(120, 16))), train_labels)
    write_dir(tmp_path / "test", (means[test_labels] + rng.normal(size=(30, 16))), test_labels)
    reports = {}
    for backend in ("faiss", "torch"):
        report = tmp_path / f"{backend}.json"
        result = runner.invoke(
            app,
            [
                "knn",
                "--train",
                str(tmp_path / "train"),
                "--test",
                str(tmp_path / "test"),
                "--backend",
                backend,
                "--json",
                str(report),
                "--confusion",
                str(tmp_path / "cm.png"),
            ],
        )
        assert result.exit_code == 0, result.output
        reports[backend] = json.loads(report.read_text())
    assert reports["faiss"]["results"] == reports["torch"]["results"]
    assert reports["torch"]["backend"] == "torch-cpu"
    assert reports["faiss"]["category_names"] == {"0": "class0", "1": "class1", "2": "class2"}
    assert sum(v["n"] for v in reports["faiss"]["per_class"]["20"].values()) == 30
    assert (tmp_path / "cm.png").read_bytes()[:4] == b"\x89PNG"

    result = runner.invoke(
        app,
        [
            "knn",
            "--train",
            str(tmp_path / "train"),
            "--test",
            str(tmp_path / "test"),
            "--ivf",
            "4",
            "--nprobe",
            "4",
        ],
    )
    assert result.exit_code == 0 and "IVF recall@k" in result.output

    write_dir(
        tmp_path / "other", rng.normal(size=(5, 16)), np.array([0, 1, 2, 0, 1]), weights="xyz"
    )
    args = ["knn", "--train", str(tmp_path / "train"), "--test", str(tmp_path / "other")]
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and "weights 'xyz' differs" in result.output
    result = runner.invoke(app, args + ["--allow-mismatch", "--k", "1,200"])
    assert result.exit_code == 0
    assert "k clamped to the 120 training items" in " ".join(result.output.split())


def test_the_bad_image_corpus_is_embedded_or_skipped_and_counted(tmp_path, data, bad_image_corpus):
    # Issue 8: every odd image embeds at its displayed size; every broken one (truncated,
    # empty, text named .jpg, the 20k x 20k bomb) is skipped, counted and named.
    out = tmp_path / "feat"
    args = ["embed", "--checkpoint", str(data["ckpt"]), "--arch", ARCH, "--images",
            str(bad_image_corpus.root), "--level", "image", "--out", str(out), "--device", "cpu"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "meta.jsonl").read_text().splitlines()]
    assert sorted(row["image"] for row in rows) == sorted(bad_image_corpus.readable)
    assert np.load(out / "features.npy").shape[0] == len(bad_image_corpus.readable)
    skipped_text = json.dumps(json.loads((out / "info.json").read_text())["skipped"])
    for name in bad_image_corpus.unreadable:
        assert name in skipped_text
