"""load_rgb and probe_image over the bad-input corpus: odd images load, broken ones are
refused with one line naming the file."""

import numpy as np
import pytest
from PIL import Image

from odis_core.images import UnreadableImageError, list_images, load_rgb, probe_image


def test_every_odd_image_loads_as_rgb_at_its_displayed_size(bad_image_corpus):
    for name, size in bad_image_corpus.readable.items():
        image = load_rgb(bad_image_corpus.root / name)
        assert image.mode == "RGB" and image.size == size, name
        assert probe_image(bad_image_corpus.root / name) == size, name


def test_every_broken_image_is_refused_with_one_line_naming_it(bad_image_corpus):
    for name in bad_image_corpus.unreadable:
        path = bad_image_corpus.root / name
        with pytest.raises(UnreadableImageError) as raised:
            load_rgb(path)
        message = str(raised.value)
        assert message.startswith(str(path)) and "\n" not in message, message


def test_the_decompression_bomb_is_refused_from_its_header(bad_image_corpus):
    path = bad_image_corpus.root / "bomb.png"
    assert path.stat().st_size < 2_000_000  # small on disk, 400 M pixels claimed
    for read in (load_rgb, probe_image):
        with pytest.raises(UnreadableImageError, match="400000000 pixels|20000x20000"):
            read(path)


def test_sixteen_bit_png_keeps_its_contrast(bad_image_corpus):
    # PIL's plain convert("RGB") clips 16-bit values at 255: the image would be white.
    pixels = np.asarray(load_rgb(bad_image_corpus.root / "sixteen_bit.png"))
    reference = np.asarray(load_rgb(bad_image_corpus.root / "gray.png"))
    # 16-bit values are scaled by their maximum, so the result is the 8-bit gray stretched.
    stretched = reference[..., 0] * (255.0 / reference[..., 0].max())
    assert np.abs(pixels[..., 0] - stretched).max() <= 1.0
    assert pixels.min() < 128 < pixels.max()


def test_exif_orientation_is_applied(bad_image_corpus):
    path = bad_image_corpus.root / "exif_rotated.jpg"
    with Image.open(path) as raw:
        stored = np.asarray(raw.convert("RGB"))
    shown = np.asarray(load_rgb(path))
    assert stored.shape[:2] == (40, 64) and shown.shape[:2] == (64, 40)
    # Orientation 6: the stored image rotated 90 degrees clockwise.
    rotated = np.rot90(stored, k=-1)
    assert np.abs(shown.astype(int) - rotated.astype(int)).mean() < 2


def test_list_images_is_sorted_and_ignores_other_files(tmp_path, bad_image_corpus):
    (bad_image_corpus.root / "notes.txt").write_text("x")
    assert list_images(bad_image_corpus.root) == bad_image_corpus.all_names
