"""COCO import: every segmentation form decodes to the source pixels; filters and errors."""

import contextlib
import io
import json

import numpy as np
import pytest
from bad_inputs import bad_annotation_cases, good_annotations
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from odis_core.masks.coco import CocoFormatError, import_coco
from odis_core.masks.store import export_coco, read_store


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths over the column-major pixels, zeros first."""
    flat = mask.flatten(order="F").astype(np.uint8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat[0]:
        runs = [0, *runs]
    return {"size": list(mask.shape), "counts": runs}


def compressed_rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def coco_dataset() -> dict:
    """Image 1 (30x40): two-part polygon, compressed RLE, a box only.
    Image 2 (24x32): uncompressed RLE, a crowd region, a tiny polygon.
    Image 3 (20x20): no annotation."""
    rle_mask = np.zeros((30, 40), dtype=bool)
    rle_mask[5:25, 20:38] = True
    rle_mask[10:15, 25:30] = False  # a hole: only RLE can say this
    uncompressed_mask = np.zeros((24, 32), dtype=bool)
    uncompressed_mask[0:12, 3:20] = True  # touches the first pixel row: run starts at 0
    crowd_mask = np.zeros((24, 32), dtype=bool)
    crowd_mask[14:22, 1:30] = True
    polygon = [[2.0, 2.0, 14.0, 2.5, 13.0, 15.0, 3.0, 12.0], [15.5, 20.0, 19.0, 20.0, 17.0, 27.0]]
    annotations = [
        {"id": 11, "image_id": 1, "category_id": 1, "segmentation": polygon, "iscrowd": 0,
         "area": 1.0, "bbox": [0, 0, 1, 1]},
        {"id": 12, "image_id": 1, "category_id": 2, "segmentation": compressed_rle(rle_mask),
         "iscrowd": 0, "area": 1.0, "bbox": [0, 0, 1, 1]},
        {"id": 13, "image_id": 1, "category_id": 1, "bbox": [2.0, 20.0, 10.0, 5.0],
         "score": 0.75},
        {"id": 21, "image_id": 2, "category_id": 2,
         "segmentation": uncompressed_rle(uncompressed_mask), "iscrowd": 0},
        {"id": 22, "image_id": 2, "category_id": 1,
         "segmentation": uncompressed_rle(crowd_mask), "iscrowd": 1},
        # The stated area lies: the filter must use the decoded mask's area.
        {"id": 23, "image_id": 2, "category_id": 1,
         "segmentation": [[25.0, 2.0, 27.0, 2.0, 27.0, 4.0, 25.0, 4.0]], "iscrowd": 0,
         "area": 5000.0},
    ]
    return {
        "images": [
            {"id": 1, "file_name": "a.png", "width": 40, "height": 30},
            {"id": 2, "file_name": "sub/b.png", "width": 32, "height": 24},
            {"id": 3, "file_name": "c.png", "width": 20, "height": 20},
        ],
        "annotations": annotations,
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
    }


@pytest.fixture
def coco_file(tmp_path):
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(coco_dataset()))
    return path


@pytest.fixture
def images_root(tmp_path):
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    Image.new("RGB", (40, 30)).save(root / "a.png")
    Image.new("RGB", (32, 24)).save(root / "sub" / "b.png")
    return root  # c.png is missing on disk


def source_masks(path) -> dict[int, np.ndarray]:
    with contextlib.redirect_stdout(io.StringIO()):
        source = COCO(str(path))
    return {
        ann_id: source.annToMask(ann).astype(bool)
        for ann_id, ann in source.anns.items()
        if "segmentation" in ann
    }


def test_store_masks_equal_source_masks_pixel_for_pixel(coco_file, images_root, tmp_path):
    out = tmp_path / "store"
    store, report = import_coco(coco_file, out, images_root=images_root, min_area=10)
    expected = source_masks(coco_file)
    with contextlib.redirect_stdout(io.StringIO()):
        reread = COCO(str(export_coco(store, tmp_path / "export.json")))
    with_masks = [obj for obj in store.objects if obj.rle is not None]
    assert sorted(obj.object_id for obj in with_masks) == [11, 12, 21]
    for obj in with_masks:
        assert isinstance(obj.rle["counts"], str)
        np.testing.assert_array_equal(mask_utils.decode(obj.rle).astype(bool),
                                      expected[obj.object_id])
        np.testing.assert_array_equal(reread.annToMask(reread.anns[obj.object_id]).astype(bool),
                                      expected[obj.object_id])
        assert obj.area == expected[obj.object_id].sum()
    assert {obj.object_id: obj.category_id for obj in store.objects} == {11: 1, 12: 2, 13: 1,
                                                                          21: 2}
    assert store.categories == {1: "cat", 2: "dog"}
    assert report.n_objects == 4


def test_crowd_small_and_box_only_objects(coco_file, images_root, tmp_path):
    store, report = import_coco(coco_file, tmp_path / "store", images_root=images_root,
                                min_area=10)
    assert report.n_crowd_dropped == 1
    assert report.n_small_dropped == 1  # the tiny polygon (despite its stated area)
    box_only = [obj for obj in store.objects if obj.rle is None]
    assert [obj.object_id for obj in box_only] == [13]
    assert box_only[0].bbox_xywh == (2.0, 20.0, 10.0, 5.0)
    assert box_only[0].area == 50.0 and box_only[0].score == 0.75
    assert report.n_boxes_only == 1
    # Without the area filter the tiny polygon is an object.
    _, unfiltered = import_coco(coco_file, tmp_path / "store0")
    assert unfiltered.n_small_dropped == 0 and unfiltered.n_objects == 5


def test_every_image_is_listed_and_missing_files_are_counted(coco_file, images_root, tmp_path):
    out = tmp_path / "store"
    _, report = import_coco(coco_file, out, images_root=images_root, min_area=10)
    reopened = read_store(out)
    assert [image.file_name for image in reopened.images] == ["a.png", "sub/b.png", "c.png"]
    assert reopened.objects_of(3) == []
    assert report.n_images == 3 and report.n_images_without_objects == 1
    assert report.n_missing_images == 1
    assert reopened.source == "coco"
    assert reopened.images_root == str(images_root.resolve())
    assert reopened.settings["min_area"] == 10


def test_max_objects_keeps_the_largest(coco_file, tmp_path):
    expected = source_masks(coco_file)
    areas = {11: expected[11].sum(), 12: expected[12].sum(), 13: 50}
    store, report = import_coco(coco_file, tmp_path / "store", max_objects_per_image=2)
    kept = sorted(obj.object_id for obj in store.objects_of(1))
    assert kept == sorted(sorted(areas, key=areas.get)[-2:])
    assert report.n_over_max_dropped == 1
    assert len(store.objects_of(2)) == 2  # uncompressed RLE and the tiny polygon: both fit


def test_nothing_is_printed_and_progress_reaches_the_end(coco_file, tmp_path, capsys):
    calls = []
    import_coco(coco_file, tmp_path / "store", progress=lambda done, total: calls.append(
        (done, total)))
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    assert calls[-1] == (3, 3)


def test_malformed_json_names_the_file_and_writes_nothing(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"images": [')
    with pytest.raises(CocoFormatError, match=str(path)):
        import_coco(path, tmp_path / "store")
    assert not (tmp_path / "store").exists()


def test_unknown_image_id_names_the_file_and_writes_nothing(tmp_path):
    dataset = coco_dataset()
    dataset["annotations"][0]["image_id"] = 99
    path = tmp_path / "unknown.json"
    path.write_text(json.dumps(dataset))
    with pytest.raises(CocoFormatError, match=str(path)) as raised:
        import_coco(path, tmp_path / "store")
    assert "99" in str(raised.value) and "\n" not in str(raised.value)
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: d.pop("annotations"),
        lambda d: d["images"][0].pop("width"),
        lambda d: d["annotations"][1]["segmentation"].update(size=[7, 7]),
        lambda d: d["annotations"][2].pop("bbox"),
    ],
    ids=["no-annotations", "image-without-width", "rle-size-mismatch", "box-only-without-bbox"],
)
def test_missing_keys_raise_a_format_error(tmp_path, damage):
    dataset = coco_dataset()
    damage(dataset)
    path = tmp_path / "damaged.json"
    path.write_text(json.dumps(dataset))
    with pytest.raises(CocoFormatError, match=str(path)):
        import_coco(path, tmp_path / "store")
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize(
    ("content", "words"),
    [pytest.param(content, words, id=name) for name, content, words in bad_annotation_cases()],
)
def test_each_bad_annotation_file_fails_before_any_work(tmp_path, bad_image_corpus, content,
                                                        words):
    path = tmp_path / "bad.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(CocoFormatError) as raised:
        import_coco(path, tmp_path / "store", images_root=bad_image_corpus.root)
    message = str(raised.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert words in message, message
    assert not (tmp_path / "store").exists()


def test_unreadable_images_are_listed_in_the_store_report(tmp_path, bad_image_corpus):
    dataset = good_annotations()
    names = ["plain.jpg", "gray.png", *bad_image_corpus.unreadable, "absent.jpg"]
    dataset["images"] = [
        {"id": i, "file_name": name, "width": 64, "height": 48}
        for i, name in enumerate(names, start=1)
    ]
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(dataset))
    store, report = import_coco(path, tmp_path / "store", images_root=bad_image_corpus.root)
    listed = [line.split(":")[0] for line in store.skipped]
    expected = sorted([*bad_image_corpus.unreadable, "absent.jpg"])
    assert sorted(listed) == expected
    assert report.n_missing_images == len(expected)
    assert (tmp_path / "store" / "skipped.txt").read_text().count("\n") == len(expected)


def test_coco_round_trip_is_lossless(coco_file, tmp_path):
    first = import_coco(coco_file, tmp_path / "first")[0]
    exported = export_coco(first, tmp_path / "first.json")
    second = import_coco(exported, tmp_path / "second")[0]
    assert list(second.images) == list(first.images)
    assert list(second.objects) == list(first.objects)
    assert second.categories == first.categories
    assert export_coco(second, tmp_path / "second.json").read_text() == exported.read_text()
    with contextlib.redirect_stdout(io.StringIO()):
        reloaded = COCO(str(exported))
    assert sorted(reloaded.anns) == sorted(obj.object_id for obj in first.objects)


def test_a_store_spans_several_shards_and_reads_back_by_id(coco_file, tmp_path):
    from odis_core.masks.store import write_store

    one = import_coco(coco_file, tmp_path / "one")[0]
    many = write_store(tmp_path / "many", list(one.images), list(one.objects), one.categories,
                       shard_images=1)
    assert len(list((tmp_path / "many" / "shards").iterdir())) == 3
    for image in one.images:
        assert many.objects_of(image.image_id) == one.objects_of(image.image_id)
        assert many.image(image.image_id) == image
        assert many.image_by_name(image.file_name) == image
    assert many.objects_of(12345) == []
    assert list(many.object_counts()) == [len(one.objects_of(i.image_id)) for i in one.images]


def test_a_version_one_store_asks_for_a_conversion(tmp_path):
    from odis_core.masks.store import MaskStoreError

    old = tmp_path / "old"
    old.mkdir()
    (old / "manifest.json").write_text(json.dumps({"format": "odis-mask-store", "version": 1}))
    with pytest.raises(MaskStoreError, match="odis masks coco --annotations"):
        read_store(old)


def test_objects_annotated_on_the_stored_frame_are_turned_upright(tmp_path, bad_image_corpus):
    # exif_rotated.jpg is stored 64x40 and shown 40x64 (orientation 6: 90 degrees clockwise).
    raw = np.zeros((40, 64), dtype=bool)
    raw[2:12, 5:30] = True
    dataset = {
        "images": [{"id": 1, "file_name": "exif_rotated.jpg", "width": 64, "height": 40}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "segmentation": compressed_rle(raw)},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [40.0, 20.0, 10.0, 5.0]},
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(dataset))
    store, report = import_coco(path, tmp_path / "store", images_root=bad_image_corpus.root)
    assert report.n_exif_rotated == 1
    image = store.image(1)
    assert (image.width, image.height) == (40, 64)  # the size load_rgb gives
    mask, box = store.objects_of(1)
    np.testing.assert_array_equal(store.decode(mask, 64, 40), np.rot90(raw, k=-1))
    # Box x 40..50, y 20..25 in the stored frame -> x 40-25..40-20, y 40..50 upright.
    assert box.rle is None and box.bbox_xywh == (15.0, 40.0, 5.0, 10.0)
