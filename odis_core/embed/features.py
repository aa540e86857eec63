"""The feature directory (spec §12): what `odis embed` writes and `odis knn` reads.

    FEAT_DIR/
      features.npy   (N, D) float32 or float16, one row per object (or image)
      labels.npy     (N,) int64 category id, -1 where unknown (class-agnostic objects)
      meta.jsonl     N lines, one JSON object per row: {"image": file name, "image_id",
                     "object_id" (null at image level), "category", "category_id",
                     "box": [x, y, w, h]}
      info.json      provenance: {"backbone", "checkpoint", "level", "mode", "dim", "n", ...}

Plain formats on purpose: users analyse features in their own notebooks, so
`numpy.load` and `pandas.read_json(path, lines=True)` must read them without odis.
Each file is written to a temporary name and renamed, `info.json` last, so an interrupted
run never leaves a half-written array behind a complete-looking name.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from odis_core.atomic import atomic_write

FEATURES_FILE = "features.npy"
LABELS_FILE = "labels.npy"
META_FILE = "meta.jsonl"
INFO_FILE = "info.json"
FEATURE_DTYPES = (np.float32, np.float16)


class FeatureDirError(Exception):
    """A feature directory that is missing or malformed; the message names the file."""


@dataclass
class FeatureSet:
    """One feature directory in memory.

    features: (N, D) float32 or float16, one row per object (or image).
    labels: (N,) int64 category id of each row, -1 where unknown.
    meta: N dicts, the row's image file, ids, category and box.
    info: provenance of the features (backbone, checkpoint, level, mode, dim, ...).
    """

    features: np.ndarray
    labels: np.ndarray
    meta: list[dict[str, Any]]
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def _json_default(value: Any) -> Any:
    # Meta rows are often built from numpy scalars (ids, box coordinates).
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _checked_arrays(
    out_dir: Path, features: np.ndarray, labels: np.ndarray, meta: Sequence[dict]
) -> tuple[np.ndarray, np.ndarray]:
    features = np.asarray(features)
    labels = np.asarray(labels)
    if features.ndim != 2:
        raise ValueError(f"{out_dir}: features must be (N, D), got shape {features.shape}")
    if features.dtype not in FEATURE_DTYPES:
        if not np.issubdtype(features.dtype, np.floating):
            raise ValueError(f"{out_dir}: features must be floating point, got {features.dtype}")
        features = features.astype(np.float32)
    if labels.ndim != 1 or not (labels.size == 0 or np.issubdtype(labels.dtype, np.integer)):
        raise ValueError(f"{out_dir}: labels must be (N,) integers, got {labels.dtype} "
                         f"{labels.shape}")
    if not len(features) == len(labels) == len(meta):
        raise ValueError(f"{out_dir}: lengths disagree: {len(features)} features, "
                         f"{len(labels)} labels, {len(meta)} meta rows")
    return features, labels.astype(np.int64)


def write_features(
    out_dir: Path | str,
    features: np.ndarray,
    labels: np.ndarray,
    meta: Sequence[dict[str, Any]],
    info: dict[str, Any],
) -> None:
    """Write a feature directory (created if absent; existing files are replaced).

    features: (N, D) float32 or float16 (other float dtypes are stored as float32).
    labels: (N,) integer category ids, -1 where unknown.
    meta: N JSON-serialisable dicts, one per row.
    info: provenance; "dim" and "n" are set from the arrays.
    Raises ValueError when shapes or lengths disagree.
    """
    out_dir = Path(out_dir)
    features, labels = _checked_arrays(out_dir, features, labels, meta)
    info = {**info, "dim": int(features.shape[1]), "n": int(features.shape[0])}
    info_text = json.dumps(info, indent=2, default=_json_default) + "\n"
    meta_lines = [json.dumps(row, default=_json_default) + "\n" for row in meta]
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_write(out_dir / FEATURES_FILE) as handle:
        np.save(handle, features, allow_pickle=False)
    with atomic_write(out_dir / LABELS_FILE) as handle:
        np.save(handle, labels, allow_pickle=False)
    with atomic_write(out_dir / META_FILE, "w", encoding="utf-8") as handle:
        handle.writelines(meta_lines)
    with atomic_write(out_dir / INFO_FILE, "w", encoding="utf-8") as handle:
        handle.write(info_text)


def _load_array(path: Path, mmap: bool = False) -> np.ndarray:
    if not path.is_file():
        raise FeatureDirError(f"{path}: missing (not a feature directory written by odis embed?)")
    try:
        return np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except (OSError, ValueError) as error:
        raise FeatureDirError(f"{path}: not a readable .npy array ({error})") from None


def _load_meta(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise FeatureDirError(f"{path}: missing (not a feature directory written by odis embed?)")
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise FeatureDirError(f"{path}: line {line_number} is not JSON ({error})") from None
            if not isinstance(row, dict):
                raise FeatureDirError(f"{path}: line {line_number} is not a JSON object")
            rows.append(row)
    return rows


def _load_info(path: Path) -> dict[str, Any]:
    # Optional: users may bring features from another model with just the three data files.
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise FeatureDirError(f"{path}: not readable JSON ({error})") from None
    if not isinstance(info, dict):
        raise FeatureDirError(f"{path}: expected a JSON object")
    return info


def read_features(path: Path | str) -> FeatureSet:
    """Read a feature directory; raises FeatureDirError naming the file at fault.

    features.npy, labels.npy and meta.jsonl are required and must have one row each per
    item; info.json is optional (empty dict when absent). `features` is a read-only
    memory map of features.npy.
    """
    path = Path(path)
    if not path.is_dir():
        raise FeatureDirError(f"{path}: not a feature directory (no such directory)")
    # Memory-mapped: k-NN normalises the bank into its own float32 copy, so reading the
    # file into memory first would hold an ImageNet bank twice.
    features = _load_array(path / FEATURES_FILE, mmap=True)
    labels = _load_array(path / LABELS_FILE)
    if features.ndim != 2 or features.dtype not in FEATURE_DTYPES:
        raise FeatureDirError(f"{path / FEATURES_FILE}: expected (N, D) float32 or float16, "
                              f"got {features.dtype} {features.shape}")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise FeatureDirError(f"{path / LABELS_FILE}: expected (N,) integers, "
                              f"got {labels.dtype} {labels.shape}")
    meta = _load_meta(path / META_FILE)
    if not len(features) == len(labels) == len(meta):
        raise FeatureDirError(f"{path}: lengths disagree: {len(features)} rows in "
                              f"{FEATURES_FILE}, {len(labels)} in {LABELS_FILE}, "
                              f"{len(meta)} in {META_FILE}")
    return FeatureSet(features, labels.astype(np.int64), meta, _load_info(path / INFO_FILE))


# What must agree between a k-NN bank and its queries: features of two backbones (or of
# objects vs whole images) share a dimension but not a space, and k-NN between them
# returns numbers that look plausible and mean nothing.
MATCHING_INFO_KEYS = ("backbone", "weights", "level")


def check_same_embedding(train: FeatureSet, test: FeatureSet, train_path: Path | str,
                         test_path: Path | str) -> None:
    """Raise FeatureDirError when the two directories' info.json name a different backbone,
    weights fingerprint or level (other keys absent on either side are not compared; a
    missing weights fingerprint is refused: without it two networks cannot be told apart)."""
    for info, path, other in ((train.info, train_path, test_path), (test.info, test_path,
                                                                     train_path)):
        if not info.get("weights"):
            raise FeatureDirError(
                f"{path}: info.json records no weights fingerprint, so its features cannot be "
                f"checked against {other}'s (--allow-mismatch to compare anyway)")
    for key in MATCHING_INFO_KEYS:
        ours, theirs = train.info.get(key), test.info.get(key)
        if ours is not None and theirs is not None and ours != theirs:
            raise FeatureDirError(
                f"{test_path}: {key} {theirs!r} differs from {train_path}'s {ours!r} "
                "(features from different embeddings; --allow-mismatch to compare anyway)")
