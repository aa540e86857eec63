"""Writing one split of generated scenes: numbered PNGs plus a COCO instances JSON.

Shared by every scene builder (synthetic shapes, Fashion-MNIST composites), so the on-disk
format and its guarantees live in one place:

    OUT/<split>/images/<split>_00000.png ...   RGB PNG
    OUT/<split>/annotations.json               COCO instances: images, annotations
                                               (compressed RLE, area, bbox from pycocotools),
                                               categories

An earlier run's annotation file is removed before any image is written and the new one
is written atomically at the end, so an interrupted run never leaves a JSON that disagrees
with the images; numbered PNGs beyond the new count are removed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from odis_core.atomic import atomic_write
from odis_core.masks.store import object_from_mask

ProgressFn = Callable[[int, int], None]


class SceneGenerationError(RuntimeError):
    """A scene could not be built or written; the message says which and why, in one line."""


@dataclass(frozen=True)
class SceneSplit:
    images_dir: Path  # the PNGs; the COCO file names are relative to it
    annotations: Path  # the COCO instances JSON
    n_images: int
    n_objects: int


@dataclass(frozen=True)
class AnnotatedObject:
    """One object of a rendered scene, as it goes into the COCO file."""

    category_id: int
    visible_mask: np.ndarray  # (H, W) bool: what the annotation's RLE encodes
    extra: dict[str, Any] = field(default_factory=dict)  # extra annotation keys (provenance)


# index -> ((H, W, 3) uint8 image, its objects in paste order)
RenderFn = Callable[[int], tuple[np.ndarray, list[AnnotatedObject]]]


def write_json_atomic(path: Path, payload: Any) -> None:
    with atomic_write(path, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(payload, separators=(",", ":")) + "\n")


def _remove_stale_images(images_dir: Path, split: str, n_images: int) -> None:
    """Drop numbered PNGs a previous, larger run left behind, so the folder matches the JSON."""
    pattern = re.compile(rf"{re.escape(split)}_(\d+)\.png")
    for path in images_dir.iterdir():
        match = pattern.fullmatch(path.name)
        if match and int(match.group(1)) >= n_images:
            path.unlink()


def write_scene_split(
    out_dir: Path,
    split: str,
    n_images: int,
    render: RenderFn,
    info: dict[str, Any],
    categories: list[dict[str, Any]],
    progress: ProgressFn | None = None,
) -> SceneSplit:
    """Render images 0..n_images-1 with `render` and write them as OUT/<split>.

    `info` becomes the COCO file's "info"; `progress(done, n_images)` is called after each
    image is written.
    """
    if not re.fullmatch(r"[A-Za-z0-9_-]+", split):
        raise ValueError(f"split name {split!r} must be letters, digits, '_' or '-'")
    if n_images < 0:
        raise ValueError(f"n_images must be >= 0, got {n_images}")
    split_dir = Path(out_dir) / split
    images_dir, annotations_path = split_dir / "images", split_dir / "annotations.json"
    try:
        images_dir.mkdir(parents=True, exist_ok=True)
        annotations_path.unlink(missing_ok=True)
    except OSError as error:
        raise SceneGenerationError(f"{split_dir}: cannot write there ({error})") from None
    images, annotations = [], []
    for index in range(n_images):
        image, objects = render(index)
        file_name = f"{split}_{index:05d}.png"
        try:
            Image.fromarray(image).save(images_dir / file_name, format="PNG")
        except OSError as error:
            raise SceneGenerationError(f"{images_dir / file_name}: {error}") from None
        image_id = index + 1
        height, width = image.shape[:2]
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for obj in objects:
            record = object_from_mask(
                obj.visible_mask, len(annotations) + 1, image_id, obj.category_id
            )
            annotations.append(
                {
                    "id": record.object_id,
                    "image_id": image_id,
                    "category_id": obj.category_id,
                    "segmentation": record.rle,
                    "area": record.area,
                    "bbox": list(record.bbox_xywh),
                    "iscrowd": 0,
                    **obj.extra,
                }
            )
        if progress is not None:
            progress(index + 1, n_images)
    _remove_stale_images(images_dir, split, n_images)
    payload = {"info": info, "images": images, "annotations": annotations, "categories": categories}
    write_json_atomic(annotations_path, payload)
    return SceneSplit(images_dir, annotations_path, n_images, len(annotations))
