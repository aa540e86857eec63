"""Multi-object scenes composed from Fashion-MNIST items: real images we did not make.

Fashion-MNIST (Xiao, Rasul, Vollgraf 2017) is 70,000 grey 28 x 28 photographs of clothing
in ten classes, 60,000 train and 10,000 test, shipped as four IDX files (gzipped or not;
the Debian package `dataset-fashion-mnist` puts them under /usr/share/datasets/fashion-mnist).
A scene pastes 2-4 items, each resized, tinted and placed at random, over a background;
an item's object mask is its silhouette (the resized item's pixels at or above a
threshold) and its category is the item's class. Items are painted only through their
silhouette, so masks and pixels agree exactly.

Train scenes draw only train-split items and test scenes only test-split items, so an
object-level k-NN on the test scenes never meets an item it was pretrained on.
Annotations are the VISIBLE masks after occlusion; a placement is rejected and retried
when it would cover more than `occlusion_limit` of an earlier item's silhouette, or when
an item would be too small to find. Each annotation also records which source item it is
(`source_split`, `source_index`).

Every random choice comes from a per-image numpy Generator (`scene_rng`), so the same
source, seed and config give byte-identical PNGs and JSON (the layout of
`odis_core.scenes.coco_split`).
"""

from __future__ import annotations

import colorsys
import dataclasses
import gzip
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from odis_core.scenes.coco_split import (
    AnnotatedObject,
    ProgressFn,
    SceneGenerationError,
    SceneSplit,
    write_scene_split,
)
from odis_core.scenes.synthetic import render_background, scene_rng, split_seed

# The dataset's label order (label i is category_id i + 1).
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
DEFAULT_SOURCE = Path("/usr/share/datasets/fashion-mnist")
BACKGROUNDS = ("texture", "plain", "black")
# Our split name -> the prefix of the dataset's file names.
_FILE_PREFIX = {"train": "train", "test": "t10k"}
# IDX type byte -> numpy dtype (multi-byte values are big-endian).
_IDX_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class SourceDataError(SceneGenerationError):
    """The item source is missing or malformed; the message names the file."""


# --------------------------------------------------------------------------- source


def read_idx(path: Path | str) -> np.ndarray:
    """The array of an IDX file (gzipped or not, told by its first bytes, not its name)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as error:
        raise SourceDataError(f"{path}: cannot read ({error})") from None
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in _IDX_DTYPES:
        raise SourceDataError(f"{path}: not an IDX file (bad magic number)")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise SourceDataError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) - header != expected:
        raise SourceDataError(
            f"{path}: IDX header promises {expected} data bytes for shape {shape}, "
            f"file holds {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def find_idx_file(source_dir: Path, split: str, kind: str) -> Path:
    """The `kind` ("images" or "labels") file of `split` under `source_dir`, under any of
    the names the dataset is distributed with (`-idx3-ubyte` or `.idx3-ubyte`, `.gz` or not)."""
    prefix, rank = _FILE_PREFIX[split], 3 if kind == "images" else 1
    stems = (f"{prefix}-{kind}-idx{rank}-ubyte", f"{prefix}-{kind}.idx{rank}-ubyte")
    for stem in stems:
        for name in (f"{stem}.gz", stem):
            if (source_dir / name).is_file():
                return source_dir / name
    raise SourceDataError(
        f"{source_dir}: no {stems[0]}[.gz] (Fashion-MNIST IDX files: `apt-get install "
        "dataset-fashion-mnist`, or the four files from the dataset's site)"
    )


@dataclass(frozen=True)
class ItemSource:
    """One split of the item dataset."""

    split: str  # "train" or "test"
    images: np.ndarray  # (N, h, w) uint8, light item on a dark ground
    labels: np.ndarray  # (N,) int64, 0..len(FASHION_MNIST_CLASSES)-1


def load_items(source_dir: Path | str, split: str) -> ItemSource:
    """The `split` ("train" or "test") items of the Fashion-MNIST IDX files in `source_dir`."""
    if split not in _FILE_PREFIX:
        raise ValueError(f"split must be one of {tuple(_FILE_PREFIX)}, got {split!r}")
    source_dir = Path(source_dir)
    if not source_dir.is_dir():
        raise SourceDataError(f"{source_dir}: not a directory")
    images_path = find_idx_file(source_dir, split, "images")
    labels_path = find_idx_file(source_dir, split, "labels")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise SourceDataError(
            f"{images_path}: expected (N, h, w) unsigned bytes, got {images.ndim}-D {images.dtype}"
        )
    if labels.ndim != 1 or len(labels) != len(images):
        raise SourceDataError(
            f"{labels_path}: expected {len(images)} labels (one per image "
            f"of {images_path.name}), got shape {labels.shape}"
        )
    if len(images) == 0:
        raise SourceDataError(f"{images_path}: holds no images")
    labels = labels.astype(np.int64)
    if labels.min() < 0 or labels.max() >= len(FASHION_MNIST_CLASSES):
        raise SourceDataError(f"{labels_path}: labels must be 0..{len(FASHION_MNIST_CLASSES) - 1}")
    return ItemSource(split, images, labels)


# --------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class FashionSceneConfig:
    """How scenes are composed. Sizes are fractions of the canvas side so one config scales."""

    canvas_size: int = 64
    min_objects: int = 2
    max_objects: int = 4
    object_scale: tuple[float, float] = (0.4, 0.65)  # item side / canvas side
    background: str = "texture"  # "texture" (smooth dull field), "plain" (flat grey), "black"
    tint: float = 0.6  # saturation of each item's random colour; 0 keeps items grey
    occlusion_limit: float = 0.5  # most of an item's silhouette that later items may cover
    silhouette_threshold: int = 32  # resized item pixel (0-255) at or above: in the mask
    min_object_area: float = 0.01  # visible pixels / canvas pixels, every object
    placement_tries: int = 30  # per object, before settling for fewer objects
    scene_restarts: int = 20  # when fewer than min_objects could be placed

    def __post_init__(self) -> None:
        low, high = self.object_scale
        problems = [
            (self.canvas_size < 8, "canvas_size must be >= 8"),
            (not 1 <= self.min_objects <= self.max_objects, "need 1 <= min_objects <= max_objects"),
            (not 0 < low <= high <= 1, "object_scale must satisfy 0 < low <= high <= 1"),
            (self.background not in BACKGROUNDS, f"background must be one of {BACKGROUNDS}"),
            (not 0 <= self.tint <= 1, "tint must be in [0, 1]"),
            (not 0 <= self.occlusion_limit < 1, "occlusion_limit must be in [0, 1)"),
            (not 1 <= self.silhouette_threshold <= 255, "silhouette_threshold must be 1..255"),
            (not 0 <= self.min_object_area < 1, "min_object_area must be in [0, 1)"),
            (
                self.placement_tries < 1 or self.scene_restarts < 1,
                "placement_tries and scene_restarts must be >= 1",
            ),
        ]
        for failed, message in problems:
            if failed:
                raise ValueError(f"FashionSceneConfig: {message}")

    @property
    def min_object_pixels(self) -> int:
        return max(1, math.ceil(self.min_object_area * self.canvas_size**2))


@dataclass(frozen=True)
class PastedItem:
    """One item of a scene. Masks are (H, W) bool over the canvas."""

    category_id: int  # source label + 1
    source_index: int  # index of the item in its split's IDX file
    box_xyxy: tuple[int, int, int, int]  # where the resized item square was pasted
    full_mask: np.ndarray  # (H, W) bool: the item's silhouette, before occlusion
    visible_mask: np.ndarray  # (H, W) bool: full_mask minus what later items cover
    paint_rgb: np.ndarray  # (H, W, 3) uint8: the tinted item; meaningful under full_mask


@dataclass(frozen=True)
class FashionScene:
    image: np.ndarray  # (H, W, 3) uint8: background with items pasted in order
    background: np.ndarray  # (H, W, 3) uint8
    items: tuple[PastedItem, ...]  # in paste order (later ones occlude earlier ones)


def _background(rng: np.random.Generator, config: FashionSceneConfig) -> np.ndarray:
    size = config.canvas_size
    if config.background == "texture":
        return render_background(rng, size)
    if config.background == "plain":
        grey = int(rng.integers(40, 216))
        return np.full((size, size, 3), grey, dtype=np.uint8)
    return np.zeros((size, size, 3), dtype=np.uint8)


def _item_colour(rng: np.random.Generator, tint: float) -> np.ndarray:
    """(3,) float RGB in 0..255 of an item's brightest pixel: a random hue at `tint` saturation."""
    hue, saturation = rng.uniform(), tint * rng.uniform(0.6, 1.0)
    return np.array(colorsys.hsv_to_rgb(hue, saturation, rng.uniform(0.75, 1.0))) * 255.0


def _try_place(
    rng: np.random.Generator,
    item: np.ndarray,
    placed: list[tuple[np.ndarray, np.ndarray]],
    config: FashionSceneConfig,
) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int]] | None:
    """One placement attempt: the (H, W) full mask, the (H, W) item intensity in 0..1 and
    the paste box, or None when the item would be too small or would hide too much of an
    earlier one."""
    size = config.canvas_size
    side = min(size, max(2, round(size * rng.uniform(*config.object_scale))))
    x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, size=2))
    resized = np.asarray(Image.fromarray(item).resize((side, side), Image.Resampling.BILINEAR))
    intensity = np.zeros((size, size), dtype=np.float64)
    intensity[y0 : y0 + side, x0 : x0 + side] = resized / 255.0
    full = np.zeros((size, size), dtype=bool)
    full[y0 : y0 + side, x0 : x0 + side] = resized >= config.silhouette_threshold
    if int(full.sum()) < config.min_object_pixels:
        return None
    keep = 1.0 - config.occlusion_limit
    for earlier_full, earlier_visible in placed:
        visible = int((earlier_visible & ~full).sum())
        if visible < keep * int(earlier_full.sum()) or visible < config.min_object_pixels:
            return None
    return full, intensity, (x0, y0, x0 + side, y0 + side)


def compose_fashion_scene(
    rng: np.random.Generator,
    items: ItemSource,
    config: FashionSceneConfig = FashionSceneConfig(),
) -> FashionScene:
    """A scene of `items` with every layer kept: background, per-item masks and paint.

    Draws the number of items in [min_objects, max_objects] and each item uniformly from
    the source; when an item cannot be placed within `placement_tries`, the scene keeps
    the items placed so far if they are at least `min_objects`, and is redrawn otherwise.
    """
    background = _background(rng, config)
    for _ in range(config.scene_restarts):
        n_items = int(rng.integers(config.min_objects, config.max_objects + 1))
        placed: list[tuple[np.ndarray, np.ndarray]] = []  # (full, visible)
        chosen: list[tuple[int, tuple[int, int, int, int], np.ndarray]] = []  # index, box, paint
        for _ in range(n_items):
            index = int(rng.integers(len(items.images)))
            for _ in range(config.placement_tries):
                placement = _try_place(rng, items.images[index], placed, config)
                if placement is not None:
                    break
            if placement is None:
                break
            full, intensity, box = placement
            paint = intensity[..., None] * _item_colour(rng, config.tint)
            placed = [(f, visible & ~full) for f, visible in placed]
            placed.append((full, full.copy()))
            chosen.append((index, box, np.clip(np.rint(paint), 0, 255).astype(np.uint8)))
        if len(placed) >= config.min_objects:
            break
    else:
        raise SceneGenerationError(
            f"could not place {config.min_objects} items in a {config.canvas_size}px scene "
            f"in {config.scene_restarts} tries; lower min_objects or object_scale, or raise "
            "occlusion_limit"
        )
    image = background.copy()
    pasted = []
    for (full, visible), (index, box, paint) in zip(placed, chosen, strict=True):
        image[full] = paint[full]
        category_id = int(items.labels[index]) + 1
        pasted.append(PastedItem(category_id, index, box, full, visible, paint))
    return FashionScene(image=image, background=background, items=tuple(pasted))


def generate_fashion_split(
    items: ItemSource,
    out_dir: Path,
    n_images: int,
    seed: int,
    config: FashionSceneConfig = FashionSceneConfig(),
    progress: ProgressFn | None = None,
) -> SceneSplit:
    """Write `n_images` scenes of `items` as OUT/<items.split> (images + COCO JSON)."""

    def render(index: int) -> tuple[np.ndarray, list[AnnotatedObject]]:
        scene = compose_fashion_scene(scene_rng(seed, index), items, config)
        provenance = {"source_split": items.split}
        return scene.image, [
            AnnotatedObject(
                item.category_id,
                item.visible_mask,
                {**provenance, "source_index": item.source_index},
            )
            for item in scene.items
        ]

    settings = {
        key: list(value) if isinstance(value, tuple) else value
        for key, value in dataclasses.asdict(config).items()
    }
    info = {
        "description": "odis scenes of Fashion-MNIST items",
        "split": items.split,
        "seed": seed,
        "source_items": len(items.images),
        "config": settings,
    }
    categories = [
        {"id": i + 1, "name": name, "supercategory": "fashion"}
        for i, name in enumerate(FASHION_MNIST_CLASSES)
    ]
    return write_scene_split(out_dir, items.split, n_images, render, info, categories, progress)


def generate_fashion_scenes(
    source_dir: Path | str,
    out_dir: Path | str,
    n_train: int,
    n_test: int,
    seed: int = 0,
    config: FashionSceneConfig = FashionSceneConfig(),
    progress: ProgressFn | None = None,
) -> dict[str, SceneSplit]:
    """OUT/train from the source's train items and OUT/test from its test items, with
    per-split seeds derived from `seed`. `progress(done, n_train + n_test)` spans both.
    Both sources are read and checked before any scene is written."""
    sources = {split: load_items(source_dir, split) for split in ("train", "test")}
    total, done = n_train + n_test, 0
    splits: dict[str, SceneSplit] = {}
    for split, n_images in (("train", n_train), ("test", n_test)):

        def split_progress(count: int, _: int, offset: int = done) -> None:
            if progress is not None:
                progress(offset + count, total)

        splits[split] = generate_fashion_split(
            sources[split],
            Path(out_dir),
            n_images,
            split_seed(seed, split),
            config,
            split_progress,
        )
        done += n_images
    return splits
