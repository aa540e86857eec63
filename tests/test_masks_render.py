"""`render_objects` / `odis masks show`: a PNG of the image's size with the objects drawn."""

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from odis_cli.app import app
from odis_core.masks.render import MASK_OPACITY, object_colour, render_objects
from odis_core.masks.store import (
    ImageRecord,
    MaskStoreError,
    ObjectRecord,
    object_from_mask,
    write_store,
)


@pytest.fixture
def store(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    Image.new("RGB", (48, 32), (0, 0, 0)).save(root / "a.png")
    mask = np.zeros((32, 48), dtype=bool)
    mask[4:20, 6:30] = True
    objects = [
        object_from_mask(mask, 1, 1, category_id=3, score=0.9),
        ObjectRecord(2, 1, 3, (34.0, 20.0, 10.0, 8.0), 80.0),  # a box only
    ]
    return write_store(
        tmp_path / "store", [ImageRecord(1, "a.png", 48, 32)], objects, {3: "cup"}, images_root=root
    )


def test_masks_and_boxes_are_tinted_where_the_objects_are(store):
    pixels = np.asarray(render_objects(store, "a.png"))
    assert pixels.shape == (32, 48, 3)
    tint = np.round(MASK_OPACITY * np.array(object_colour(0))).astype(int)
    assert np.abs(pixels[18, 10].astype(int) - tint).max() <= 1  # inside the mask, below the label
    assert (pixels[24, 38] > 0).any()  # inside the box-only object
    assert (pixels[28, 2] == 0).all()  # on no object: the image unchanged


def test_an_unknown_image_names_the_store(store):
    with pytest.raises(MaskStoreError, match="b.png"):
        render_objects(store, "b.png")


def test_show_writes_a_png_of_the_image_size(store, tmp_path):
    out = tmp_path / "shown.png"
    result = CliRunner().invoke(
        app, ["masks", "show", str(store.path), "--image", "a.png", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    with Image.open(out) as shown:
        assert shown.format == "PNG" and shown.size == (48, 32)
    missing = CliRunner().invoke(
        app, ["masks", "show", str(store.path), "--image", "nope.png", "--out", str(out)]
    )
    assert missing.exit_code == 1


def test_show_respects_exif_orientation(tmp_path, bad_image_corpus):
    from odis_core.masks.store import write_store

    store = write_store(
        tmp_path / "store",
        [ImageRecord(1, "exif_rotated.jpg", 40, 64)],
        [],
        images_root=bad_image_corpus.root,
    )
    assert render_objects(store, "exif_rotated.jpg").size == (40, 64)


def test_stats_and_export_commands(store, tmp_path):
    import json

    figures = tmp_path / "stats.json"
    result = CliRunner().invoke(app, ["masks", "stats", str(store.path), "--json", str(figures)])
    assert result.exit_code == 0, result.output
    written = json.loads(figures.read_text())
    assert written["images"] == 1 and written["objects"] == 2
    assert written["images_with_2-5_objects"] == 1 and written["objects_small"] == 2
    exported = tmp_path / "coco.json"
    result = CliRunner().invoke(app, ["masks", "export", str(store.path), "--out", str(exported)])
    assert result.exit_code == 0, result.output
    assert len(json.loads(exported.read_text())["annotations"]) == 2
