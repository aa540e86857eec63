"""Objects from a COCO instances file (ground truth, or a detector's boxes) into a mask store.

Any image folder plus a COCO JSON must work without extra metadata files (spec §11), so
this module accepts what real files contain: polygons, compressed and uncompressed RLE,
annotations with only a box (detector outputs), annotations without `id`, files without
`categories`. pycocotools does every rasterisation, so a mask in the store decodes to
exactly the pixels `COCO(file).annToMask` gives for the source annotation.

The whole file is validated before anything is written: a malformed file raises
`CocoFormatError` (one line naming the file) and leaves the output untouched.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from odis_core.images import EXIF_TRANSPOSE, UnreadableImageError, exif_orientation, probe_image
from odis_core.masks.store import (
    UNKNOWN_CATEGORY,
    ImageRecord,
    MaskStore,
    ObjectRecord,
    StoreWriter,
    object_from_mask,
)

# A polygon needs three (x, y) vertices to enclose any pixel; pycocotools would read a
# 4-value "polygon" as a box, so a shorter one is an error in the file, not an empty mask.
MIN_POLYGON_VALUES = 6


class CocoFormatError(Exception):
    """An annotation file odis cannot use; the message is one line: the file and the problem."""


@dataclass
class CocoImportReport:
    n_images: int  # images in the store (all images of the file)
    n_objects: int  # objects kept
    n_crowd_dropped: int  # iscrowd=1 regions: not one object, so never a distillation target
    n_small_dropped: int  # area under min_area, or empty (nothing to crop around)
    n_boxes_only: int  # kept objects without a segmentation (used as filled boxes)
    n_images_without_objects: int  # these train on the whole image (spec §2)
    n_missing_images: int  # missing or unreadable under images_root (kept, listed in the
    # store's skipped.txt; training skips them when it fails to read them)
    n_over_max_dropped: int = 0  # dropped by max_objects_per_image
    n_exif_rotated: int = 0  # images annotated in their stored frame, objects turned upright


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise CocoFormatError(f"{path}: annotation file not found") from None
    except json.JSONDecodeError as error:
        raise CocoFormatError(f"{path}: malformed JSON ({error})") from None
    except (OSError, UnicodeDecodeError) as error:
        raise CocoFormatError(f"{path}: cannot read ({error})") from None


def _inside_root(file_name: str) -> bool:
    """False for names that would read outside the image root: absolute, drive-qualified
    or with a '..' component (either separator)."""
    parts = PurePosixPath(file_name.replace("\\", "/"))
    return not (
        parts.is_absolute() or ".." in parts.parts or PureWindowsPath(file_name).drive
    )


def _check_box(where: str, bbox: list[float], image: dict[str, Any]) -> None:
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        raise CocoFormatError(f"{where}: bbox {bbox} has a non-positive width or height")
    if x >= image["width"] or y >= image["height"] or x + w <= 0 or y + h <= 0:
        raise CocoFormatError(
            f"{where}: bbox {bbox} lies outside its image ({image['width']}x{image['height']})"
        )


def _check_images(path: Path, images: Any) -> dict[int, dict[str, Any]]:
    if not isinstance(images, list):
        raise CocoFormatError(f"{path}: 'images' must be a list")
    by_id: dict[int, dict[str, Any]] = {}
    names: dict[str, int] = {}
    for position, image in enumerate(images):
        if not isinstance(image, dict):
            raise CocoFormatError(f"{path}: images[{position}] is not an object")
        for key in ("id", "file_name", "width", "height"):
            if key not in image:
                raise CocoFormatError(f"{path}: images[{position}] has no '{key}'")
        image_id, name = image["id"], image["file_name"]
        if not _is_int(image_id) or not isinstance(name, str) or not name:
            raise CocoFormatError(f"{path}: images[{position}] needs an integer id and a file_name")
        if not all(_is_int(image[k]) and image[k] > 0 for k in ("width", "height")):
            raise CocoFormatError(f"{path}: image {image_id} needs positive integer width/height")
        if not _inside_root(name):
            raise CocoFormatError(
                f"{path}: image {image_id} file_name {name!r} points outside the image root "
                "(absolute or with '..')"
            )
        if image_id in by_id:
            raise CocoFormatError(f"{path}: image id {image_id} is listed twice")
        if name in names:
            raise CocoFormatError(
                f"{path}: file_name {name!r} is listed twice (image ids {names[name]}, {image_id})"
            )
        by_id[image_id], names[name] = image, image_id
    return by_id


def _check_segmentation(path: Path, ann_id: Any, segmentation: Any, image: dict) -> Any:
    """The segmentation as pycocotools should see it: None (box only), a list of polygons
    of at least 3 points each, or an RLE."""
    if segmentation is None or segmentation == [] or segmentation == {}:
        return None
    where = f"{path}: annotation {ann_id}"
    if isinstance(segmentation, list):
        polygons = []
        for polygon in segmentation:
            if not isinstance(polygon, list) or not all(_is_number(v) for v in polygon):
                raise CocoFormatError(f"{where}: a polygon must be a list of numbers")
            if len(polygon) % 2:
                raise CocoFormatError(f"{where}: a polygon has an odd number of coordinates")
            if len(polygon) < MIN_POLYGON_VALUES:
                raise CocoFormatError(
                    f"{where}: a polygon has fewer than 3 points ({len(polygon) // 2})"
                )
            polygons.append(polygon)
        return polygons
    if isinstance(segmentation, dict):
        if "counts" not in segmentation or "size" not in segmentation:
            raise CocoFormatError(f"{where}: an RLE needs 'counts' and 'size'")
        if segmentation["size"] != [image["height"], image["width"]]:  # a JSON list
            raise CocoFormatError(
                f"{where}: RLE size {segmentation['size']} differs from its image "
                f"({image['height']}x{image['width']})"
            )
        if not isinstance(segmentation["counts"], (str, list)):
            raise CocoFormatError(f"{where}: RLE counts must be a string or a list")
        return segmentation
    raise CocoFormatError(f"{where}: segmentation must be polygons or an RLE")


def _check_annotations(path: Path, annotations: Any, images: dict[int, dict]) -> None:
    """Validate in place and fill the keys pycocotools needs (id, category_id, iscrowd)."""
    if not isinstance(annotations, list):
        raise CocoFormatError(f"{path}: 'annotations' must be a list")
    unknown = [
        a
        for a in annotations
        if isinstance(a, dict) and not (_is_int(a.get("image_id")) and a["image_id"] in images)
    ]
    if unknown:
        first = unknown[0]
        raise CocoFormatError(
            f"{path}: {len(unknown)} annotation(s) refer to image ids not in 'images' "
            f"(e.g. annotation {first.get('id', '?')} -> image_id {first.get('image_id')!r})"
        )
    seen_ids = {a["id"] for a in annotations if isinstance(a, dict) and _is_int(a.get("id"))}
    next_id = max(seen_ids, default=0) + 1
    used: set[int] = set()
    for position, ann in enumerate(annotations):
        if not isinstance(ann, dict):
            raise CocoFormatError(f"{path}: annotations[{position}] is not an object")
        if "id" not in ann:  # detector outputs often carry no id
            ann["id"], next_id = next_id, next_id + 1
        if not _is_int(ann["id"]) or ann["id"] in used:
            raise CocoFormatError(f"{path}: annotations[{position}] has a missing or repeated id")
        used.add(ann["id"])
        ann.setdefault("category_id", UNKNOWN_CATEGORY)
        ann.setdefault("iscrowd", 0)
        if not _is_int(ann["category_id"]) or ann["iscrowd"] not in (0, 1):
            raise CocoFormatError(f"{path}: annotation {ann['id']}: bad category_id or iscrowd")
        image = images[ann["image_id"]]
        ann["segmentation"] = _check_segmentation(
            path, ann["id"], ann.get("segmentation"), image
        )
        bbox = ann.get("bbox")
        has_box = isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)
        if ann["segmentation"] is None and not has_box:
            raise CocoFormatError(
                f"{path}: annotation {ann['id']} has neither a segmentation nor a bbox [x, y, w, h]"
            )
        if ann["segmentation"] is None:  # the box is the object: it must cover pixels
            _check_box(f"{path}: annotation {ann['id']}", bbox, image)
        if "score" in ann and not _is_number(ann["score"]):
            raise CocoFormatError(f"{path}: annotation {ann['id']}: score must be a number")


def _check_categories(path: Path, categories: Any) -> dict[int, str]:
    if not isinstance(categories, list) or not all(
        isinstance(c, dict) and _is_int(c.get("id")) for c in categories
    ):
        raise CocoFormatError(f"{path}: 'categories' must be a list of objects with integer ids")
    return {int(c["id"]): str(c.get("name", c["id"])) for c in categories}


def load_coco(annotations: Path) -> tuple[COCO, dict[int, str]]:
    """Parse and validate `annotations`, then index it with pycocotools (silently).

    Returns the COCO index (annotations normalised: `id`, `category_id`, `iscrowd` always
    present, `segmentation` None for box-only objects) and
    the category names by id.
    """
    path = Path(annotations)
    dataset = _read_json(path)
    if isinstance(dataset, list):
        raise CocoFormatError(
            f"{path}: a JSON list (a detection results file?); an instances file with "
            "'images' and 'annotations' is needed"
        )
    if not isinstance(dataset, dict):
        raise CocoFormatError(f"{path}: not a COCO instances object")
    for key in ("images", "annotations"):
        if key not in dataset:
            raise CocoFormatError(f"{path}: no '{key}' list (is this a COCO instances file?)")
    images = _check_images(path, dataset["images"])
    _check_annotations(path, dataset["annotations"], images)
    categories = _check_categories(path, dataset.get("categories", []))
    if categories:  # a class-agnostic file (no categories) may use any id
        stray = [a for a in dataset["annotations"]
                 if a["category_id"] not in categories and a["category_id"] != UNKNOWN_CATEGORY]
        if stray:
            raise CocoFormatError(
                f"{path}: {len(stray)} annotation(s) have a category_id not in 'categories' "
                f"(e.g. annotation {stray[0]['id']} -> category_id {stray[0]['category_id']})"
            )
    # pycocotools prints progress to stdout; library code stays quiet.
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = dataset
        coco.createIndex()
    return coco, categories


def _to_object(coco: COCO, ann: dict[str, Any]) -> ObjectRecord:
    """An ObjectRecord with the annotation's mask as compressed RLE (str counts), or box only."""
    score = float(ann["score"]) if "score" in ann else None
    common = {
        "object_id": ann["id"],
        "image_id": ann["image_id"],
        "category_id": ann["category_id"],
        "score": score,
    }
    segmentation = ann["segmentation"]
    if segmentation is None:
        x, y, w, h = (float(v) for v in ann["bbox"])
        return ObjectRecord(bbox_xywh=(x, y, w, h), area=max(w, 0.0) * max(h, 0.0), **common)
    rle = coco.annToRLE(ann)  # polygons are merged, uncompressed RLE compressed
    counts = rle["counts"]
    rle = {
        "size": [int(v) for v in rle["size"]],
        "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts,
    }
    bbox = tuple(float(v) for v in mask_utils.toBbox(rle))
    return ObjectRecord(
        bbox_xywh=bbox,  # type: ignore[arg-type]
        area=float(mask_utils.area(rle)),
        rle=rle,
        **common,
    )


_TRANSPOSING = (5, 6, 7, 8)  # orientations that swap width and height


def _to_upright(
    record: ImageRecord, objects: list[ObjectRecord], orientation: int
) -> tuple[ImageRecord, list[ObjectRecord]]:
    """The image record and its objects in the upright frame `load_rgb` shows. Only
    orientations that swap width and height are recognised (the annotated size is the
    evidence); a box-only object becomes the box around its turned box."""
    turned = []
    for obj in objects:
        mask = MaskStore.decode(obj, record.height, record.width)
        upright = np.asarray(
            Image.fromarray(mask).transpose(EXIF_TRANSPOSE[orientation]), dtype=bool
        )
        new = object_from_mask(upright, obj.object_id, obj.image_id, obj.category_id, obj.score)
        if obj.rle is None:
            new = ObjectRecord(new.object_id, new.image_id, new.category_id, new.bbox_xywh,
                               new.area, None, new.score)
        turned.append(new)
    return ImageRecord(record.image_id, record.file_name, record.height, record.width), turned


def _cut_short(path: Path) -> bool:
    """A JPEG or PNG whose end marker is missing from its last 4 KiB: cut off after an
    intact header (the header probe cannot see it; decoding every file would be too slow)."""
    with open(path, "rb") as handle:
        head = handle.read(8)
        handle.seek(max(0, path.stat().st_size - 4096))
        tail = handle.read()
    if head.startswith(b"\xff\xd8"):
        return b"\xff\xd9" not in tail
    if head.startswith(b"\x89PNG"):
        return b"IEND" not in tail
    return False


def file_sha1(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def import_coco(
    annotations: Path,
    out: Path,
    images_root: Path | None = None,
    min_area: float = 0.0,
    max_objects_per_image: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    loaded: tuple[COCO, dict[int, str]] | None = None,
) -> tuple[MaskStore, CocoImportReport]:
    """Write the objects of the COCO instances file `annotations` as a mask store at `out`.

    Crowd regions and objects with area under `min_area` pixels (the decoded mask's area;
    the box area for box-only objects; empty objects always) are dropped.
    `max_objects_per_image` keeps the largest objects of each image. Every image of the file
    is in the store, also those left without objects. `progress(done, total)` is called
    per image. Raises `CocoFormatError` before writing anything if the file is unusable.
    `loaded`: what `load_coco(annotations)` returned, when the caller validated it first.
    """
    if min_area < 0:
        raise ValueError(f"min_area must be >= 0, got {min_area}")
    if max_objects_per_image is not None and max_objects_per_image < 1:
        raise ValueError(f"max_objects_per_image must be >= 1, got {max_objects_per_image}")
    if images_root is not None and not Path(images_root).is_dir():
        raise FileNotFoundError(f"{images_root}: not a directory")
    coco, categories = loaded if loaded is not None else load_coco(Path(annotations))
    settings = {
        "annotations": str(Path(annotations).resolve()),
        # The content, not only the name: a store is never silently replaced by one built
        # from other annotations, nor a run resumed on it (issue 15).
        "annotations_sha1": file_sha1(Path(annotations)),
        "min_area": min_area,
        "max_objects_per_image": max_objects_per_image,
    }
    writer = StoreWriter(
        out, categories, source="coco", images_root=images_root, settings=settings
    )
    counts = dict.fromkeys(
        ("crowd", "small", "over_max", "missing", "empty_images", "objects", "boxes_only",
         "exif_rotated"), 0
    )
    missing: list[str] = []
    n_images = len(coco.dataset["images"])
    for done, image in enumerate(coco.dataset["images"], start=1):
        orientation = 1
        if images_root is not None:
            try:  # the header only: a million-image import must not decode every file
                upright = probe_image(Path(images_root) / image["file_name"])
                if _cut_short(Path(images_root) / image["file_name"]):
                    missing.append(f"{image['file_name']}: truncated (no end marker)")
                if upright == (image["height"], image["width"]) != upright[::-1]:
                    orientation = exif_orientation(Path(images_root) / image["file_name"])
            except UnreadableImageError as error:
                missing.append(f"{image['file_name']}: {error.reason}")
        kept = []
        for ann in coco.imgToAnns.get(image["id"], []):
            if ann["iscrowd"]:
                counts["crowd"] += 1
                continue
            obj = _to_object(coco, ann)
            if obj.area <= 0 or obj.area < min_area:
                counts["small"] += 1
                continue
            kept.append(obj)
        if max_objects_per_image is not None and len(kept) > max_objects_per_image:
            largest = sorted(range(len(kept)), key=lambda i: -kept[i].area)
            chosen = set(largest[:max_objects_per_image])
            counts["over_max"] += len(kept) - len(chosen)
            kept = [obj for i, obj in enumerate(kept) if i in chosen]  # source order
        record = ImageRecord(image["id"], image["file_name"], image["width"], image["height"])
        if orientation in _TRANSPOSING:
            # Annotated on the file as stored, while every command reads it upright (EXIF):
            # turn the objects the same way, so masks and crops stay aligned.
            record, kept = _to_upright(record, kept, orientation)
            counts["exif_rotated"] += 1
        counts["empty_images"] += not kept
        counts["objects"] += len(kept)
        counts["boxes_only"] += sum(1 for obj in kept if obj.rle is None)
        writer.add(record, kept)
        if progress is not None:
            progress(done, n_images)
    store = writer.close(skipped=missing)
    report = CocoImportReport(
        n_images=n_images,
        n_objects=counts["objects"],
        n_crowd_dropped=counts["crowd"],
        n_small_dropped=counts["small"],
        n_boxes_only=counts["boxes_only"],
        n_images_without_objects=counts["empty_images"],
        n_missing_images=len(missing),
        n_over_max_dropped=counts["over_max"],
        n_exif_rotated=counts["exif_rotated"],
    )
    return store, report
