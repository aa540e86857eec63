"""Synthetic scenes: determinism, COCO output, occlusion rules, and mask/pixel agreement."""

import colorsys
import hashlib
import json

import numpy as np
import pytest
from pycocotools.coco import COCO

from odis_core.scenes.synthetic import (
    SCENE_CLASSES,
    SceneConfig,
    compose_scene,
    generate_scenes,
    generate_split,
    render_scene,
    scene_rng,
)

CONFIG_32 = SceneConfig(image_size=32)


@pytest.fixture(scope="module")
def scenes():
    config = SceneConfig()
    return config, [compose_scene(scene_rng(7, index), config) for index in range(150)]


def _tree_bytes(root):
    return {path.relative_to(root).as_posix(): path.read_bytes()
            for path in sorted(root.rglob("*")) if path.is_file()}


def test_same_seed_gives_identical_files_and_another_seed_does_not(tmp_path):
    first = generate_scenes(tmp_path / "a", 6, 4, seed=1, config=CONFIG_32)
    generate_scenes(tmp_path / "b", 6, 4, seed=1, config=CONFIG_32)
    generate_scenes(tmp_path / "c", 6, 4, seed=2, config=CONFIG_32)
    same, again, other = (_tree_bytes(tmp_path / name) for name in "abc")
    assert len(same) == 6 + 4 + 2 and same == again
    assert same.keys() == other.keys()
    changed = [name for name in same if same[name] != other[name]]
    assert len(changed) == len(same)
    assert first["train"].n_images == 6 and first["test"].n_images == 4
    assert not list(tmp_path.rglob("*.tmp"))


def test_train_and_test_share_no_scene(tmp_path):
    splits = generate_scenes(tmp_path, 20, 20, seed=0, config=CONFIG_32)

    def digests(split):
        return {hashlib.sha256(path.read_bytes()).hexdigest()
                for path in splits[split].images_dir.glob("*.png")}

    train, test = digests("train"), digests("test")
    assert len(train) == len(test) == 20
    assert not train & test


def test_object_counts_stay_within_bounds_and_use_the_range(scenes):
    config, composed = scenes
    counts = [len(scene.objects) for scene in composed]
    assert min(counts) == config.min_objects and max(counts) == config.max_objects
    exact = SceneConfig(min_objects=3, max_objects=3)
    assert {len(compose_scene(scene_rng(0, i), exact).objects) for i in range(20)} == {3}


def test_every_class_appears(scenes):
    _, composed = scenes
    assert len(SCENE_CLASSES) >= 8 and len(set(SCENE_CLASSES)) == len(SCENE_CLASSES)
    seen = {obj.category_id for scene in composed for obj in scene.objects}
    assert seen == set(range(1, len(SCENE_CLASSES) + 1))


def test_coco_file_loads_and_matches_the_rendered_visible_masks(tmp_path):
    seed, config = 11, SceneConfig()
    split = generate_split(tmp_path, "val", 12, seed=seed, config=config)
    assert split.images_dir == tmp_path / "val" / "images"
    coco = COCO(str(split.annotations))
    assert {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())} == {
        i + 1: name for i, name in enumerate(SCENE_CLASSES)}
    assert len(coco.getAnnIds()) == split.n_objects
    for index in range(split.n_images):
        image_info = coco.loadImgs(index + 1)[0]
        assert (split.images_dir / image_info["file_name"]).is_file()
        assert image_info["file_name"] == f"val_{index:05d}.png"
        _, objects = render_scene(scene_rng(seed, index), config)
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=[index + 1]))
        assert len(annotations) == len(objects) >= config.min_objects
        for annotation, (category_id, visible) in zip(annotations, objects, strict=True):
            assert annotation["category_id"] == category_id and annotation["iscrowd"] == 0
            assert isinstance(annotation["segmentation"]["counts"], str)
            decoded = coco.annToMask(annotation).astype(bool)
            assert np.array_equal(decoded, visible)
            ys, xs = np.nonzero(visible)
            box = [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert annotation["bbox"] == [float(v) for v in box]
            assert annotation["area"] == visible.sum()


def test_png_pixels_are_the_rendered_scene(tmp_path):
    from PIL import Image

    split = generate_split(tmp_path, "train", 3, seed=5, config=CONFIG_32)
    for index in range(3):
        image, _ = render_scene(scene_rng(5, index), CONFIG_32)
        stored = np.asarray(Image.open(split.images_dir / f"train_{index:05d}.png"))
        assert stored.shape == (32, 32, 3) and np.array_equal(stored, image)


def test_objects_overlap_yet_each_keeps_the_minimum_visible_fraction(scenes):
    config, composed = scenes
    overlapping_pairs = 0
    for scene in composed:
        covered_later = np.zeros_like(scene.objects[0].full_mask)
        for obj in reversed(scene.objects):
            assert np.array_equal(obj.visible_mask, obj.full_mask & ~covered_later)
            overlapping_pairs += int((obj.full_mask & covered_later).any())
            covered_later |= obj.full_mask
            visible = int(obj.visible_mask.sum())
            assert visible >= config.min_visible_fraction * obj.shape_pixels
            assert visible >= config.min_object_pixels
    assert overlapping_pairs >= len(composed) // 5


def test_a_stricter_visibility_rule_is_honoured():
    strict = SceneConfig(min_visible_fraction=0.9, min_object_area=0.03)
    for index in range(40):
        for obj in compose_scene(scene_rng(3, index), strict).objects:
            assert obj.visible_mask.sum() >= 0.9 * obj.shape_pixels
            assert obj.visible_mask.sum() >= 0.03 * 64 * 64


def test_pixels_under_each_visible_mask_are_that_objects_texture(scenes):
    _, composed = scenes
    distinct_from_background = []
    for scene in composed:
        anywhere = np.zeros_like(scene.objects[0].full_mask)
        for obj in scene.objects:
            assert np.array_equal(scene.image[obj.visible_mask], obj.texture_rgb[obj.visible_mask])
            anywhere |= obj.full_mask
            gap = np.abs(obj.texture_rgb.astype(int) - scene.background.astype(int))
            distinct_from_background.append(gap[obj.visible_mask].mean() > 20)
        assert np.array_equal(scene.image[~anywhere], scene.background[~anywhere])
    assert np.mean(distinct_from_background) > 0.9


def _hues_per_class(composed) -> dict[int, list[float]]:
    hues: dict[int, list[float]] = {}
    for scene in composed:
        for obj in scene.objects:
            r, g, b = obj.texture_rgb[obj.full_mask].mean(axis=0) / 255.0
            hues.setdefault(obj.category_id, []).append(colorsys.rgb_to_hsv(r, g, b)[0] * 360)
    return hues


def test_colour_is_drawn_independently_of_the_class(scenes):
    _, composed = scenes
    hues = _hues_per_class(composed)
    everyone = np.concatenate([np.asarray(h) for h in hues.values()])
    bins = np.linspace(0, 360, 7)
    overall = np.histogram(everyone, bins)[0] / len(everyone)
    assert overall.min() > 0.08  # every sixth of the wheel is used
    for category_id, values in hues.items():
        # Each class spreads over the whole wheel like the rest: no class-typical hue.
        per_class = np.histogram(values, bins)[0] / len(values)
        assert (per_class > 0).all(), category_id
        assert np.abs(per_class - overall).max() < 0.2, category_id
    # A nearest-class-mean rule on hue is near chance (it was near perfect with class hues).
    assert _hue_nearest_mean_accuracy(hues) < 0.25


def _hue_nearest_mean_accuracy(hues: dict[int, list[float]]) -> float:
    angles = {c: np.radians(np.asarray(v)) for c, v in hues.items()}
    means = {c: np.arctan2(np.sin(a).mean(), np.cos(a).mean()) for c, a in angles.items()}
    correct = total = 0
    for c, a in angles.items():
        for angle in a:
            distance = {k: abs(np.angle(np.exp(1j * (angle - m)))) for k, m in means.items()}
            correct += min(distance, key=distance.get) == c
            total += 1
    return correct / total


def test_class_hues_give_typical_but_overlapping_colours():
    config = SceneConfig(class_hues=True)
    composed = [compose_scene(scene_rng(7, index), config) for index in range(150)]
    hues = _hues_per_class(composed)
    assert _hue_nearest_mean_accuracy(hues) > 0.6  # the colour cue the default removes
    n_classes, spacing = len(SCENE_CLASSES), 360.0 / len(SCENE_CLASSES)
    for category_id in range(1, n_classes + 1):
        nominal = (category_id - 1) * spacing
        offsets = [(hue - nominal + 180) % 360 - 180 for hue in hues[category_id]]
        # Beyond half the class spacing on both sides: into each neighbour's hue range.
        assert max(offsets) > spacing / 2 and min(offsets) < -spacing / 2


def test_progress_counts_every_image_across_both_splits(tmp_path):
    calls = []
    generate_scenes(tmp_path, 3, 2, config=CONFIG_32, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(done, 5) for done in range(1, 6)]


def test_rerun_with_fewer_images_leaves_no_stale_files(tmp_path):
    generate_split(tmp_path, "train", 5, seed=0, config=CONFIG_32)
    split = generate_split(tmp_path, "train", 2, seed=0, config=CONFIG_32)
    assert sorted(p.name for p in split.images_dir.iterdir()) == ["train_00000.png",
                                                                  "train_00001.png"]
    assert len(json.loads(split.annotations.read_text())["images"]) == 2


@pytest.mark.parametrize("bad", [dict(min_objects=4, max_objects=3), dict(image_size=4),
                                 dict(object_scale=(0.5, 0.2)), dict(min_visible_fraction=0)])
def test_invalid_config_is_rejected(bad):
    with pytest.raises(ValueError, match="SceneConfig"):
        SceneConfig(**bad)
