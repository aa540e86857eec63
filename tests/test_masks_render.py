"""`render_objects` / `odis masks show`: a PNG of the image (small images scaled up) with
the objects' masks, boxes and non-overlapping labels drawn."""

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from odis_cli.app import app
from odis_core.masks.render import (
    MASK_OPACITY,
    MIN_SHORT_SIDE,
    display_scale,
    object_colour,
    place_labels,
    render_objects,
)
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
    scale = display_scale(48, 32)
    assert scale == 16  # a 32-px side becomes MIN_SHORT_SIDE = 512
    pixels = np.asarray(render_objects(store, "a.png"))
    assert pixels.shape == (32 * scale, 48 * scale, 3)

    def at(y, x):  # the centre of the native pixel (y, x) on the enlarged canvas
        return pixels[y * scale + scale // 2, x * scale + scale // 2].astype(int)

    tint = np.round(MASK_OPACITY * np.array(object_colour(0))).astype(int)
    assert np.abs(at(12, 10) - tint).max() <= 1  # inside the mask
    assert (at(24, 38) > 0).any()  # inside the box-only object
    assert (at(28, 2) == 0).all()  # on no object: the image unchanged


def test_photos_are_not_scaled():
    assert display_scale(800, 600) == 1 and display_scale(MIN_SHORT_SIDE, 4000) == 1


def test_labels_of_crowded_objects_do_not_overlap():
    # Ten objects whose boxes all start at the same corner: every label wants one spot.
    boxes = [(40.0, 40.0, 40.0 + 20 * i, 60.0 + 10 * i) for i in range(1, 11)]
    placed = place_labels(boxes, [(90, 22)] * 10, (512, 512))
    for i, a in enumerate(placed):
        assert 0 <= a[0] and a[2] <= 512 and 0 <= a[1] and a[3] <= 512
        for b in placed[i + 1:]:
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]), (a, b)
    assert placed[0] == (40.0, 18.0, 130.0, 40.0)  # the first sits just above its box


def test_crowded_tiny_image_renders_labels_apart(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    Image.new("RGB", (24, 24), (0, 0, 0)).save(root / "t.png")
    objects = [ObjectRecord(i, 1, 1, (2.0, 2.0, 6.0 + i, 6.0 + i), 36.0) for i in range(1, 7)]
    store = write_store(tmp_path / "store", [ImageRecord(1, "t.png", 24, 24)], objects,
                        {1: "shirt"}, images_root=root)
    canvas = render_objects(store, "t.png")
    assert min(canvas.size) >= MIN_SHORT_SIDE
    # Each label tag is a filled block of its object's colour: six distinct colours appear.
    colours = {tuple(c) for c in np.asarray(canvas).reshape(-1, 3)}
    assert all(object_colour(i) in colours for i in range(6))


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
        assert shown.format == "PNG" and shown.size == (48 * 16, 32 * 16)
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
    scale = display_scale(40, 64)
    assert render_objects(store, "exif_rotated.jpg").size == (40 * scale, 64 * scale)


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
