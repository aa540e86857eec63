"""A corpus of odd and broken inputs, generated on the fly, for every command's tests.

`write_image_corpus(root)` writes images that must load (odd modes, EXIF rotation, 1x1) and
images that must be skipped and counted (truncated, empty, not an image, a decompression
bomb); `bad_annotation_cases(...)` yields COCO instances files that must fail before any
work starts, each with the words its one-line error must contain. Import it from a test
(`from bad_inputs import ...`; tests/ is on sys.path through its conftest) or use the
`bad_image_corpus` fixture.
"""

from __future__ import annotations

import copy
import io
import shutil
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

BOMB_SIDE = 20_000  # 400 M pixels claimed by a ~400 KB PNG


@dataclass(frozen=True)
class ImageCorpus:
    root: Path
    readable: dict[str, tuple[int, int]]  # file name -> (width, height) after EXIF rotation
    unreadable: list[str]  # file names every command must skip and count

    @property
    def all_names(self) -> list[str]:
        return sorted([*self.readable, *self.unreadable])


def _pattern(height: int, width: int, seed: int = 0) -> np.ndarray:
    """(height, width, 3) uint8 blocks of colour: something SAM and crops can bite on."""
    rng = np.random.default_rng(seed)
    image = np.zeros((height, width, 3), dtype=np.uint8)
    for _ in range(4):
        y, x = rng.integers(0, height), rng.integers(0, width)
        image[y : y + height // 2, x : x + width // 2] = rng.integers(0, 256, 3)
    return image


def write_bomb_png(path: Path, side: int = BOMB_SIDE) -> Path:
    """A real, valid grayscale PNG of side x side zeros, compressed row by row (never held)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    compressor = zlib.compressobj(1)
    row = bytes(side + 1)  # filter byte 0 + pixels
    parts = [compressor.compress(row) for _ in range(side)]
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    with open(path, "wb") as handle:
        handle.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header))
        handle.write(chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b""))
    return path


def _exif_rotated_jpeg(path: Path, width: int, height: int) -> None:
    """A width x height JPEG whose EXIF orientation 6 says: display rotated 90 degrees."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(_pattern(height, width, 5)).save(path, "JPEG", exif=exif.tobytes())


def write_image_corpus(root: Path, bomb: bool | Path = True) -> ImageCorpus:
    """Write the image corpus under `root` (created) and say what each file should do.
    `bomb`: write the 20k x 20k PNG (about a second), copy it from a path, or leave it out."""
    root.mkdir(parents=True, exist_ok=True)
    readable: dict[str, tuple[int, int]] = {}
    rgb = Image.fromarray(_pattern(48, 64, 1))
    rgb.save(root / "plain.jpg", "JPEG")
    readable["plain.jpg"] = (64, 48)
    rgb.convert("CMYK").save(root / "cmyk.jpg", "JPEG")
    readable["cmyk.jpg"] = (64, 48)
    deep = (np.asarray(rgb.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(deep).save(root / "sixteen_bit.png")  # mode I;16
    readable["sixteen_bit.png"] = (64, 48)
    rgba = rgb.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(root / "rgba.png")
    readable["rgba.png"] = (64, 48)
    rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(root / "palette.png")
    readable["palette.png"] = (64, 48)
    rgb.convert("L").save(root / "gray.png")
    readable["gray.png"] = (64, 48)
    Image.new("RGB", (1, 1), (200, 10, 10)).save(root / "one_pixel.png")
    readable["one_pixel.png"] = (1, 1)
    _exif_rotated_jpeg(root / "exif_rotated.jpg", width=64, height=40)
    readable["exif_rotated.jpg"] = (40, 64)  # displayed upright: width and height swap

    unreadable = ["truncated.jpg", "empty.jpg", "text.jpg"]
    buffer = io.BytesIO()
    rgb.save(buffer, "JPEG")
    (root / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 3])
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.jpg").write_text("this is not an image\n")
    if isinstance(bomb, Path):
        shutil.copyfile(bomb, root / "bomb.png")
        unreadable.append("bomb.png")
    elif bomb:
        write_bomb_png(root / "bomb.png")
        unreadable.append("bomb.png")
    return ImageCorpus(root, readable, sorted(unreadable))


def good_annotations() -> dict:
    """A valid COCO instances file over two 64x48 images of the corpus."""
    return {
        "images": [
            {"id": 1, "file_name": "plain.jpg", "width": 64, "height": 48},
            {"id": 2, "file_name": "gray.png", "width": 64, "height": 48},
        ],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "iscrowd": 0,
                "segmentation": [[4, 4, 30, 4, 30, 30, 4, 30]],
                "bbox": [4, 4, 26, 26],
                "area": 1,
            },
            {"id": 2, "image_id": 2, "category_id": 1, "bbox": [10, 10, 20, 12]},
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }


def bad_annotation_cases() -> Iterator[tuple[str, str | dict, str]]:
    """(case name, file content: raw text or a JSON object, words the error must contain)."""
    yield "malformed_json", '{"images": [', "malformed JSON"
    yield "not_an_object", "[1, 2]", "JSON list"

    def damaged(change) -> dict:
        dataset = copy.deepcopy(good_annotations())
        change(dataset)
        return dataset

    yield "no_images_key", damaged(lambda d: d.pop("images")), "'images'"
    yield (
        "image_without_file_name",
        damaged(lambda d: d["images"][0].pop("file_name")),
        ("file_name"),
    )
    yield (
        "unknown_image_id",
        damaged(lambda d: d["annotations"][0].update(image_id=99)),
        ("image ids not in 'images'"),
    )
    yield (
        "box_outside_image",
        damaged(lambda d: d["annotations"][1].update(bbox=[100, 100, 10, 10])),
        "outside its image",
    )
    yield (
        "zero_area_box",
        damaged(lambda d: d["annotations"][1].update(bbox=[10, 10, 0, 5])),
        ("non-positive"),
    )
    yield (
        "negative_box",
        damaged(lambda d: d["annotations"][1].update(bbox=[10, 10, -4, 5])),
        ("non-positive"),
    )
    yield (
        "short_polygon",
        damaged(lambda d: d["annotations"][0].update(segmentation=[[4, 4, 30, 4]])),
        "fewer than 3 points",
    )
    yield (
        "parent_path",
        damaged(lambda d: d["images"][0].update(file_name="../escape.jpg")),
        ("outside the image root"),
    )
    yield (
        "absolute_path",
        damaged(lambda d: d["images"][0].update(file_name="/etc/passwd")),
        ("outside the image root"),
    )
    yield "duplicate_image_id", damaged(lambda d: d["images"][1].update(id=1)), "listed twice"
    yield (
        "category_not_in_categories",
        damaged(lambda d: d["annotations"][1].update(category_id=7)),
        "category_id not in 'categories'",
    )
    yield (
        "duplicate_annotation_id",
        damaged(lambda d: d["annotations"][1].update(id=1)),
        ("repeated id"),
    )
