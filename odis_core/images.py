"""Safe image loading: EXIF orientation, odd modes, size limits, skip-and-count.

Every command reads images through `load_rgb`, so a truncated JPEG, a text file named
`.jpg` or a 16-bit PNG behaves the same everywhere: either an RGB image comes back, or
an `UnreadableImageError` naming the file and the problem (callers skip and count it).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})

# Above this many pixels an image is refused before any pixel is decoded: a 20k x 20k file
# (a few hundred KB of PNG can claim that) would need 1.2 GB as RGB on every data-loader
# worker. Refused rather than downscaled: COCO boxes and polygons are in the file's full
# resolution, PNG cannot be decoded at a reduced size, and a refusal is counted and listed
# where a silent resize would not be. 12k x 12k admits any camera photograph and stays
# under PIL's own hard limit (179 M pixels), so one message covers every oversized file.
MAX_IMAGE_PIXELS = 12_000 * 12_000
_EXIF_ORIENTATION = 0x0112
_TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})  # rotated by 90 degrees either way


class UnreadableImageError(Exception):
    """An image that cannot be decoded; `str()` is a one-line message naming the file."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def list_images(root: Path | str) -> list[str]:
    """Relative POSIX paths of every image file under `root`, sorted (deterministic order)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a directory")
    return sorted(
        path.relative_to(root).as_posix()
        for path in root.rglob("*")
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS
    )


def _to_rgb(image: Image.Image) -> Image.Image:
    # 16-bit and 32-bit single-channel modes: PIL's convert("RGB") clips them to 255, which
    # turns most 16-bit photographs white; rescale to 8 bits first.
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = values.max() if values.size else 0.0
        scale = 255.0 / top if top > 255 else 1.0
        image = Image.fromarray(np.clip(values * scale, 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Composite transparency on black, the same background SAM and COCO tools assume.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


# EXIF orientation -> the PIL transpose that shows the image upright (as exif_transpose).
EXIF_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def exif_orientation(path: Path | str) -> int:
    """The EXIF orientation tag of `path` (1, upright, when absent or unreadable)."""
    try:
        with Image.open(path) as image:
            return orientation_of(image)
    except Exception:  # noqa: BLE001 (unreadable files are reported by probe/load)
        return 1


def open_image(path: Path | str, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """PIL's lazy open (header only) with our pixel limit as the one limit; raises
    `UnreadableImageError` for an oversized or empty image. PIL's own errors propagate
    (callers turn them into one line with the file's name)."""
    with warnings.catch_warnings():
        # PIL warns from 89 M pixels and raises from 179 M; ours is the one limit.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image = Image.open(path)
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise UnreadableImageError(
            path, f"{width}x{height} pixels exceeds the limit of {max_pixels}"
        )
    if width < 1 or height < 1:
        image.close()
        raise UnreadableImageError(path, "empty image")
    return image


def orientation_of(image: Image.Image) -> int:
    """The EXIF orientation tag of an opened image (1, upright, when absent)."""
    return int(image.getexif().get(_EXIF_ORIENTATION, 1))


def probe_image(path: Path | str, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """(width, height) of `path` as `load_rgb` would return it, from the header alone
    (EXIF orientation applied); `UnreadableImageError` when it could never load. A file
    truncated after its header passes here and fails in `load_rgb`."""
    path = Path(path)
    try:
        with open_image(path, max_pixels) as image:
            width, height = image.size
            orientation = orientation_of(image)
    except Exception as error:  # noqa: BLE001 (every failure is one reason, reported)
        raise _unreadable(path, error) from None
    return (height, width) if orientation in _TRANSPOSING_ORIENTATIONS else (width, height)


def _unreadable(path: Path, error: Exception) -> UnreadableImageError:
    if isinstance(error, UnreadableImageError):
        return error
    if isinstance(error, Image.DecompressionBombError):
        return UnreadableImageError(path, f"refused as a decompression bomb ({error})")
    if isinstance(error, FileNotFoundError):
        return UnreadableImageError(path, "file not found")
    if isinstance(error, UnidentifiedImageError):
        return UnreadableImageError(path, "not a recognised image format")
    # PIL reports truncated files and broken headers as OSError/SyntaxError/ValueError.
    return UnreadableImageError(path, f"cannot decode ({error})")


def load_rgb(path: Path | str, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode `path` to an RGB PIL image with its EXIF orientation applied.

    Raises `UnreadableImageError` (one line: file and reason) for anything that is not a
    decodable image of at most `max_pixels` pixels.
    """
    path = Path(path)
    try:
        with open_image(path, max_pixels) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
            rgb = _to_rgb(image)
    except Exception as error:  # noqa: BLE001 (every failure is one reason, reported)
        raise _unreadable(path, error) from None
    if rgb.width < 1 or rgb.height < 1:
        raise UnreadableImageError(path, "empty image")
    return rgb
