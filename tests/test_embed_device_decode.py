"""Whole-image inputs decoded on the device (`decode_on="device"`): only files the device
decodes as the loader would go that way, the inputs match the loader's, broken bytes are
skipped and named, and the features match the loader path."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from odis_core.crops.photometric import normalize_only
from odis_core.embed.device_decode import encoded_jpeg, model_inputs
from odis_core.embed.inference import embed, resolve_decode_on
from odis_core.images import UnreadableImageError, load_rgb
from odis_core.model.obj_vit import ObjViT

SIZE = 32


def textured(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x * y) % 256], axis=-1)
    noisy = base + rng.normal(0, 12, base.shape)
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


def loader_input(path: Path) -> torch.Tensor:
    # What `_ObjectInputs` computes in the loader: PIL decode, bicubic resize, normalise.
    return normalize_only(load_rgb(path).resize((SIZE, SIZE), Image.Resampling.BICUBIC))


def headers_only_jpeg(source: Path, out: Path) -> Path:
    """A JPEG whose headers are complete and whose scan is missing, end marker present:
    it passes every cheap check and fails to decode (in PIL too)."""
    data = source.read_bytes()
    out.write_bytes(data[: data.find(b"\xff\xda")] + b"\xff\xd9")
    return out


def test_only_files_the_device_decodes_like_load_rgb_travel_encoded(bad_image_corpus, tmp_path):
    root = bad_image_corpus.root
    data, width, height = encoded_jpeg(root / "plain.jpg")
    assert (width, height) == (64, 48) and data.dtype == torch.uint8 and data.ndim == 1
    assert torch.equal(
        data, torch.frombuffer(bytearray((root / "plain.jpg").read_bytes()), dtype=torch.uint8)
    )
    textured(20, 30, 0).convert("L").save(tmp_path / "gray.jpg")
    assert encoded_jpeg(tmp_path / "gray.jpg")[1:] == (30, 20)
    # CMYK, EXIF-rotated, broken, non-JPEG and over-limit files stay with the loader.
    for name in (
        "cmyk.jpg",
        "exif_rotated.jpg",
        "truncated.jpg",
        "empty.jpg",
        "text.jpg",
        "rgba.png",
        "gray.png",
        "bomb.png",
    ):
        assert encoded_jpeg(root / name) is None, name
    assert encoded_jpeg(root / "plain.jpg", max_pixels=64 * 48 - 1) is None
    # Cut inside the scan: headers complete, no end marker. The device decoder would pad
    # the rest with grey where load_rgb refuses the file, so it stays with the loader.
    data = (root / "plain.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) * 4 // 5])
    assert encoded_jpeg(tmp_path / "cut.jpg") is None
    with pytest.raises(UnreadableImageError):
        load_rgb(tmp_path / "cut.jpg")


def test_device_inputs_match_the_loader_inputs_in_order(tmp_path):
    paths = []
    for index, (height, width) in enumerate([(60, 90), (31, 17), (200, 150)]):
        image = textured(height, width, index)
        paths.append(tmp_path / f"{index}.jpg")
        (image.convert("L") if index == 1 else image).save(paths[-1], quality=92)
    expected = [loader_input(path) for path in paths]
    # A batch mixing the loader's tensors (first, last) and encoded bytes (middle) ...
    entries = [expected[0], encoded_jpeg(paths[1])[0], expected[2]]
    inputs, failed = model_inputs(entries, SIZE, "cpu")
    assert failed == [] and inputs.shape == (3, 3, SIZE, SIZE)
    assert torch.equal(inputs[0], expected[0]) and torch.equal(inputs[2], expected[2])
    # ... and every image decoded and resized on the device: within rounding of PIL's.
    inputs, _ = model_inputs([encoded_jpeg(path)[0] for path in paths], SIZE, "cpu")
    for got, want in zip(inputs, expected, strict=True):
        difference = (got - want).abs()
        assert difference.mean() < 0.01 and difference.max() < 0.15  # 1 / 255 / 0.225 = 0.017


def test_bytes_that_do_not_decode_are_reported_not_fatal(tmp_path):
    textured(40, 40, 3).save(tmp_path / "good.jpg")
    broken = headers_only_jpeg(tmp_path / "good.jpg", tmp_path / "broken.jpg")
    assert encoded_jpeg(broken) is not None  # it passes the cheap checks
    entries = [encoded_jpeg(tmp_path / "good.jpg")[0], encoded_jpeg(broken)[0]]
    inputs, failed = model_inputs(entries, SIZE, "cpu")
    assert failed == [1]
    torch.testing.assert_close(inputs[0], model_inputs(entries[:1], SIZE, "cpu")[0][0])


def test_embed_decoded_on_the_device_equals_the_loader_path_and_skips_the_same(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for index in range(5):
        textured(48 + 8 * index, 64, index).save(images / f"{index}.jpg", quality=92)
    textured(48, 64, 9).save(images / "5.png")  # not a JPEG: decoded by the loader
    headers_only_jpeg(images / "0.jpg", images / "6.jpg")
    torch.manual_seed(0)
    backbone = ObjViT("vit_tiny", img_size=SIZE, patch_size=8, drop_path_rate=0.0, depth=1)
    results = {
        where: embed(
            backbone, images, None, level="image", image_size=SIZE, batch_size=4, decode_on=where
        )
        for where in ("loader", "device")
    }
    loader, device = results["loader"], results["device"]
    assert [row["image"] for row in device.meta] == [row["image"] for row in loader.meta]
    assert [row["image"] for row in device.meta] == [f"{i}.jpg" for i in range(5)] + ["5.png"]
    cosine = torch.nn.functional.cosine_similarity(
        torch.from_numpy(device.features), torch.from_numpy(loader.features)
    )
    assert cosine.min() > 0.999
    assert np.array_equal(device.features[5], loader.features[5])  # the PNG: same path
    assert len(loader.skipped) == len(device.skipped) == 1
    assert "6.jpg" in loader.skipped[0] and "6.jpg: cannot decode" in device.skipped[0]


def test_auto_decodes_on_the_device_only_on_cuda():
    assert resolve_decode_on("auto", "cpu") == "loader"
    assert resolve_decode_on("auto", "cuda:1") == "device"
    assert resolve_decode_on("device", "cpu") == "device"
    with pytest.raises(ValueError, match="decode_on"):
        resolve_decode_on("gpu", "cpu")
