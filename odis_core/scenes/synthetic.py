"""Synthetic multi-object scenes: the data `odis demo` and the tests run on (nothing to download).

A scene is a textured background with 2-5 objects pasted one over the other. Each of the
ten classes has its own shape AND its own texture pattern; an object's colours are drawn
independently of its class (hue uniform over the colour wheel), so colour says nothing of
the class and a network has to see shape and texture (the point of an object-level
pretraining demo; issue 17: with class-typical hues, self-distillation picked up the hue
cue at once and the demo's gain measured colour). `class_hues=True` restores the older
scenes: a class-typical hue with a per-instance jitter that overlaps the neighbouring
classes'. Size, rotation, position, brightness and contrast vary per instance.

Annotations are the VISIBLE masks after occlusion. Placement is rejected and retried
when a new object would leave an earlier one with less than `min_visible_fraction` of its
shape, or would itself be mostly out of frame or too small, so every annotated object is
recognisable and big enough for object-aware cropping (spec §3).

Masks and pixels agree exactly: an object's shape is rasterised first (supersampled, then
thresholded at half coverage, for clean edges), and its texture is painted only through
that binary mask.

On disk (one folder per split):

    OUT/<split>/images/<split>_00000.png ...   RGB PNG
    OUT/<split>/annotations.json               COCO instances: images, annotations
                                               (compressed RLE, area, bbox from pycocotools),
                                               categories 1..C named after SCENE_CLASSES

Every random choice comes from a numpy Generator seeded per image (`scene_rng`), so the
same seed and config give byte-identical PNGs and JSON.
"""

from __future__ import annotations

import colorsys
import dataclasses
import math
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from odis_core.scenes.coco_split import (
    AnnotatedObject,
    ProgressFn,
    SceneGenerationError,
    SceneSplit,
    write_scene_split,
)

# (shape, texture) per class; category_id = index + 1. Hues are spread evenly over the
# colour wheel in this order (36 degrees apart).
_CLASS_STYLES: tuple[tuple[str, str], ...] = (
    ("disc", "rings"),
    ("square", "checker"),
    ("triangle", "stripes"),
    ("star", "shaded"),
    ("ring", "speckle"),
    ("cross", "grid"),
    ("hexagon", "dots"),
    ("crescent", "gradient"),
    ("diamond", "waves"),
    ("ellipse", "spokes"),
)
SCENE_CLASSES: tuple[str, ...] = tuple(shape for shape, _ in _CLASS_STYLES)
SCENE_TEXTURES: tuple[str, ...] = tuple(texture for _, texture in _CLASS_STYLES)


@dataclass(frozen=True)
class SceneConfig:
    """How scenes are drawn. Sizes are fractions of the image side so one config scales."""

    image_size: int = 64
    min_objects: int = 2
    max_objects: int = 5
    object_scale: tuple[float, float] = (0.22, 0.42)  # object diameter / image side
    min_visible_fraction: float = 0.5  # visible pixels / whole-shape pixels, every object
    min_object_area: float = 0.006  # visible pixels / image pixels, every object
    # Colour independent of the class (default), or class-typical hues +- hue_jitter_degrees
    class_hues: bool = False
    hue_jitter_degrees: float = 24.0  # > 18 (half the class spacing): neighbours overlap
    supersample: int = 4  # shape rasterisation factor, for clean edges
    placement_tries: int = 30  # per object, before settling for fewer objects
    scene_restarts: int = 20  # when fewer than min_objects could be placed

    def __post_init__(self) -> None:
        low, high = self.object_scale
        problems = [
            (self.image_size < 8, "image_size must be >= 8"),
            (not 1 <= self.min_objects <= self.max_objects,
             "need 1 <= min_objects <= max_objects"),
            (not 0 < low <= high <= 1, "object_scale must satisfy 0 < low <= high <= 1"),
            (not 0 < self.min_visible_fraction <= 1, "min_visible_fraction must be in (0, 1]"),
            (not 0 <= self.min_object_area < 1, "min_object_area must be in [0, 1)"),
            (self.supersample < 1, "supersample must be >= 1"),
            (self.placement_tries < 1 or self.scene_restarts < 1,
             "placement_tries and scene_restarts must be >= 1"),
        ]
        for failed, message in problems:
            if failed:
                raise ValueError(f"SceneConfig: {message}")

    @property
    def min_object_pixels(self) -> int:
        return math.ceil(self.min_object_area * self.image_size**2)


@dataclass(frozen=True)
class SceneObject:
    """One placed object. Masks are (H, W) bool over the image frame."""

    category_id: int  # 1..len(SCENE_CLASSES)
    full_mask: np.ndarray  # (H, W) bool: the object's in-frame shape, before occlusion
    visible_mask: np.ndarray  # (H, W) bool: full_mask minus what later objects cover
    shape_pixels: int  # pixels of the whole shape, including any part out of frame
    texture_rgb: np.ndarray  # (H, W, 3) uint8: the object's paint; meaningful under full_mask


@dataclass(frozen=True)
class Scene:
    image: np.ndarray  # (H, W, 3) uint8: background with objects pasted in order
    background: np.ndarray  # (H, W, 3) uint8: the background before any object
    objects: tuple[SceneObject, ...]  # in paste order (later ones occlude earlier ones)


# --------------------------------------------------------------------------- shapes
# Each shape is a list of (polygon, fill) in units of the object radius, centred at 0;
# fill 0 cuts a hole (ring, crescent).


def _ellipse(rx: float, ry: float, cx: float = 0.0, n: int = 48) -> np.ndarray:
    angle = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    return np.stack([cx + rx * np.cos(angle), ry * np.sin(angle)], axis=1)


def _regular(n: int, radius: float = 1.0, start: float = -np.pi / 2) -> np.ndarray:
    angle = start + np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    return np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)


def _star(points: int = 5, inner: float = 0.5) -> np.ndarray:
    radius = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    angle = -np.pi / 2 + np.linspace(0.0, 2.0 * np.pi, 2 * points, endpoint=False)
    return np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)


def _plus(half_width: float = 0.36) -> np.ndarray:
    a, w = 1.0, half_width
    return np.array([(-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w), (w, a), (-w, a),
                     (-w, w), (-a, w), (-a, -w), (-w, -w)])


_SHAPES: dict[str, tuple[tuple[np.ndarray, int], ...]] = {
    "disc": ((_ellipse(1.0, 1.0), 255),),
    "square": ((_regular(4, 1.0, np.pi / 4), 255),),
    "triangle": ((_regular(3), 255),),
    "star": ((_star(), 255),),
    "ring": ((_ellipse(1.0, 1.0), 255), (_ellipse(0.55, 0.55), 0)),
    "cross": ((_plus(), 255),),
    "hexagon": ((_regular(6), 255),),
    "crescent": ((_ellipse(1.0, 1.0), 255), (_ellipse(0.8, 0.8, cx=0.5), 0)),
    "diamond": ((np.array([(1.0, 0.0), (0.0, 0.62), (-1.0, 0.0), (0.0, -0.62)]), 255),),
    "ellipse": ((_ellipse(1.0, 0.6), 255),),
}


def _rasterize_shape(
    shape: str, centre_xy: tuple[float, float], radius_px: float, angle: float,
    image_size: int, supersample: int,
) -> tuple[np.ndarray, int]:
    """(H, W) bool in-frame mask of a rotated shape, and its whole-shape pixel count.

    Drawn in a small box around the object at `supersample`x and thresholded at half
    coverage; the box may stick out of the frame, which is how the whole-shape size
    (for the visible-fraction rule) is known.
    """
    cx, cy = centre_xy
    x0, y0 = math.floor(cx - radius_px) - 1, math.floor(cy - radius_px) - 1
    box = math.ceil(2 * radius_px) + 3
    canvas = Image.new("L", (box * supersample, box * supersample), 0)
    draw = ImageDraw.Draw(canvas)
    rotation = np.array([[math.cos(angle), math.sin(angle)], [-math.sin(angle), math.cos(angle)]])
    for unit_polygon, fill in _SHAPES[shape]:
        points = (unit_polygon @ rotation * radius_px + (cx - x0, cy - y0)) * supersample
        draw.polygon([tuple(p) for p in points.tolist()], fill=fill)
    coverage = np.asarray(canvas, dtype=np.uint16).reshape(box, supersample, box, supersample)
    local = coverage.sum(axis=(1, 3)) * 2 >= 255 * supersample * supersample
    frame = np.zeros((image_size, image_size), dtype=bool)
    fy0, fx0 = max(y0, 0), max(x0, 0)
    fy1, fx1 = min(y0 + box, image_size), min(x0 + box, image_size)
    if fy1 > fy0 and fx1 > fx0:
        frame[fy0:fy1, fx0:fx1] = local[fy0 - y0:fy1 - y0, fx0 - x0:fx1 - x0]
    return frame, int(local.sum())


# --------------------------------------------------------------------------- textures
# A texture maps object-frame coordinates (u, v in pixels, rotating with the object) to a
# tone t in [0, 1] that mixes the object's dark and light colours.


@lru_cache(maxsize=8)
def _pixel_centres(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:image_size, 0:image_size].astype(np.float64) + 0.5
    return xs, ys


def _tone(texture: str, u: np.ndarray, v: np.ndarray, radius_px: float, period_px: float,
          phase: float, rng: np.random.Generator) -> np.ndarray:
    r = np.hypot(u, v)
    if texture == "rings":
        return (np.mod(r / period_px + phase, 1.0) < 0.5).astype(np.float64)
    if texture == "checker":
        cells = np.floor(u / (0.6 * period_px) + phase) + np.floor(v / (0.6 * period_px) + phase)
        return np.mod(cells, 2.0)
    if texture == "stripes":
        return (np.mod(v / period_px + phase, 1.0) < 0.5).astype(np.float64)
    if texture == "shaded":  # near-solid: a soft highlight towards one side
        return np.clip(0.85 - 0.35 * (u + v) / (1.4 * radius_px), 0.0, 1.0)
    if texture == "speckle":  # 2-px random blocks, fixed to the frame
        size = u.shape[0]
        blocks = rng.random(((size + 1) // 2, (size + 1) // 2)) < 0.5
        return np.kron(blocks, np.ones((2, 2)))[:size, :size].astype(np.float64)
    if texture == "grid":
        lines = (np.mod(u / period_px + phase, 1.0) < 0.35) | (np.mod(v / period_px, 1.0) < 0.35)
        return 1.0 - lines.astype(np.float64)
    if texture == "dots":
        du = np.mod(u / period_px + phase, 1.0) - 0.5
        dv = np.mod(v / period_px + phase, 1.0) - 0.5
        return (np.hypot(du, dv) > 0.3).astype(np.float64)
    if texture == "gradient":
        return np.clip(0.5 + 0.5 * u / radius_px, 0.0, 1.0)
    if texture == "waves":
        wave = v + 0.3 * period_px * np.sin(2 * np.pi * u / period_px)
        return (np.mod(wave / period_px + phase, 1.0) < 0.5).astype(np.float64)
    if texture == "spokes":
        return (np.mod(8 * np.arctan2(v, u) / (2 * np.pi) + phase, 1.0) < 0.5).astype(np.float64)
    raise ValueError(f"unknown texture {texture!r}")


def _hsv_rgb(hue: float, saturation: float, value: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(hue % 1.0, saturation, value)) * 255.0


def _paint(category_id: int, centre_xy: tuple[float, float], radius_px: float, angle: float,
           image_size: int, rng: np.random.Generator, config: SceneConfig) -> np.ndarray:
    """(H, W, 3) uint8: the object's texture over the whole frame, in its instance colours."""
    class_index = category_id - 1
    if config.class_hues:
        jitter = rng.uniform(-config.hue_jitter_degrees, config.hue_jitter_degrees) / 360.0
        hue = class_index / len(SCENE_CLASSES) + jitter
    else:
        hue = rng.uniform(0.0, 1.0)  # one draw either way
    saturation, value = rng.uniform(0.55, 0.95), rng.uniform(0.7, 1.0)
    light = _hsv_rgb(hue, saturation * rng.uniform(0.5, 0.8), value)
    dark = _hsv_rgb(hue, saturation, value * rng.uniform(0.3, 0.5))
    period_px = max(3.0, 2.0 * radius_px * rng.uniform(0.24, 0.32))
    phase = rng.uniform(0.0, 1.0)
    xs, ys = _pixel_centres(image_size)
    dx, dy = xs - centre_xy[0], ys - centre_xy[1]
    u = dx * math.cos(angle) + dy * math.sin(angle)
    v = -dx * math.sin(angle) + dy * math.cos(angle)
    tone = _tone(SCENE_TEXTURES[class_index], u, v, radius_px, period_px, phase, rng)
    rgb = dark + tone[..., None] * (light - dark)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- background


def _smooth_noise(rng: np.random.Generator, grid: int, image_size: int) -> np.ndarray:
    """(H, W) float: a bicubic upsampling of a grid x grid normal field (low frequency)."""
    coarse = rng.normal(0.0, 1.0, (grid, grid)).astype(np.float32)
    image = Image.fromarray(coarse).resize((image_size, image_size), Image.BICUBIC)
    return np.asarray(image, dtype=np.float64)


def render_background(rng: np.random.Generator, image_size: int) -> np.ndarray:
    """(H, W, 3) uint8: a dull, smooth random field with fine noise.

    Kept low in saturation, aperiodic and smooth so it never looks like one of the class
    textures, while still giving the network something other than a flat fill to ignore.
    """
    base = _hsv_rgb(rng.uniform(), rng.uniform(0.05, 0.3), rng.uniform(0.3, 0.75))
    xs, ys = _pixel_centres(image_size)
    direction = rng.uniform(0.0, 2.0 * np.pi)
    ramp = ((xs * math.cos(direction) + ys * math.sin(direction)) / image_size - 0.5)
    brightness = 50.0 * rng.uniform(-1.0, 1.0) * ramp + 22.0 * _smooth_noise(rng, 4, image_size)
    tint = np.stack([_smooth_noise(rng, 3, image_size) for _ in range(3)], axis=-1) * 10.0
    grain = rng.normal(0.0, 4.0, (image_size, image_size, 3))
    rgb = base + brightness[..., None] + tint + grain
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- scenes


def _try_place(
    rng: np.random.Generator, category_id: int, placed: list[tuple[np.ndarray, np.ndarray, int]],
    config: SceneConfig,
) -> tuple[np.ndarray, int, tuple[float, float], float, float] | None:
    """One placement attempt: (full mask, shape pixels, centre, radius, angle), or None
    when it breaks a visibility rule (for itself or for an object already placed)."""
    size = config.image_size
    radius_px = 0.5 * size * rng.uniform(*config.object_scale)
    margin = 0.3 * radius_px  # centres near the border: partly cut objects, as in photos
    centre = (rng.uniform(margin, size - margin), rng.uniform(margin, size - margin))
    angle = rng.uniform(0.0, 2.0 * np.pi)
    full, shape_pixels = _rasterize_shape(
        SCENE_CLASSES[category_id - 1], centre, radius_px, angle, size, config.supersample)
    if not _visible_enough(int(full.sum()), shape_pixels, config):
        return None
    for _, visible, earlier_pixels in placed:
        if not _visible_enough(int((visible & ~full).sum()), earlier_pixels, config):
            return None
    return full, shape_pixels, centre, radius_px, angle


def _visible_enough(visible_pixels: int, shape_pixels: int, config: SceneConfig) -> bool:
    return (visible_pixels >= config.min_object_pixels
            and visible_pixels >= config.min_visible_fraction * shape_pixels)


def compose_scene(rng: np.random.Generator, config: SceneConfig = SceneConfig()) -> Scene:
    """A scene with every layer kept: background, per-object full and visible masks, paint.

    Draws the number of objects in [min_objects, max_objects]; when an object cannot be
    placed within `placement_tries`, the scene keeps the objects placed so far if they are
    at least `min_objects`, and is redrawn from scratch otherwise.
    """
    size = config.image_size
    background = render_background(rng, size)
    for _ in range(config.scene_restarts):
        n_objects = int(rng.integers(config.min_objects, config.max_objects + 1))
        placed: list[tuple[np.ndarray, np.ndarray, int]] = []  # (full, visible, shape px)
        painted: list[tuple[int, np.ndarray]] = []
        for _ in range(n_objects):
            category_id = int(rng.integers(len(SCENE_CLASSES))) + 1
            for _ in range(config.placement_tries):
                placement = _try_place(rng, category_id, placed, config)
                if placement is not None:
                    break
            if placement is None:
                break
            full, shape_pixels, centre, radius_px, angle = placement
            placed = [(f, visible & ~full, px) for f, visible, px in placed]
            placed.append((full, full.copy(), shape_pixels))
            painted.append((category_id, _paint(category_id, centre, radius_px, angle, size,
                                                rng, config)))
        if len(placed) >= config.min_objects:
            break
    else:
        raise SceneGenerationError(
            f"could not place {config.min_objects} objects in a {size}px scene in "
            f"{config.scene_restarts} tries; lower min_objects, object_scale or "
            "min_visible_fraction"
        )
    image = background.copy()
    objects = []
    for (full, visible, shape_pixels), (category_id, texture) in zip(placed, painted, strict=True):
        image[full] = texture[full]
        objects.append(SceneObject(category_id, full, visible, shape_pixels, texture))
    return Scene(image=image, background=background, objects=tuple(objects))


def render_scene(
    rng: np.random.Generator, config: SceneConfig = SceneConfig()
) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """(H, W, 3) uint8 image and [(category_id, (H, W) bool visible mask)] in paste order."""
    scene = compose_scene(rng, config)
    return scene.image, [(obj.category_id, obj.visible_mask) for obj in scene.objects]


def scene_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of image `index` of a split seeded with `seed` (independent streams,
    so any one scene can be re-rendered without the ones before it)."""
    return np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=(index,)))


def split_seed(seed: int, split: str) -> int:
    """The seed `generate_scenes` gives a split: distinct per split name, stable across runs."""
    sequence = np.random.SeedSequence(entropy=seed, spawn_key=(zlib.crc32(split.encode()),))
    return int(sequence.generate_state(1, dtype=np.uint64)[0])


# --------------------------------------------------------------------------- writing


def generate_split(
    out_dir: Path, split: str, n_images: int, seed: int, config: SceneConfig = SceneConfig(),
    progress: ProgressFn | None = None,
) -> SceneSplit:
    """Write `n_images` scenes to OUT/<split>/images and their COCO file beside them
    (format and guarantees: `odis_core.scenes.coco_split`).

    Image `i` is `render_scene(scene_rng(seed, i), config)`. `progress(done, n_images)` is
    called after each image is written.
    """

    def render(index: int) -> tuple[np.ndarray, list[AnnotatedObject]]:
        image, objects = render_scene(scene_rng(seed, index), config)
        return image, [AnnotatedObject(category_id, mask) for category_id, mask in objects]

    settings = {key: list(value) if isinstance(value, tuple) else value
                for key, value in dataclasses.asdict(config).items()}
    info = {"description": "odis synthetic scenes", "split": split, "seed": seed,
            "config": settings}
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"}
                  for i, name in enumerate(SCENE_CLASSES)]
    return write_scene_split(out_dir, split, n_images, render, info, categories, progress)


def generate_scenes(
    out_dir: Path, n_train: int, n_test: int, seed: int = 0,
    config: SceneConfig = SceneConfig(), progress: ProgressFn | None = None,
) -> dict[str, SceneSplit]:
    """The train and test splits under OUT/, from per-split seeds derived from `seed`
    (`split_seed`), so no scene is shared. `progress(done, n_train + n_test)` spans both."""
    total = n_train + n_test
    splits: dict[str, SceneSplit] = {}
    done = 0
    for split, n_images in (("train", n_train), ("test", n_test)):
        offset = done

        def split_progress(count: int, _: int, offset: int = offset) -> None:
            if progress is not None:
                progress(offset + count, total)

        splits[split] = generate_split(out_dir, split, n_images, split_seed(seed, split),
                                       config, split_progress)
        done += n_images
    return splits
