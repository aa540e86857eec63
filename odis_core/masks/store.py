"""The mask store: the one on-disk format every odis command reads objects from.

A store is a directory of shards, each holding a run of images and their objects as flat
numpy arrays (.npy, so numpy reads them without odis):

    STORE/
      manifest.json   {"format": "odis-mask-store", "version": 2, "source": "coco"|"sam",
                       "images_root": "<dir the file names are relative to>" | null,
                       "n_images": ..., "n_objects": ..., "settings": {...},
                       "categories": [{"id", "name"}], "shards": [{"name", "n_images",
                       "n_objects"}], "n_skipped": ...}
      shards/<name>/  one .npy per column (see `_IMAGE_COLUMNS`, `_OBJECT_COLUMNS`)
      skipped.txt     "file: reason" per image the run could not read (unreadable, missing)

12 M COCO-style RLE objects do not fit comfortably in Python objects, so nothing is
decoded up front: opening a store reads the per-image columns (tens of bytes per image)
and sorts the image ids; `objects_of(image_id)` reads the byte ranges of one image's
objects from the per-object columns (tens of microseconds), so memory stays flat. Every image of the
dataset is listed, including images with no object (training falls back to the whole
image for those). A class-agnostic object (SAM) has `category_id` -1. An object may have a
box and no mask: it is then used as a filled box.

Each shard is written to a temporary directory and renamed; the manifest is written last
and names the shards it uses, so a store is either complete or absent, and a rewrite
replaces it in one rename. `export_coco` writes a COCO instances file that pycocotools
loads; `odis masks coco` imports one, so stores round-trip through COCO losslessly.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, overload

import numpy as np
from pycocotools import mask as mask_utils

from odis_core.atomic import atomic_write

STORE_FORMAT = "odis-mask-store"
STORE_VERSION = 2
UNKNOWN_CATEGORY = -1
SHARD_DIR = "shards"
SKIPPED_FILE = "skipped.txt"  # one "file: reason" line per image skipped (unreadable, missing)
# Images per shard: small enough that a writer buffers a shard in memory cheaply (about
# 330 k objects at 10 per image), large enough that a million-image store has few files
# (and a reader few open descriptors: 8 per shard it has visited).
DEFAULT_SHARD_IMAGES = 32_768

_IMAGE_COLUMNS = ("image_ids", "image_hw", "name_bytes", "name_ends", "object_ends")
_OBJECT_COLUMNS = (
    "object_ids",
    "category_ids",
    "bboxes_xywh",
    "areas",
    "scores",
    "rle_hw",
    "counts_bytes",
    "counts_ends",
)


class MaskStoreError(Exception):
    """A store that is missing or malformed; the message names the file and the problem."""


@dataclass(frozen=True)
class ImageRecord:
    image_id: int
    file_name: str  # relative to the store's images root, POSIX separators
    width: int
    height: int


@dataclass(frozen=True)
class ObjectRecord:
    object_id: int
    image_id: int
    category_id: int  # UNKNOWN_CATEGORY (-1) for class-agnostic sources
    bbox_xywh: tuple[float, float, float, float]
    area: float
    rle: dict[str, Any] | None = None  # compressed RLE {"size": [h, w], "counts": str}
    score: float | None = None


class _ColumnFile:
    """One per-object .npy column, read by byte range with os.pread: lookups never map or
    load the column, so memory stays flat however many images are visited."""

    def __init__(self, file: Path) -> None:
        self.file = file
        with open(file, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(handle)
            self.offset = handle.tell()
        if fortran:
            raise MaskStoreError(f"{file}: unexpected Fortran-ordered column")
        self.dtype, self.shape = dtype, shape
        self.row = int(np.prod(shape[1:], dtype=np.int64))  # values per row
        self._fd: int | None = None

    def __len__(self) -> int:
        return int(self.shape[0])

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(len(self))
        stop = max(stop, start)
        if self._fd is None:
            self._fd = os.open(self.file, os.O_RDONLY)
        width = self.row * self.dtype.itemsize
        data = os.pread(self._fd, (stop - start) * width, self.offset + start * width)
        return np.frombuffer(data, dtype=self.dtype).reshape((stop - start, *self.shape[1:]))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.close()


class _Shard:
    """One shard directory: its per-image columns in memory (tens of bytes per image), its
    per-object columns read on demand."""

    def __init__(self, directory: Path) -> None:
        self.columns: dict[str, Any] = {}
        for name in _IMAGE_COLUMNS + _OBJECT_COLUMNS:
            file = directory / f"{name}.npy"
            try:
                if name in _IMAGE_COLUMNS:
                    self.columns[name] = np.load(file, allow_pickle=False)
                else:
                    self.columns[name] = _ColumnFile(file)
            except (OSError, ValueError) as error:
                raise MaskStoreError(
                    f"{file}: missing or unreadable shard column ({error})"
                ) from None
        self.n_images = len(self.columns["image_ids"])
        self.n_objects = len(self.columns["object_ids"])

    def _span(self, ends: np.ndarray, index: int) -> tuple[int, int]:
        return (int(ends[index - 1]) if index else 0), int(ends[index])

    def image(self, index: int) -> ImageRecord:
        c = self.columns
        start, end = self._span(c["name_ends"], index)
        height, width = (int(v) for v in c["image_hw"][index])
        name = bytes(c["name_bytes"][start:end]).decode("utf-8")
        return ImageRecord(int(c["image_ids"][index]), name, width, height)

    def objects(self, index: int, image_id: int) -> list[ObjectRecord]:
        c = self.columns
        first, last = self._span(c["object_ends"], index)
        if first == last:
            return []
        # One read and one .tolist() per column, then plain Python values.
        base = int(c["counts_ends"][first - 1 : first][0]) if first else 0
        ends = c["counts_ends"][first:last].tolist()
        blob = bytes(c["counts_bytes"][base : ends[-1]])
        columns = zip(
            c["object_ids"][first:last].tolist(),
            c["category_ids"][first:last].tolist(),
            c["bboxes_xywh"][first:last].tolist(),
            c["areas"][first:last].tolist(),
            c["scores"][first:last].tolist(),
            c["rle_hw"][first:last].tolist(),
            ends,
            strict=True,
        )
        records, offset = [], base
        for object_id, category_id, bbox, area, score, (height, width), end in columns:
            rle = None
            if height >= 0:
                counts = blob[offset - base : end - base].decode("ascii")
                rle = {"size": [height, width], "counts": counts}
            offset = end
            records.append(
                ObjectRecord(
                    object_id,
                    image_id,
                    category_id,
                    tuple(bbox),
                    area,
                    rle,  # type: ignore[arg-type]
                    None if score != score else score,  # NaN marks "no score"
                )
            )
        return records


class ImageTable(Sequence[ImageRecord]):
    """The store's images in order, built on demand from the shards (never all at once)."""

    def __init__(self, store: MaskStore) -> None:
        self._store = store

    def __len__(self) -> int:
        return self._store.n_images

    @overload
    def __getitem__(self, index: int) -> ImageRecord: ...
    @overload
    def __getitem__(self, index: slice) -> list[ImageRecord]: ...
    def __getitem__(self, index):  # type: ignore[no-untyped-def]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        shard, local = self._store._locate(index)
        return shard.image(local)

    def __iter__(self) -> Iterator[ImageRecord]:
        for shard in self._store._shards:
            for local in range(shard.n_images):
                yield shard.image(local)


class ObjectView:
    """All objects of a store, in store order, decoded one image at a time."""

    def __init__(self, store: MaskStore) -> None:
        self._store = store

    def __len__(self) -> int:
        return self._store.n_objects

    def __iter__(self) -> Iterator[ObjectRecord]:
        return self._store._iter_objects()


class MaskStore:
    """Images and their objects, indexed by image id, read lazily from a store directory."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        manifest = _read_manifest(self.path)
        self.source: str = manifest.get("source", "coco")
        self.images_root: str | None = manifest.get("images_root")
        self.settings: dict[str, Any] = manifest.get("settings", {})
        try:
            self.categories: dict[int, str] = {
                int(c["id"]): str(c["name"]) for c in manifest.get("categories", [])
            }
            shard_names = [str(s["name"]) for s in manifest["shards"]]
        except (KeyError, TypeError, ValueError) as error:
            raise MaskStoreError(f"{self.path / 'manifest.json'}: malformed ({error!r})") from None
        self._shards = [_Shard(self.path / SHARD_DIR / name) for name in shard_names]
        sizes = np.array([s.n_images for s in self._shards], dtype=np.int64)
        self._shard_starts = np.concatenate([[0], np.cumsum(sizes)])
        self.n_images = int(self._shard_starts[-1])
        self.n_objects = sum(s.n_objects for s in self._shards)
        ids = (
            np.concatenate([np.asarray(s.columns["image_ids"]) for s in self._shards])
            if (self._shards)
            else np.zeros(0, dtype=np.int64)
        )
        # Image id -> position by binary search: two int64 arrays instead of a dict of
        # a million Python ints.
        self._order = np.argsort(ids, kind="stable")
        self._sorted_ids = ids[self._order]
        self._by_name: dict[str, int] | None = None
        self.images = ImageTable(self)

    @property
    def skipped(self) -> list[str]:
        """ "file: reason" of every image the run that made the store could not use."""
        report = self.path / SKIPPED_FILE
        return report.read_text(encoding="utf-8").splitlines() if report.is_file() else []

    def __getstate__(self) -> dict[str, Any]:
        # File descriptors are reopened in the receiving process (DataLoader workers
        # under spawn) and the columns re-read there rather than pickled.
        return {"path": self.path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"])  # type: ignore[misc]

    def _locate(self, position: int) -> tuple[_Shard, int]:
        shard = int(np.searchsorted(self._shard_starts, position, side="right")) - 1
        return self._shards[shard], position - int(self._shard_starts[shard])

    def _position(self, image_id: int) -> int | None:
        at = int(np.searchsorted(self._sorted_ids, image_id))
        if at < len(self._sorted_ids) and self._sorted_ids[at] == image_id:
            return int(self._order[at])
        return None

    def objects_of(self, image_id: int) -> list[ObjectRecord]:
        position = self._position(image_id)
        if position is None:
            return []
        shard, local = self._locate(position)
        return shard.objects(local, image_id)

    @property
    def objects(self) -> ObjectView:
        """Every object, image by image: sized and iterable, never held in one list."""
        return ObjectView(self)

    def _iter_objects(self) -> Iterator[ObjectRecord]:
        for shard in self._shards:
            for local in range(shard.n_images):
                image_id = int(shard.columns["image_ids"][local])
                yield from shard.objects(local, image_id)

    def object_counts(self) -> np.ndarray:
        """(n_images,) int64: objects of each image, in image order."""
        parts = [np.diff(np.asarray(s.columns["object_ends"]), prepend=0) for s in self._shards]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def object_areas(self) -> np.ndarray:
        """(n_objects,) float64: every object's area, in store order."""
        parts = [s.columns["areas"][:] for s in self._shards]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float64)

    def image(self, image_id: int) -> ImageRecord:
        position = self._position(image_id)
        if position is None:
            raise KeyError(image_id)
        return self.images[position]

    def image_by_name(self, file_name: str) -> ImageRecord | None:
        if self._by_name is None:  # built on first use only: most callers go by id
            self._by_name = {image.file_name: i for i, image in enumerate(self.images)}
        position = self._by_name.get(file_name)
        return None if position is None else self.images[position]

    def category_name(self, category_id: int) -> str:
        return self.categories.get(category_id, "object" if category_id < 0 else str(category_id))

    @property
    def n_images_without_objects(self) -> int:
        return int((self.object_counts() == 0).sum())

    @staticmethod
    def decode(obj: ObjectRecord, height: int, width: int) -> np.ndarray:
        """(height, width) bool mask of `obj`: its RLE, or its box filled when it has none."""
        if obj.rle is not None:
            return mask_utils.decode(obj.rle).astype(bool)
        return box_to_mask(obj.bbox_xywh, height, width)

    @classmethod
    def open(cls, path: Path | str) -> MaskStore:
        return read_store(path)


def box_to_mask(bbox_xywh: Sequence[float], height: int, width: int) -> np.ndarray:
    """(height, width) bool mask that is True inside the box (pixel centres inside)."""
    x, y, w, h = bbox_xywh
    mask = np.zeros((height, width), dtype=bool)
    x0, y0 = max(0, int(np.floor(x + 0.5))), max(0, int(np.floor(y + 0.5)))
    x1, y1 = min(width, int(np.ceil(x + w - 0.5))), min(height, int(np.ceil(y + h - 0.5)))
    mask[y0:y1, x0:x1] = True
    return mask


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """Compressed RLE of a (H, W) bool mask with `counts` as str (JSON-ready)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def object_from_mask(
    mask: np.ndarray,
    object_id: int,
    image_id: int,
    category_id: int = UNKNOWN_CATEGORY,
    score: float | None = None,
) -> ObjectRecord:
    """An ObjectRecord whose RLE, area and box all come from `mask` via pycocotools."""
    rle = encode_mask(mask)
    bbox = tuple(float(v) for v in mask_utils.toBbox(rle))
    return ObjectRecord(
        object_id=object_id,
        image_id=image_id,
        category_id=category_id,
        bbox_xywh=bbox,  # type: ignore[arg-type]
        area=float(mask_utils.area(rle)),
        rle=rle,
        score=score,
    )


class StoreWriter:
    """Writes a store image by image with bounded memory: a shard is buffered, then written
    to a temporary directory and renamed; `close()` writes the manifest last."""

    def __init__(
        self,
        path: Path | str,
        categories: dict[int, str] | None = None,
        source: str = "coco",
        images_root: Path | str | None = None,
        settings: dict[str, Any] | None = None,
        shard_images: int = DEFAULT_SHARD_IMAGES,
    ) -> None:
        self.path = Path(path)
        (self.path / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        self.categories = dict(categories or {})
        self.source = source
        self.images_root = str(Path(images_root).resolve()) if images_root is not None else None
        self.settings = settings or {}
        self.shard_images = shard_images
        # A fresh prefix per write: a rewrite never touches the shards the current
        # manifest names, so a reader (or a crash) sees the old store or the new one.
        self._prefix = uuid.uuid4().hex[:8]
        self._shards: list[dict[str, Any]] = []
        self._n_objects = 0
        self._reset()

    def _reset(self) -> None:
        self._images: list[ImageRecord] = []
        self._objects: list[ObjectRecord] = []
        self._object_ends: list[int] = []

    def add(self, image: ImageRecord, objects: Iterable[ObjectRecord]) -> None:
        self._images.append(image)
        self._objects.extend(objects)
        self._object_ends.append(len(self._objects))
        if len(self._images) >= self.shard_images:
            self._flush()

    def _flush(self) -> None:
        if not self._images:
            return
        name = f"{self._prefix}-{len(self._shards):05d}"
        temporary = self.path / SHARD_DIR / f".{name}.{os.getpid()}.tmp"
        temporary.mkdir()
        for column, array in _shard_columns(self._images, self._objects, self._object_ends):
            with atomic_write(temporary / f"{column}.npy") as handle:
                np.save(handle, array, allow_pickle=False)
        os.replace(temporary, self.path / SHARD_DIR / name)
        self._shards.append(
            {"name": name, "n_images": len(self._images), "n_objects": len(self._objects)}
        )
        self._n_objects += len(self._objects)
        self._reset()

    def close(self, skipped: Sequence[str] = ()) -> MaskStore:
        """Write the last shard and the manifest; remove the shards of the store replaced."""
        self._flush()
        previous = _manifest_shards(self.path / "manifest.json")
        manifest = {
            "format": STORE_FORMAT,
            "version": STORE_VERSION,
            "source": self.source,
            "images_root": self.images_root,
            "n_images": sum(s["n_images"] for s in self._shards),
            "n_objects": self._n_objects,
            "settings": self.settings,
            "categories": [{"id": c, "name": n} for c, n in sorted(self.categories.items())],
            "shards": self._shards,
            "n_skipped": len(skipped),
        }
        with atomic_write(self.path / SKIPPED_FILE, "w", encoding="utf-8") as handle:
            handle.writelines(f"{line}\n" for line in skipped)
        with atomic_write(self.path / "manifest.json", "w", encoding="utf-8") as handle:
            json.dump(manifest, handle)
        # Only the shards the replaced manifest named are removed: a concurrent writer's
        # shards (two SAM processes finishing together) are in no manifest until it
        # closes, so they are never deleted under it (at worst one copy stays behind).
        current = {s["name"] for s in self._shards}
        for name in previous - current:
            shutil.rmtree(self.path / SHARD_DIR / name, ignore_errors=True)
        (self.path / "objects.json").unlink(missing_ok=True)  # a version-1 store's data
        return MaskStore(self.path)


def _manifest_shards(file: Path) -> set[str]:
    """Shard names an existing manifest refers to (none when absent or unreadable)."""
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
        return {str(shard["name"]) for shard in manifest.get("shards", [])}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return set()


def _ends(lengths: list[int]) -> np.ndarray:
    return np.cumsum(np.asarray(lengths, dtype=np.int64), dtype=np.int64)


def _shard_columns(
    images: list[ImageRecord], objects: list[ObjectRecord], object_ends: list[int]
) -> Iterator[tuple[str, np.ndarray]]:
    names = [image.file_name.encode("utf-8") for image in images]
    counts = [obj.rle["counts"].encode("ascii") if obj.rle is not None else b"" for obj in objects]
    yield "image_ids", np.array([i.image_id for i in images], dtype=np.int64)
    yield "image_hw", np.array([(i.height, i.width) for i in images], dtype=np.int32).reshape(-1, 2)
    yield "name_bytes", np.frombuffer(b"".join(names), dtype=np.uint8)
    yield "name_ends", _ends([len(n) for n in names])
    yield "object_ends", np.asarray(object_ends, dtype=np.int64)
    yield "object_ids", np.array([o.object_id for o in objects], dtype=np.int64)
    yield "category_ids", np.array([o.category_id for o in objects], dtype=np.int32)
    # fromiter over a flat chain: np.array over a list of tuples is several times slower.
    boxes = chain.from_iterable(o.bbox_xywh for o in objects)
    yield "bboxes_xywh", np.fromiter(boxes, np.float64, 4 * len(objects)).reshape(-1, 4)
    yield "areas", np.array([o.area for o in objects], dtype=np.float64)
    yield (
        "scores",
        np.array([np.nan if o.score is None else o.score for o in objects], dtype=np.float64),
    )
    sizes = chain.from_iterable(o.rle["size"] if o.rle is not None else (-1, -1) for o in objects)
    yield "rle_hw", np.fromiter(sizes, np.int32, 2 * len(objects)).reshape(-1, 2)
    yield "counts_bytes", np.frombuffer(b"".join(counts), dtype=np.uint8)
    yield "counts_ends", _ends([len(c) for c in counts])


def write_store(
    path: Path | str,
    images: Iterable[ImageRecord],
    objects: Iterable[ObjectRecord],
    categories: dict[int, str] | None = None,
    source: str = "coco",
    images_root: Path | str | None = None,
    settings: dict[str, Any] | None = None,
    skipped: Sequence[str] = (),
    shard_images: int = DEFAULT_SHARD_IMAGES,
) -> MaskStore:
    """Write a store from in-memory records (objects grouped by image id) and return it."""
    by_image: dict[int, list[ObjectRecord]] = {}
    for obj in objects:
        by_image.setdefault(obj.image_id, []).append(obj)
    writer = StoreWriter(path, categories, source, images_root, settings, shard_images)
    for image in images:
        writer.add(image, by_image.get(image.image_id, []))
    return writer.close(skipped)


def _read_manifest(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise MaskStoreError(f"{path}: not a mask store directory")
    file = path / "manifest.json"
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MaskStoreError(f"{file}: not found (is this an odis mask store?)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise MaskStoreError(f"{file}: malformed JSON ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != STORE_FORMAT:
        raise MaskStoreError(f"{file}: not an {STORE_FORMAT} manifest")
    if manifest.get("version") == 1:
        # Version 1 kept every object in one objects.json (a COCO file): convert it rather
        # than load 12 M RLEs into Python objects.
        raise MaskStoreError(
            f"{file}: a version-1 mask store (objects.json); re-create it with `odis masks "
            f"coco --annotations {path / 'objects.json'} --images ROOT --out NEW_STORE`, or "
            "re-run `odis masks sam` on it (it resumes from its journal)"
        )
    if manifest.get("version") != STORE_VERSION:
        raise MaskStoreError(f"{file}: unsupported store version {manifest.get('version')!r}")
    return manifest


def read_store(path: Path | str) -> MaskStore:
    """Open a store directory written by `StoreWriter`/`write_store` (objects read lazily)."""
    return MaskStore(path)


def _annotation(obj: ObjectRecord) -> dict[str, Any]:
    annotation: dict[str, Any] = {
        "id": obj.object_id,
        "image_id": obj.image_id,
        "category_id": obj.category_id,
        "bbox": list(obj.bbox_xywh),
        "area": obj.area,
        "iscrowd": 0,
    }
    if obj.rle is not None:
        annotation["segmentation"] = obj.rle
    if obj.score is not None:
        annotation["score"] = obj.score
    return annotation


def export_coco(store: MaskStore, out: Path | str) -> Path:
    """Write `store` as a COCO instances JSON (pycocotools loads it), streamed annotation by
    annotation so a large store never sits in memory; atomic."""
    out = Path(out)
    with atomic_write(out, "w", encoding="utf-8") as handle:
        handle.write('{"images": [')
        for n, image in enumerate(store.images):
            record = {
                "id": image.image_id,
                "file_name": image.file_name,
                "width": image.width,
                "height": image.height,
            }
            handle.write(("," if n else "") + json.dumps(record))
        handle.write('], "annotations": [')
        for n, obj in enumerate(store.objects):
            handle.write(("," if n else "") + json.dumps(_annotation(obj)))
        categories = [{"id": c, "name": name} for c, name in sorted(store.categories.items())]
        handle.write('], "categories": ' + json.dumps(categories) + "}")
    return out
