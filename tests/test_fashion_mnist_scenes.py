"""Scenes of Fashion-MNIST items: IDX reading, split hygiene, masks, occlusion, determinism.

The fixture source (tests/conftest.py) has square train items and ring test items, so a
test item in a train scene would show in its silhouette, whatever the annotations claim.
"""

import gzip
import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from odis_core.masks.coco import import_coco
from odis_core.scenes.fashion_mnist import (
    FashionSceneConfig,
    SourceDataError,
    compose_fashion_scene,
    generate_fashion_scenes,
    load_items,
    read_idx,
)
from odis_core.scenes.synthetic import scene_rng, split_seed

SMALL = FashionSceneConfig(canvas_size=48)


def _centre_is_filled(item) -> bool:
    """Whether the middle 2 x 2 pixels of the pasted item square are in its silhouette:
    always for the fixture's square train items, never for its ring test items."""
    x0, y0, x1, y1 = item.box_xyxy
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    centre = item.full_mask[cy - 1 : cy + 1, cx - 1 : cx + 1]
    assert centre.all() or not centre.any()
    return bool(centre.all())


def _scenes(items, n, seed=0, config=SMALL):
    return [compose_fashion_scene(scene_rng(seed, i), items, config) for i in range(n)]


# --------------------------------------------------------------------------- IDX source


def test_read_idx_gzipped_and_raw_give_the_same_array(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = bytes([0, 0, 8, 3]) + (2).to_bytes(4, "big") + (3).to_bytes(4, "big")
    raw += (4).to_bytes(4, "big") + array.tobytes()
    (tmp_path / "a").write_bytes(raw)
    (tmp_path / "a.gz").write_bytes(gzip.compress(raw))
    np.testing.assert_array_equal(read_idx(tmp_path / "a"), array)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), array)


@pytest.mark.parametrize(
    "content, problem",
    [
        (b"\x89PNG\r\n\x1a\n", "bad magic"),
        (bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + b"\x00" * 9, "promises 10 data bytes"),
        (bytes([0, 0, 8, 3, 0, 0]), "truncated"),
    ],
)
def test_read_idx_names_the_file_and_the_problem(tmp_path, content, problem):
    path = tmp_path / "train-labels-idx1-ubyte"
    path.write_bytes(content)
    with pytest.raises(SourceDataError, match=problem) as error:
        read_idx(path)
    assert str(path) in str(error.value)


def test_load_items_reads_both_spellings_and_checks_the_source(fashion_idx_dir, tmp_path):
    train, test = load_items(fashion_idx_dir, "train"), load_items(fashion_idx_dir, "test")
    assert train.images.shape == (40, 28, 28) and test.images.shape == (20, 28, 28)
    assert train.labels.tolist() == [i % 10 for i in range(40)]
    with pytest.raises(SourceDataError, match="no train-images-idx3-ubyte"):
        load_items(tmp_path, "train")
    (fashion_idx_dir / "t10k-labels.idx1-ubyte").write_bytes(
        bytes([0, 0, 8, 1]) + (3).to_bytes(4, "big") + bytes([0, 1, 2])
    )
    with pytest.raises(SourceDataError, match="expected 20 labels"):
        load_items(fashion_idx_dir, "test")


def test_labels_outside_the_ten_classes_are_refused(make_fashion_idx_dir):
    source = make_fashion_idx_dir("bad", n_train=3, train_labels=[0, 1, 12])
    with pytest.raises(SourceDataError, match="labels must be 0..9"):
        load_items(source, "train")


# --------------------------------------------------------------------------- scenes


def test_no_test_item_reaches_a_train_scene(make_fashion_idx_dir, tmp_path):
    # Disjoint classes per split as well as disjoint shapes: the written files are checked
    # twice, by category and by what the pasted silhouettes look like.
    source = make_fashion_idx_dir(
        "disjoint",
        train_labels=[i % 5 for i in range(40)],
        test_labels=[5 + i % 5 for i in range(20)],
    )
    splits = generate_fashion_scenes(source, tmp_path / "scenes", 12, 8, seed=3, config=SMALL)
    for split, allowed in (("train", set(range(1, 6))), ("test", set(range(6, 11)))):
        coco = json.loads(splits[split].annotations.read_text())
        assert {a["category_id"] for a in coco["annotations"]} <= allowed
        assert {a["source_split"] for a in coco["annotations"]} == {split}
    items = {split: load_items(source, split) for split in ("train", "test")}
    for split, squares in (("train", True), ("test", False)):
        for scene in _scenes(items[split], 12, seed=split_seed(3, split)):
            for item in scene.items:
                assert _centre_is_filled(item) == squares, split


def test_masks_are_the_pasted_silhouettes(fashion_idx_dir):
    items = load_items(fashion_idx_dir, "train")
    for scene in _scenes(items, 10):
        covered = np.zeros(scene.image.shape[:2], dtype=bool)
        for position, item in enumerate(scene.items):
            x0, y0, x1, y1 = item.box_xyxy
            source = Image.fromarray(items.images[item.source_index])
            resized = np.asarray(source.resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR))
            expected = np.zeros_like(item.full_mask)
            expected[y0:y1, x0:x1] = resized >= SMALL.silhouette_threshold
            np.testing.assert_array_equal(item.full_mask, expected)
            later = np.zeros_like(covered)
            for other in scene.items[position + 1 :]:
                later |= other.full_mask
            np.testing.assert_array_equal(item.visible_mask, item.full_mask & ~later)
            np.testing.assert_array_equal(
                scene.image[item.visible_mask], item.paint_rgb[item.visible_mask]
            )
            assert item.category_id == items.labels[item.source_index] + 1
            covered |= item.full_mask
        np.testing.assert_array_equal(scene.image[~covered], scene.background[~covered])


def test_written_annotations_decode_to_the_visible_masks(fashion_idx_dir, tmp_path):
    splits = generate_fashion_scenes(fashion_idx_dir, tmp_path, 5, 3, seed=7, config=SMALL)
    test_items = load_items(fashion_idx_dir, "test")
    coco = json.loads(splits["test"].annotations.read_text())
    for image in coco["images"]:
        index = image["id"] - 1
        scene = compose_fashion_scene(scene_rng(split_seed(7, "test"), index), test_items, SMALL)
        annotations = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
        assert len(annotations) == len(scene.items)
        for annotation, item in zip(annotations, scene.items, strict=True):
            decoded = mask_utils.decode(annotation["segmentation"]).astype(bool)
            np.testing.assert_array_equal(decoded, item.visible_mask)
            assert annotation["source_index"] == item.source_index
        png = np.asarray(Image.open(splits["test"].images_dir / image["file_name"]))
        np.testing.assert_array_equal(png, scene.image)


@pytest.mark.parametrize(
    "limit, scale", [(0.0, (0.3, 0.45)), (0.25, (0.5, 0.8)), (0.5, (0.5, 0.8))]
)
def test_occlusion_limit_is_respected(fashion_idx_dir, limit, scale):
    items = load_items(fashion_idx_dir, "train")
    config = FashionSceneConfig(
        canvas_size=48,
        object_scale=scale,
        occlusion_limit=limit,
        min_objects=2,
        max_objects=4,
        min_object_area=0.0,
    )
    for scene in _scenes(items, 25, seed=11, config=config):
        assert 2 <= len(scene.items) <= 4
        for item in scene.items:
            assert item.visible_mask.sum() >= (1 - limit) * item.full_mask.sum()


def test_a_loose_occlusion_limit_does_let_items_hide_each_other(fashion_idx_dir):
    # Without this, the test above could pass on scenes that never overlap at all.
    items = load_items(fashion_idx_dir, "train")
    config = FashionSceneConfig(
        canvas_size=48, object_scale=(0.5, 0.8), occlusion_limit=0.95, min_object_area=0.0
    )
    fractions = [
        item.visible_mask.sum() / item.full_mask.sum()
        for scene in _scenes(items, 25, seed=11, config=config)
        for item in scene.items
    ]
    assert min(fractions) < 0.5


def test_options_change_the_scenes(fashion_idx_dir):
    items = load_items(fashion_idx_dir, "train")
    grey = _scenes(
        items, 3, config=FashionSceneConfig(canvas_size=48, tint=0.0, background="black")
    )
    for scene in grey:
        assert not scene.background.any()
        for item in scene.items:
            painted = item.paint_rgb[item.full_mask].astype(int)
            assert (painted.max(axis=1) - painted.min(axis=1)).max() <= 1  # grey: R = G = B
    tinted = _scenes(items, 3, config=FashionSceneConfig(canvas_size=48, tint=1.0))
    spreads = [
        np.ptp(item.paint_rgb[item.full_mask].astype(int), axis=1).max()
        for scene in tinted
        for item in scene.items
    ]
    assert max(spreads) > 60
    assert all(s.image.shape == (48, 48, 3) for s in grey)


def test_same_seed_same_bytes_other_seed_other_scenes(fashion_idx_dir, tmp_path):
    first = generate_fashion_scenes(fashion_idx_dir, tmp_path / "a", 4, 2, seed=5, config=SMALL)
    second = generate_fashion_scenes(fashion_idx_dir, tmp_path / "b", 4, 2, seed=5, config=SMALL)
    other = generate_fashion_scenes(fashion_idx_dir, tmp_path / "c", 4, 2, seed=6, config=SMALL)
    for split in ("train", "test"):
        assert first[split].annotations.read_bytes() == second[split].annotations.read_bytes()
        for path in sorted(first[split].images_dir.iterdir()):
            assert path.read_bytes() == (second[split].images_dir / path.name).read_bytes()
        assert first[split].annotations.read_bytes() != other[split].annotations.read_bytes()


def test_the_scenes_import_into_a_mask_store(fashion_idx_dir, tmp_path):
    splits = generate_fashion_scenes(fashion_idx_dir, tmp_path, 4, 2, config=SMALL)
    store, report = import_coco(
        splits["train"].annotations, tmp_path / "store", images_root=splits["train"].images_dir
    )
    assert len(store.objects) == splits["train"].n_objects and report.n_missing_images == 0
    assert store.category_name(8) == "Sneaker"


@pytest.mark.parametrize(
    "field, value",
    [
        ("tint", 1.5),
        ("occlusion_limit", 1.0),
        ("background", "stripes"),
        ("min_objects", 0),
        ("object_scale", (0.5, 0.2)),
    ],
)
def test_bad_config_is_refused_with_its_name(field, value):
    with pytest.raises(ValueError, match=field):
        FashionSceneConfig(**{field: value})
