"""Safe image loading: EXIF orientation, odd modes, size limits, skip-and-count.

Every command reads images through `load_rgb`, so a truncated JPEG, a text file named
`.jpg` or a 16-bit PNG behaves the same everywhere: either an RGB image comes back, or
an `UnreadableImageError` naming the file and the problem (callers skip and count it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})

# Above this many pixels an image is refused instead of decoded (a 20k x 20k "image" is a
# decompression bomb on a data-loader worker). 16k x 16k covers gigapixel-free photography.
MAX_IMAGE_PIXELS = 16_384 * 16_384


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


def load_rgb(path: Path | str, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode `path` to an RGB PIL image with its EXIF orientation applied.

    Raises `UnreadableImageError` (one line: file and reason) for anything that is not a
    decodable image of at most `max_pixels` pixels.
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise UnreadableImageError(
                    path, f"{width}x{height} pixels exceeds the limit of {max_pixels}"
                )
            image.load()
            image = ImageOps.exif_transpose(image)
            rgb = _to_rgb(image)
    except UnreadableImageError:
        raise
    except FileNotFoundError:
        raise UnreadableImageError(path, "file not found") from None
    except UnidentifiedImageError:
        raise UnreadableImageError(path, "not a recognised image format") from None
    except (OSError, ValueError, SyntaxError) as error:
        # PIL reports truncated files and broken headers as OSError/SyntaxError.
        raise UnreadableImageError(path, f"cannot decode ({error})") from None
    if rgb.width < 1 or rgb.height < 1:
        raise UnreadableImageError(path, "empty image")
    return rgb
