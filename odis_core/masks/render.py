"""Overlays: an image with its objects' masks, boxes and labels, the first thing a user
looks at to trust a mask store."""

from __future__ import annotations

import colorsys
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from odis_core.images import load_rgb
from odis_core.masks.store import MaskStore, MaskStoreError, box_to_mask

MASK_OPACITY = 0.45


def object_colour(index: int) -> tuple[int, int, int]:
    """Distinct, saturated colours: golden-ratio steps around the hue circle."""
    red, green, blue = colorsys.hsv_to_rgb((index * 0.618033988749895) % 1.0, 0.85, 1.0)
    return int(red * 255), int(green * 255), int(blue * 255)


# Small images (64-px scenes, thumbnails) are scaled up before anything is drawn, so box
# lines and labels stay legible at any image size: the shorter side becomes at least this
# many px, by a whole factor with nearest-neighbour pixels (no blur is added to the mask).
MIN_SHORT_SIDE = 512
MAX_SCALE = 32
Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in canvas pixels


def display_scale(width: int, height: int) -> int:
    """Whole factor an image of this size is enlarged by before drawing (1 for photos)."""
    return max(1, min(MAX_SCALE, math.ceil(MIN_SHORT_SIDE / max(1, min(width, height)))))


def _overlaps(a: Box, b: Box) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def place_labels(
    boxes: list[Box], sizes: list[tuple[int, int]], canvas_size: tuple[int, int]
) -> list[Box]:
    """A rectangle of `sizes[i]` (width, height) for the label of each object box, inside
    the canvas and overlapping no earlier label: above the box's top-left corner, inside it,
    below it, else the free spot nearest to the corner (scanned on a grid); where no spot
    is free (more labels than room) the least-overlapping candidate."""
    width, height = canvas_size
    placed: list[Box] = []
    for (x0, y0, _x1, y1), (w, h) in zip(boxes, sizes, strict=True):

        def rect(x: float, y: float, w: int = w, h: int = h) -> Box:
            x = min(max(0.0, x), max(0.0, width - w))
            y = min(max(0.0, y), max(0.0, height - h))
            return (x, y, x + w, y + h)

        preferred = [rect(x0, y0 - h), rect(x0, y0), rect(x0, y1), rect(x0, y1 - h)]
        free = next((r for r in preferred if not any(_overlaps(r, o) for o in placed)), None)
        if free is None:
            step_x, step_y = max(4, w // 4), max(4, h // 2)
            grid = [rect(x, y) for y in range(0, max(1, height - h + 1), step_y)
                    for x in range(0, max(1, width - w + 1), step_x)]
            grid.sort(key=lambda r: (r[0] - x0) ** 2 + (r[1] - y0) ** 2)
            free = next((r for r in grid if not any(_overlaps(r, o) for o in placed)), None)
        if free is None:
            free = min(preferred, key=lambda r: sum(_overlap_area(r, o) for o in placed))
        placed.append(free)
    return placed


def _overlap_area(a: Box, b: Box) -> float:
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def render_objects(
    store: MaskStore, file_name: str, images_root: Path | None = None
) -> Image.Image:
    """The image `file_name` of `store` (EXIF orientation applied, as every command reads
    it) with each object's mask tinted, its box outlined and its label written on a filled
    tag that overlaps no other label. Images whose shorter side is under MIN_SHORT_SIDE are
    first enlarged by `display_scale` (nearest neighbour). Raises MaskStoreError when the
    store does not list `file_name`, UnreadableImageError when the file cannot be read."""
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
    scale = display_scale(image.width, image.height)
    canvas = Image.fromarray(pixels.round().astype(np.uint8))
    if scale > 1:
        canvas = canvas.resize((image.width * scale, image.height * scale),
                               Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(canvas)
    short_side = min(canvas.size)
    line_width = max(1, round(short_side / 256))
    font = ImageFont.load_default(size=max(12, round(short_side / 36)))
    scaled_boxes: list[Box] = [tuple(v * scale for v in box) for box, _, _ in boxes]
    labels, sizes = [], []
    for _, obj, _ in boxes:
        label = store.category_name(obj.category_id)
        if obj.score is not None:
            label = f"{label} {obj.score:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        labels.append((label, left, top))
        sizes.append((right - left + 2 * line_width + 2, bottom - top + 2 * line_width + 2))
    for (x0, y0, x1, y1), (_, _, index) in zip(scaled_boxes, boxes, strict=True):
        draw.rectangle((x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)),
                       outline=object_colour(index), width=line_width)
    placements = place_labels(scaled_boxes, sizes, canvas.size)
    for (label, left, top), tag, (_, _, index) in zip(labels, placements, boxes, strict=True):
        colour = object_colour(index)
        draw.rectangle((tag[0], tag[1], tag[2] - 1, tag[3] - 1), fill=colour)
        luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
        draw.text((tag[0] + line_width + 1 - left, tag[1] + line_width + 1 - top), label,
                  fill=(0, 0, 0) if luminance > 140 else (255, 255, 255), font=font)
    return canvas
