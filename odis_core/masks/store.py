"""The mask store: the one on-disk format every odis command reads objects from.

A store is a directory:

    STORE/
      manifest.json   {"format": "odis-mask-store", "version": 1, "source": "coco"|"sam",
                       "images_root": "<dir the file names are relative to>" | null,
                       "n_images": ..., "n_objects": ..., "settings": {...}}
      objects.json    a COCO instances file: "images" (id, file_name, width, height),
                      "annotations" (id, image_id, category_id, segmentation as compressed
                      RLE {"size": [h, w], "counts": str}, area, bbox [x, y, w, h],
                      iscrowd 0, optional "score"), "categories" (id, name)

`objects.json` loads with `pycocotools.coco.COCO` unchanged. Every image of the dataset is
listed, including images with no object (training falls back to the whole image for
those). A class-agnostic object (SAM) has `category_id` -1. An object may have a box and
no mask (`segmentation` absent): it is then used as a filled box.

Both files are written to a temporary name and renamed, manifest last, so a store is
either complete or absent.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from odis_core.atomic import atomic_write

STORE_FORMAT = "odis-mask-store"
STORE_VERSION = 1
UNKNOWN_CATEGORY = -1


class MaskStoreError(Exception):
    """A store that is missing or malformed; the message names the file and the problem."""


@dataclass(frozen=True)
class ImageRecord:
    image_id: int
    file_name: str  # relative to the store's images root, POSIX separators
    width: int
    height: int


@dataclass(frozen=True)
class ObjectRecord:
    object_id: int
    image_id: int
    category_id: int  # UNKNOWN_CATEGORY (-1) for class-agnostic sources
    bbox_xywh: tuple[float, float, float, float]
    area: float
    rle: dict[str, Any] | None = None  # compressed RLE {"size": [h, w], "counts": str}
    score: float | None = None


@dataclass
class MaskStore:
    """Images and their objects, indexed by image id."""

    images: list[ImageRecord]
    objects: list[ObjectRecord]
    categories: dict[int, str] = field(default_factory=dict)
    source: str = "coco"
    images_root: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def __post_init__(self) -> None:
        self._objects_by_image: dict[int, list[ObjectRecord]] = defaultdict(list)
        for obj in self.objects:
            self._objects_by_image[obj.image_id].append(obj)
        self._image_by_id = {image.image_id: image for image in self.images}
        self._image_by_name = {image.file_name: image for image in self.images}

    def objects_of(self, image_id: int) -> list[ObjectRecord]:
        return self._objects_by_image.get(image_id, [])

    def image(self, image_id: int) -> ImageRecord:
        return self._image_by_id[image_id]

    def image_by_name(self, file_name: str) -> ImageRecord | None:
        return self._image_by_name.get(file_name)

    def category_name(self, category_id: int) -> str:
        return self.categories.get(category_id, "object" if category_id < 0 else str(category_id))

    @property
    def n_images_without_objects(self) -> int:
        return sum(1 for image in self.images if not self._objects_by_image.get(image.image_id))

    @staticmethod
    def decode(obj: ObjectRecord, height: int, width: int) -> np.ndarray:
        """(height, width) bool mask of `obj`: its RLE, or its box filled when it has none."""
        if obj.rle is not None:
            return mask_utils.decode(obj.rle).astype(bool)
        return box_to_mask(obj.bbox_xywh, height, width)

    @classmethod
    def open(cls, path: Path | str) -> MaskStore:
        return read_store(path)


def box_to_mask(bbox_xywh: Sequence[float], height: int, width: int) -> np.ndarray:
    """(height, width) bool mask that is True inside the box (pixel centres inside)."""
    x, y, w, h = bbox_xywh
    mask = np.zeros((height, width), dtype=bool)
    x0, y0 = max(0, int(np.floor(x + 0.5))), max(0, int(np.floor(y + 0.5)))
    x1, y1 = min(width, int(np.ceil(x + w - 0.5))), min(height, int(np.ceil(y + h - 0.5)))
    mask[y0:y1, x0:x1] = True
    return mask


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """Compressed RLE of a (H, W) bool mask with `counts` as str (JSON-ready)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def object_from_mask(
    mask: np.ndarray,
    object_id: int,
    image_id: int,
    category_id: int = UNKNOWN_CATEGORY,
    score: float | None = None,
) -> ObjectRecord:
    """An ObjectRecord whose RLE, area and box all come from `mask` via pycocotools."""
    rle = encode_mask(mask)
    bbox = tuple(float(v) for v in mask_utils.toBbox(rle))
    return ObjectRecord(
        object_id=object_id,
        image_id=image_id,
        category_id=category_id,
        bbox_xywh=bbox,  # type: ignore[arg-type]
        area=float(mask_utils.area(rle)),
        rle=rle,
        score=score,
    )


def _atomic_write_json(path: Path, payload: Any) -> None:
    # Two writers (the last two SAM shards finishing together) write the same content;
    # atomic_write gives each its own temporary file.
    with atomic_write(path, "w", encoding="utf-8") as handle:
        json.dump(payload, handle)


def _annotation(obj: ObjectRecord) -> dict[str, Any]:
    annotation: dict[str, Any] = {
        "id": obj.object_id,
        "image_id": obj.image_id,
        "category_id": obj.category_id,
        "bbox": list(obj.bbox_xywh),
        "area": obj.area,
        "iscrowd": 0,
    }
    if obj.rle is not None:
        annotation["segmentation"] = obj.rle
    if obj.score is not None:
        annotation["score"] = obj.score
    return annotation


def write_store(
    path: Path | str,
    images: Iterable[ImageRecord],
    objects: Iterable[ObjectRecord],
    categories: dict[int, str] | None = None,
    source: str = "coco",
    images_root: Path | str | None = None,
    settings: dict[str, Any] | None = None,
) -> MaskStore:
    """Write a store directory atomically (objects first, manifest last) and return it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    images, objects = list(images), list(objects)
    categories = dict(categories or {})
    root = str(Path(images_root).resolve()) if images_root is not None else None
    _atomic_write_json(
        path / "objects.json",
        {
            "images": [
                {"id": i.image_id, "file_name": i.file_name, "width": i.width, "height": i.height}
                for i in images
            ],
            "annotations": [_annotation(obj) for obj in objects],
            "categories": [{"id": cid, "name": name} for cid, name in sorted(categories.items())],
        },
    )
    _atomic_write_json(
        path / "manifest.json",
        {
            "format": STORE_FORMAT,
            "version": STORE_VERSION,
            "source": source,
            "images_root": root,
            "n_images": len(images),
            "n_objects": len(objects),
            "settings": settings or {},
        },
    )
    return MaskStore(images, objects, categories, source, root, settings or {}, path)


def _load_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise MaskStoreError(f"{path}: not found (is this an odis mask store?)") from None
    except json.JSONDecodeError as error:
        raise MaskStoreError(f"{path}: malformed JSON ({error})") from None


def read_store(path: Path | str) -> MaskStore:
    """Open a store directory written by `write_store`."""
    path = Path(path)
    if not path.is_dir():
        raise MaskStoreError(f"{path}: not a mask store directory")
    manifest = _load_json(path / "manifest.json")
    if manifest.get("format") != STORE_FORMAT or manifest.get("version") != STORE_VERSION:
        raise MaskStoreError(
            f"{path / 'manifest.json'}: not an {STORE_FORMAT} version {STORE_VERSION} manifest"
        )
    payload = _load_json(path / "objects.json")
    try:
        images = [
            ImageRecord(int(i["id"]), str(i["file_name"]), int(i["width"]), int(i["height"]))
            for i in payload["images"]
        ]
        objects = [
            ObjectRecord(
                object_id=int(a["id"]),
                image_id=int(a["image_id"]),
                category_id=int(a.get("category_id", UNKNOWN_CATEGORY)),
                bbox_xywh=tuple(float(v) for v in a["bbox"]),  # type: ignore[arg-type]
                area=float(a["area"]),
                rle=a.get("segmentation"),
                score=a.get("score"),
            )
            for a in payload["annotations"]
        ]
        categories = {int(c["id"]): str(c["name"]) for c in payload.get("categories", [])}
    except (KeyError, TypeError, ValueError) as error:
        raise MaskStoreError(f"{path / 'objects.json'}: malformed record ({error!r})") from None
    return MaskStore(
        images,
        objects,
        categories,
        source=manifest.get("source", "coco"),
        images_root=manifest.get("images_root"),
        settings=manifest.get("settings", {}),
        path=path,
    )
