"""SAM source: a tiny random SAM runs the real load_sam -> generator -> store path."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from segment_anything import SamAutomaticMaskGenerator

from odis_core.images import load_rgb
from odis_core.masks.sam import (
    JOURNAL_DIR,
    SamError,
    generate_sam_masks,
    load_sam,
    select_masks,
)
from odis_core.masks.store import (
    UNKNOWN_CATEGORY,
    ImageRecord,
    export_coco,
    read_store,
    write_store,
)

# Few prompts and no quality thresholds, so a random SAM still yields masks.
GENERATOR = {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
READABLE = ["a.png", "b.png", "sub/c.png"]


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, (height, width) in zip(READABLE, [(48, 64), (48, 64), (64, 40)], strict=True):
        pixels = np.zeros((height, width, 3), dtype=np.uint8)
        pixels[:] = rng.integers(0, 256, 3)
        for _ in range(2):
            y, x = rng.integers(0, height // 2), rng.integers(0, width // 2)
            pixels[y : y + height // 3, x : x + width // 3] = rng.integers(0, 256, 3)
        Image.fromarray(pixels).save(root / name)
    (root / "broken.jpg").write_text("not a jpeg")
    return root


@pytest.fixture
def sam(tiny_sam_checkpoint):
    return load_sam("vit_b", tiny_sam_checkpoint)


def run(sam, image_folder, out, **kwargs):
    kwargs.setdefault("generator_kwargs", GENERATOR)
    return generate_sam_masks(image_folder, out, sam, **kwargs)


def generator_records(sam, path):
    """What SAM's generator itself returns for one image, with the same settings."""
    generator = SamAutomaticMaskGenerator(sam, output_mode="coco_rle", **GENERATOR)
    with torch.inference_mode():
        return generator.generate(np.asarray(load_rgb(path)))


def quality(record):
    value = record["predicted_iou"] * record["stability_score"]
    return value if math.isfinite(value) else -math.inf


def test_store_lists_every_readable_image_with_valid_masks(sam, image_folder, tmp_path):
    store, report = run(sam, image_folder, tmp_path / "store")
    assert [image.file_name for image in store.images] == READABLE  # sorted, broken left out
    assert report.n_images == 3 and report.n_skipped == 1
    assert report.skipped[0].startswith("broken.jpg: ")
    assert report.n_objects == len(store.objects) > 0
    for image in store.images:
        width, height = Image.open(image_folder / image.file_name).size
        assert (image.width, image.height) == (width, height)
        for obj in store.objects_of(image.image_id):
            assert obj.rle["size"] == [height, width] and isinstance(obj.rle["counts"], str)
            decoded = mask_utils.decode(obj.rle)
            assert decoded.shape == (height, width)
            assert obj.area == decoded.sum() > 0
            assert obj.bbox_xywh == tuple(mask_utils.toBbox(obj.rle))
            assert obj.category_id == UNKNOWN_CATEGORY
    reopened = read_store(tmp_path / "store")
    assert reopened.source == "sam" and reopened.categories == {}
    assert reopened.settings == {
        "model_type": "vit_b",
        "checkpoint": "tiny_sam_vit_b.pth",
        "generator_kwargs": GENERATOR,
        "max_masks": None,
        "min_area": 0.0,
    }
    assert len(reopened.objects) == len(store.objects)
    assert reopened.skipped == [report.skipped[0]]  # the store's skipped.txt


def test_max_masks_keeps_the_best_by_iou_times_stability(sam, image_folder, tmp_path):
    records = [r for r in generator_records(sam, image_folder / "a.png") if r["area"] > 0]
    records.sort(key=quality, reverse=True)
    # A cut between two different qualities, so the expected set is unambiguous.
    keep = next(k for k in range(2, len(records)) if quality(records[k - 1]) > quality(records[k]))
    store, _ = run(sam, image_folder, tmp_path / "store", max_masks=keep)
    stored = [obj.rle["counts"] for obj in store.objects_of(store.image_by_name("a.png").image_id)]
    assert stored == [r["segmentation"]["counts"] for r in records[:keep]]
    assert [obj.score for obj in store.objects_of(1)] == [r["predicted_iou"] for r in
                                                          records[:keep]]
    assert all(len(store.objects_of(image.image_id)) <= keep for image in store.images)


def test_min_area_drops_small_masks(sam, image_folder, tmp_path):
    everything, _ = run(sam, image_folder, tmp_path / "all")
    areas = sorted(obj.area for obj in everything.objects)
    threshold = areas[len(areas) // 2]
    store, _ = run(sam, image_folder, tmp_path / "large", min_area=threshold)
    assert sorted(obj.area for obj in store.objects) == [a for a in areas if a >= threshold]


def test_select_masks_ranks_by_iou_times_stability():
    records = [
        {"area": 50, "predicted_iou": 0.9, "stability_score": 0.1},  # 0.09
        {"area": 40, "predicted_iou": 0.5, "stability_score": 0.9},  # 0.45
        {"area": 30, "predicted_iou": 0.7, "stability_score": 0.5},  # 0.35
        {"area": 0, "predicted_iou": 0.99, "stability_score": 1.0},  # empty: never kept
        {"area": 20, "predicted_iou": 0.8, "stability_score": float("nan")},  # ranks last
        {"area": 5, "predicted_iou": 0.6, "stability_score": 0.9},  # under min_area
    ]
    kept = select_masks(records, max_masks=2, min_area=10)
    assert [r["area"] for r in kept] == [40, 30]
    assert [r["area"] for r in select_masks(records, min_area=10)] == [40, 30, 50, 20]


def coco_text(store_dir):
    """The store's content as COCO JSON text (image order, ids, RLEs, scores)."""
    exported = store_dir.parent / f"{store_dir.name}.coco.json"
    return export_coco(read_store(store_dir), exported).read_text()


def test_runs_are_deterministic(sam, image_folder, tmp_path):
    run(sam, image_folder, tmp_path / "first")
    run(sam, image_folder, tmp_path / "second")
    first = coco_text(tmp_path / "first")
    assert first == coco_text(tmp_path / "second")


def count_generate_calls(monkeypatch):
    calls = []
    original = SamAutomaticMaskGenerator.generate

    def counted(self, image):
        calls.append(image.shape)
        return original(self, image)

    monkeypatch.setattr(SamAutomaticMaskGenerator, "generate", counted)
    return calls


def test_rerun_after_interruption_resumes(sam, image_folder, tmp_path, monkeypatch):
    run(sam, image_folder, tmp_path / "reference")
    out = tmp_path / "store"

    def interrupt_after_first_image(done, total):
        if done == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(sam, image_folder, out, progress=interrupt_after_first_image)
    assert not (out / "manifest.json").exists()  # no partial store

    calls = count_generate_calls(monkeypatch)
    store, report = run(sam, image_folder, out)
    assert len(calls) == 2 and report.n_resumed == 1  # b.png and sub/c.png only
    assert report.n_images == 3 and report.n_skipped == 1
    reference = coco_text(tmp_path / "reference")
    assert coco_text(out) == reference

    _, again = run(sam, image_folder, out)  # over a complete store: nothing to segment
    assert len(calls) == 2 and again.n_resumed == 3
    assert coco_text(out) == reference


def test_shards_split_the_folder_and_the_last_one_writes_the_store(
    sam, image_folder, tmp_path, monkeypatch
):
    run(sam, image_folder, tmp_path / "reference")
    out = tmp_path / "store"
    calls = count_generate_calls(monkeypatch)
    first, first_report = run(sam, image_folder, out, shard=(0, 2))  # a.png, broken.jpg
    assert first is None and not first_report.complete
    assert not (out / "manifest.json").exists()
    assert first_report.n_images == 1 and first_report.n_skipped == 1 and len(calls) == 1
    second, second_report = run(sam, image_folder, out, shard=(1, 2))  # b.png, sub/c.png
    assert second is not None and second_report.complete and len(calls) == 3
    reference = coco_text(tmp_path / "reference")
    assert coco_text(out) == reference


def test_rerun_with_other_settings_is_refused(sam, image_folder, tmp_path):
    out = tmp_path / "store"
    run(sam, image_folder, out)
    with pytest.raises(SamError, match="min_area") as raised:
        run(sam, image_folder, out, min_area=5.0)
    assert str(out / JOURNAL_DIR) in str(raised.value)
    # Without the journal the finished store's manifest still protects the earlier masks.
    shutil.rmtree(out / JOURNAL_DIR)
    with pytest.raises(SamError, match="manifest.json.*min_area"):
        run(sam, image_folder, out, min_area=5.0)
    assert read_store(out).settings["min_area"] == 0.0


def test_a_coco_store_is_never_overwritten(sam, image_folder, tmp_path):
    out = tmp_path / "store"
    write_store(out, [], [], source="coco")
    with pytest.raises(SamError, match="coco"):
        run(sam, image_folder, out)
    assert read_store(out).source == "coco"


def test_load_sam_errors_name_the_file(tiny_sam_checkpoint, tmp_path):
    with pytest.raises(SamError, match="vit_x"):
        load_sam("vit_x", tiny_sam_checkpoint)
    missing = tmp_path / "missing.pth"
    with pytest.raises(SamError, match=str(missing)):
        load_sam("vit_b", missing)

    state = torch.load(tiny_sam_checkpoint, weights_only=True)
    state["image_encoder.pos_embed"] = torch.zeros(1, 8, 8, 32)  # another input size
    wrong = tmp_path / "wrong_shape.pth"
    torch.save(state, wrong)
    with pytest.raises(SamError, match=str(wrong)) as raised:
        load_sam("vit_b", wrong)
    assert "do not fit" in str(raised.value) and "\n" not in str(raised.value)

    garbage = tmp_path / "garbage.pth"
    garbage.write_text("not a checkpoint")
    with pytest.raises(SamError, match=str(garbage)) as raised:
        load_sam("vit_b", garbage)
    assert "\n" not in str(raised.value)


def test_generator_settings_reach_sam(sam, image_folder, tmp_path):
    dense, _ = run(sam, image_folder, tmp_path / "dense",
                   generator_kwargs={**GENERATOR, "points_per_side": 6})
    sparse, _ = run(sam, image_folder, tmp_path / "sparse",
                    generator_kwargs={**GENERATOR, "points_per_side": 1})
    assert len(sparse.objects) < len(dense.objects)
    with pytest.raises(SamError, match="no_such_setting"):
        run(sam, image_folder, tmp_path / "bad", generator_kwargs={"no_such_setting": 1})
    json.dumps(read_store(tmp_path / "dense").settings)  # plain data


def test_batches_of_images_give_the_same_store(sam, image_folder, tmp_path):
    one, _ = run(sam, image_folder, tmp_path / "one")
    batched, _ = run(sam, image_folder, tmp_path / "batched", batch_size=3)
    assert list(batched.images) == list(one.images)
    # A batched matmul rounds differently in the last bit (1e-6 on embeddings of ~3); the
    # tiny SAM's logit scale of 300 can flip a pixel or two of a low-score mask.
    for image in one.images:
        got, want = batched.objects_of(image.image_id), one.objects_of(image.image_id)
        assert len(got) == len(want)
        for a, b in zip(got, want, strict=True):
            assert mask_utils.iou([a.rle], [b.rle], [0])[0, 0] > 0.8
            assert a.score == pytest.approx(b.score, abs=1e-3)


def test_the_bad_image_corpus_is_segmented_or_skipped_and_listed(sam, tmp_path,
                                                                 bad_image_corpus):
    store, report = run(sam, bad_image_corpus.root, tmp_path / "store", batch_size=4)
    assert {i.file_name: (i.width, i.height) for i in store.images} == bad_image_corpus.readable
    assert sorted(line.split(":")[0] for line in store.skipped) == bad_image_corpus.unreadable
    assert report.n_skipped == len(bad_image_corpus.unreadable)
    # Masks are made on the EXIF-rotated image, the one crops and embeddings read.
    rotated = store.image_by_name("exif_rotated.jpg")
    for obj in store.objects_of(rotated.image_id):
        assert obj.rle["size"] == [64, 40]


def test_three_shards_cover_every_image_exactly_once(sam, image_folder, tmp_path):
    out = tmp_path / "store"
    stores = [run(sam, image_folder, out, shard=(i, 3))[0] for i in range(3)]
    assert stores[0] is None and stores[1] is None and stores[2] is not None
    per_shard = []
    for i in range(3):
        lines = (out / "sam_journal" / f"shard-{i}-of-3.jsonl").read_text().splitlines()[1:]
        per_shard.append([json.loads(line)["file_name"] for line in lines])
    everything = sorted(name for names in per_shard for name in names)
    assert everything == sorted([*READABLE, "broken.jpg"])  # each once, none missing
    assert [image.file_name for image in stores[2].images] == READABLE


def test_a_version_one_sam_store_is_rewritten_by_a_rerun(sam, image_folder, tmp_path):
    out = tmp_path / "store"
    first, _ = run(sam, image_folder, out)
    expected = coco_text(out)
    manifest = json.loads((out / "manifest.json").read_text())
    old = {k: manifest[k] for k in ("format", "source", "images_root", "settings")}
    (out / "manifest.json").write_text(json.dumps({**old, "version": 1}))
    (out / "objects.json").write_text("{}")
    shutil.rmtree(out / "shards")
    second, report = run(sam, image_folder, out)
    assert report.n_resumed == 3 and not (out / "objects.json").exists()  # broken.jpg retried
    assert coco_text(out) == expected


def test_rewriting_a_store_leaves_only_its_own_shards(tmp_path):
    images = [ImageRecord(1, "a.png", 4, 4)]
    write_store(tmp_path / "s", images, [], shard_images=1)
    first = {p.name for p in (tmp_path / "s" / "shards").iterdir()}
    store = write_store(tmp_path / "s", images, [], shard_images=1)
    second = {p.name for p in (tmp_path / "s" / "shards").iterdir()}
    assert len(first) == len(second) == 1 and first != second
    assert list(store.images) == images
