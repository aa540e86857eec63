"""A resumable, crash-safe `odis embed`: the images are cut into fixed shards, each shard
is embedded and written as its own small feature directory under FEAT_DIR/shards/, and
when every shard is there they are concatenated into FEAT_DIR (spec §12 format).

Why shards: an ImageNet-size embed runs for a long time on several GPUs. A shard is
written atomically (its info.json last), so a killed run leaves complete shards and
nothing half-written; a re-run skips the complete ones and redoes the rest. With several
ranks (torchrun), rank r embeds shards r, r + world, ... and rank 0 merges after a barrier.
The shard boundaries depend only on the image list and `shard_size`, and a batch never
crosses one, so a resumed run computes exactly the features an uninterrupted run does.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from odis_core.atomic import atomic_write
from odis_core.embed.features import (
    FEATURES_FILE,
    INFO_FILE,
    LABELS_FILE,
    META_FILE,
    read_features,
    write_features,
)
from odis_core.embed.inference import embed_records
from odis_core.masks.store import ImageRecord, MaskStore
from odis_core.model.obj_vit import ObjViT

SHARDS_DIR = "shards"
SETTINGS_FILE = "settings.json"


@dataclass
class EmbedSettings:
    """Everything that decides the features: a re-run resumes only if these are equal."""

    level: str
    mode: str
    image_size: int
    shard_size: int
    dtype: str  # "float32" | "float16"
    weights: str  # backbone fingerprint
    n_images: int
    images: str = ""  # fingerprint of the image list (records_fingerprint)
    decode: str = "loader"  # "loader" | "device": where whole-image inputs are decoded

    def as_dict(self) -> dict[str, Any]:
        return {
            "level": self.level,
            "mode": self.mode,
            "image_size": self.image_size,
            "shard_size": self.shard_size,
            "dtype": self.dtype,
            "weights": self.weights,
            "n_images": self.n_images,
            "images": self.images,
            "decode": self.decode,
        }


def records_fingerprint(records: list[ImageRecord]) -> str:
    """16 hex digits over the ordered image ids and file names: shards hold slices of this
    list, so a resumed run must see the same one."""
    digest = hashlib.blake2b(digest_size=8)
    for record in records:
        digest.update(f"{record.image_id}\t{record.file_name}\n".encode())
    return digest.hexdigest()


@dataclass
class ShardDone:
    shard: int
    n_shards: int
    n_features: int
    resumed: bool  # True when the shard was already on disk


@dataclass
class EmbedFinished:
    path: Path
    n_features: int
    skipped: list[str]
    already_complete: bool = False


def shard_dir(out_dir: Path, shard: int) -> Path:
    return out_dir / SHARDS_DIR / f"{shard:06d}"


def _is_complete(directory: Path) -> bool:
    # write_features writes info.json last: its presence means the other files are whole.
    return (directory / INFO_FILE).is_file()


def _check_settings(out_dir: Path, settings: dict[str, Any]) -> None:
    """Record the settings on a fresh output; refuse to mix shards of other settings."""
    path = out_dir / SHARDS_DIR / SETTINGS_FILE
    if path.is_file():
        previous = _with_defaults(json.loads(path.read_text(encoding="utf-8")))
        changed = sorted(
            key for key in set(previous) | set(settings) if previous.get(key) != settings.get(key)
        )
        if changed:
            raise ValueError(
                f"{out_dir}: holds shards of an unfinished embed with other "
                f"settings ({', '.join(changed)} differ); use another --out or "
                "delete it"
            )
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(settings, indent=2) + "\n")


def _final_is_current(out_dir: Path, settings: dict[str, Any]) -> bool:
    info_path = out_dir / INFO_FILE
    if not info_path.is_file():
        return False
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    previous = info.get("settings")
    return isinstance(previous, dict) and _with_defaults(previous) == settings


def _with_defaults(settings: dict[str, Any]) -> dict[str, Any]:
    # Directories written before `decode` existed were all decoded by the loader.
    return {"decode": "loader", **settings}


def _merge(out_dir: Path, n_shards: int, info: dict[str, Any]) -> EmbedFinished:
    """Concatenate the shards into out_dir, one shard in memory at a time."""
    directories = [shard_dir(out_dir, shard) for shard in range(n_shards)]
    shard_infos = [json.loads((d / INFO_FILE).read_text(encoding="utf-8")) for d in directories]
    n_rows = sum(int(shard_info["n"]) for shard_info in shard_infos)
    dtype = np.dtype(info["settings"]["dtype"])
    skipped = [line for shard_info in shard_infos for line in shard_info.get("skipped", [])]
    labels = []
    with (
        atomic_write(out_dir / FEATURES_FILE) as features_handle,
        atomic_write(out_dir / META_FILE, "w", encoding="utf-8") as meta_handle,
    ):
        header = {
            "descr": np.lib.format.dtype_to_descr(dtype),
            "fortran_order": False,
            "shape": (n_rows, int(info["dim"])),
        }
        np.lib.format.write_array_header_1_0(features_handle, header)
        for directory in directories:
            part = read_features(directory)
            features_handle.write(np.ascontiguousarray(part.features, dtype=dtype).tobytes())
            meta_handle.writelines(json.dumps(row) + "\n" for row in part.meta)
            labels.append(part.labels)
    with atomic_write(out_dir / LABELS_FILE) as handle:
        np.save(handle, np.concatenate(labels).astype(np.int64), allow_pickle=False)
    with atomic_write(out_dir / INFO_FILE, "w", encoding="utf-8") as handle:
        final = {**info, "n": n_rows, "skipped": skipped}
        handle.write(json.dumps(final, indent=2) + "\n")
    shutil.rmtree(out_dir / SHARDS_DIR, ignore_errors=True)
    return EmbedFinished(out_dir, n_rows, skipped)


def embed_to_directory(
    backbone: ObjViT,
    images_root: Path | str,
    records: list[ImageRecord],
    store: MaskStore | None,
    out_dir: Path | str,
    settings: EmbedSettings,
    info: dict[str, Any],
    batch_size: int = 64,
    device: str = "cpu",
    workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] | None = None,
    precision: str | None = None,
    one_pass: bool | None = None,
    progress: Callable[[int], None] | None = None,
) -> Iterator[ShardDone | EmbedFinished]:
    """Embed `records` into the feature directory `out_dir`, resuming complete shards.

    Yields ShardDone per shard of this rank, then EmbedFinished once the merged directory
    is written: by rank 0 after the barrier; without a barrier (independent processes
    given rank/world_size by hand), by the process that finds every shard complete.
    `info` is provenance stored in info.json (backbone, checkpoint, ...); the settings are
    stored with it and compared on a re-run.
    `barrier` (several ranks) must return once every rank has finished its shards.
    `one_pass` (see `embed_records`) changes the speed, not the features: not a setting.
    `progress(images)`: images of this rank's shards done so far (resumed shards count at
    once), after every batch; `rank_image_count` is its total.
    """
    out_dir = Path(out_dir)
    settings_dict = settings.as_dict()
    if _final_is_current(out_dir, settings_dict):
        if rank == 0:
            final = read_features(out_dir)
            yield EmbedFinished(out_dir, len(final), final.info.get("skipped", []), True)
        return
    if rank == 0:
        _check_settings(out_dir, settings_dict)
    if barrier is not None:
        barrier()  # the settings file exists before any rank writes a shard
        _check_settings(out_dir, settings_dict)
    n_shards = max(1, -(-len(records) // settings.shard_size))
    dtype = np.dtype(settings.dtype)
    images_before = 0  # images of this rank's earlier shards

    def report(done: int, _total: int = 0) -> None:
        if progress is not None:
            progress(images_before + done)

    for shard in range(rank, n_shards, world_size):
        directory = shard_dir(out_dir, shard)
        start = shard * settings.shard_size
        shard_images = len(records[start : start + settings.shard_size])
        if _is_complete(directory):
            images_before += shard_images
            report(0)
            yield ShardDone(shard, n_shards, len(read_features(directory)), True)
            continue
        result = embed_records(
            backbone,
            images_root,
            records[start : start + settings.shard_size],
            store,
            settings.level,
            settings.mode,
            settings.image_size,
            batch_size,
            device,
            workers,
            progress=report,
            decode_on=settings.decode,
            precision=precision,
            one_pass=one_pass,
        )
        images_before += shard_images
        if result.features.shape[0] == 0:
            result.features = np.zeros((0, backbone.embed_dim), np.float32)
        write_features(
            directory,
            result.features.astype(dtype),
            result.labels,
            result.meta,
            {"shard": shard, "skipped": result.skipped, "pid": os.getpid()},
        )
        yield ShardDone(shard, n_shards, len(result.labels), False)
    if barrier is not None:
        barrier()
        if rank != 0:
            return
    missing = [s for s in range(n_shards) if not _is_complete(shard_dir(out_dir, s))]
    if missing and barrier is not None:
        raise RuntimeError(f"{out_dir}: shards {missing[:5]} are missing after all ranks finished")
    if not missing:  # without a process group, whichever process finishes last merges
        yield _merge(
            out_dir, n_shards, {**info, "settings": settings_dict, "dim": backbone.embed_dim}
        )


def rank_image_count(n_records: int, shard_size: int, rank: int, world_size: int) -> int:
    """Images in the shards rank `rank` of `world_size` embeds (its progress total)."""
    n_shards = max(1, -(-n_records // shard_size))
    return sum(min(shard_size, n_records - shard * shard_size)
               for shard in range(rank, n_shards, world_size))


def distributed_rank() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) without it."""
    return (
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
        int(os.environ.get("LOCAL_RANK", 0)),
    )


def init_distributed(device: str) -> Callable[[], None] | None:
    """Join torchrun's process group (NCCL on GPUs, gloo on CPUs) and return a barrier;
    None for a single process."""
    _, world_size, _ = distributed_rank()
    if world_size <= 1:
        return None
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.barrier


def close_distributed() -> None:
    """Leave the process group, if this process joined one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_device(device: str, local_rank: int) -> str:
    """Each rank its own GPU (cuda:LOCAL_RANK) when the device is plain "cuda"."""
    if device == "cuda" and torch.cuda.device_count() > 1:
        return f"cuda:{local_rank}"
    return device
