"""Overlays: an image with its objects' masks, boxes and labels, the first thing a user
looks at to trust a mask store."""

from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from odis_core.images import load_rgb
from odis_core.masks.store import MaskStore, MaskStoreError, box_to_mask

MASK_OPACITY = 0.45


def object_colour(index: int) -> tuple[int, int, int]:
    """Distinct, saturated colours: golden-ratio steps around the hue circle."""
    red, green, blue = colorsys.hsv_to_rgb((index * 0.618033988749895) % 1.0, 0.85, 1.0)
    return int(red * 255), int(green * 255), int(blue * 255)


def render_objects(
    store: MaskStore, file_name: str, images_root: Path | None = None
) -> Image.Image:
    """The image `file_name` of `store` (EXIF orientation applied, as every command reads
    it) with each object's mask tinted, its box outlined and its label written; the result
    has the image's size. Raises MaskStoreError when the store does not list `file_name`,
    UnreadableImageError when the file cannot be read."""
    record = store.image_by_name(file_name)
    if record is None:
        raise MaskStoreError(f"{store.path}: no image {file_name!r} in this mask store")
    root = Path(images_root or store.images_root or ".")
    image = load_rgb(root / record.file_name)
    # Masks were made on the stored size; a file replaced since is drawn in its own frame.
    sx, sy = image.width / record.width, image.height / record.height
    pixels = np.asarray(image, dtype=np.float32).copy()
    objects = store.objects_of(record.image_id)
    boxes = []
    for index, obj in enumerate(objects):
        colour = np.array(object_colour(index), dtype=np.float32)
        if obj.rle is not None:
            mask = MaskStore.decode(obj, record.height, record.width)
            if mask.shape != (image.height, image.width):
                mask = np.asarray(
                    Image.fromarray(mask).resize(image.size, Image.Resampling.NEAREST), dtype=bool
                )
        else:
            x, y, w, h = obj.bbox_xywh
            mask = box_to_mask((x * sx, y * sy, w * sx, h * sy), image.height, image.width)
        pixels[mask] = (1 - MASK_OPACITY) * pixels[mask] + MASK_OPACITY * colour
        x, y, w, h = obj.bbox_xywh
        boxes.append(((x * sx, y * sy, (x + w) * sx, (y + h) * sy), obj, index))
    canvas = Image.fromarray(pixels.round().astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for (x0, y0, x1, y1), obj, index in boxes:
        colour = object_colour(index)
        draw.rectangle((x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)), outline=colour)
        label = store.category_name(obj.category_id)
        if obj.score is not None:
            label = f"{label} {obj.score:.2f}"
        draw.text((x0 + 2, y0 + 1), label, fill=colour)
    return canvas
