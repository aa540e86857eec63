"""SIGKILL `odis masks sam` mid-run, run it again: the store equals an uninterrupted run's,
with no image missing and none twice."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from odis_core.masks.store import read_store

TESTS = Path(__file__).parent
ROOT = TESTS.parent
# The child builds the tiny SAM for "vit_b", as the tiny_sam_checkpoint fixture does
# in-process, then runs the real CLI entry point.
LAUNCHER = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); "
    "from conftest import _build_tiny_sam_vit_b; "
    "from segment_anything import sam_model_registry; "
    "sam_model_registry['vit_b'] = _build_tiny_sam_vit_b; "
    "from odis_cli.app import app; sys.argv[0] = 'odis'; app()"
)
N_IMAGES = 16


def odis_masks_sam(images, checkpoint, out):
    command = [
        sys.executable,
        "-c",
        LAUNCHER,
        str(TESTS),
        "masks",
        "sam",
        "--images",
        str(images),
        "--checkpoint",
        str(checkpoint),
        "--model-type",
        "vit_b",
        "--out",
        str(out),
        "--points-per-side",
        "4",
        "--pred-iou-thresh",
        "0",
        "--stability-score-thresh",
        "0",
        "--batch-size",
        "1",
        "--device",
        "cpu",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def journal_entries(out):
    lines = []
    for path in (out / "sam_journal").glob("*.jsonl"):
        lines += path.read_text().splitlines()[1:]
    return lines


def test_sigkill_mid_run_then_rerun_matches_an_uninterrupted_run(tmp_path, tiny_sam_checkpoint):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        pixels = np.zeros((48, 64, 3), dtype=np.uint8)
        pixels[rng.integers(0, 24) :, rng.integers(0, 32) :] = rng.integers(0, 256, 3)
        Image.fromarray(pixels).save(images / f"{i:02d}.png")
    (images / "broken.jpg").write_bytes(b"")

    reference = odis_masks_sam(images, tiny_sam_checkpoint, tmp_path / "reference")
    assert reference.wait(timeout=300) == 0, reference.stderr.read().decode()

    out = tmp_path / "store"
    victim = odis_masks_sam(images, tiny_sam_checkpoint, out)
    deadline = time.monotonic() + 300
    while len(journal_entries(out)) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert victim.poll() is None, "the run ended before it could be killed"
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=60)
    done_before = len(journal_entries(out))
    assert 3 <= done_before < N_IMAGES + 1
    assert not (out / "manifest.json").exists()  # never a partial store

    again = odis_masks_sam(images, tiny_sam_checkpoint, out)
    assert again.wait(timeout=300) == 0, again.stderr.read().decode()

    store, expected = read_store(out), read_store(tmp_path / "reference")
    names = [image.file_name for image in store.images]
    assert names == sorted(f"{i:02d}.png" for i in range(N_IMAGES))  # each once, none missing
    assert [i.file_name for i in expected.images] == names
    ids = [obj.object_id for obj in store.objects]
    assert len(ids) == len(set(ids)) == expected.n_objects
    for image in expected.images:
        assert store.objects_of(image.image_id) == expected.objects_of(image.image_id)
    assert store.skipped == expected.skipped and len(store.skipped) == 1
    assert store.skipped[0].startswith("broken.jpg: ")
    # The journal holds each segmented image once: the resumed run skipped those done
    # (unreadable files are retried on every run, so they may appear again).
    entries = [json.loads(line) for line in journal_entries(out)]
    segmented = [entry["file_name"] for entry in entries if "skipped" not in entry]
    assert sorted(segmented) == names
