"""Class-agnostic objects from segment-anything's automatic mask generator into a mask store.

SAM over a large image folder takes GPU-days, so a run can be interrupted, re-run and split
(spec §11: re-running a mask job over an existing output resumes; §12: `--shard I/N`).
Each image's result is appended to a journal, `OUT/sam_journal/shard-I-of-N.jsonl`, as
soon as it is computed. A re-run with the same settings segments only the images no
journal holds yet; a run with other settings refuses to touch OUT. With `shard=(i, n)` a
process segments every n-th image from the i-th, so n processes (or machines sharing OUT)
split one folder. Whichever call finds every image journaled writes the store; until
then OUT has no manifest, so nobody reads a partial store. The journal can be deleted once
the store is complete. Journals are indexed line by line (file, offset, mask count) and the
final merge reads one image's line at a time into a sharded store, so neither a resume nor
the merge holds a million images' masks in memory.
"""

from __future__ import annotations

import json
import math
import pickle
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import segment_anything
import torch
from pycocotools import mask as mask_utils
from segment_anything.modeling import Sam

from odis_core.images import UnreadableImageError, list_images, load_rgb
from odis_core.masks.sam_batch import BatchedMaskGenerator, batched_generator
from odis_core.masks.store import (
    UNKNOWN_CATEGORY,
    ImageRecord,
    MaskStore,
    ObjectRecord,
    StoreWriter,
)

SAM_MODEL_TYPES = ("vit_b", "vit_l", "vit_h")
JOURNAL_DIR = "sam_journal"
JOURNAL_FORMAT = "odis-sam-journal"

# What `load_sam` built each model from, for the store's settings, without adding
# attributes to the module itself.
_ORIGIN: weakref.WeakKeyDictionary[torch.nn.Module, dict[str, str]] = (
    weakref.WeakKeyDictionary()
)


class SamError(Exception):
    """A SAM model, checkpoint or output that cannot be used; one line naming the file."""


@dataclass
class SamReport:
    """Counts over the images of this call's shard (the whole folder without sharding)."""

    n_images: int  # readable images segmented (including those taken from the journal)
    n_objects: int  # masks kept on those images
    n_skipped: int  # unreadable images
    skipped: list[str] = field(default_factory=list)  # "file: reason"
    n_resumed: int = 0  # images whose result an earlier run had journaled
    complete: bool = True  # False: other shards still miss images; no store written yet


def load_sam(model_type: str, checkpoint: Path, device: str = "cpu") -> Sam:
    """Build SAM `model_type` with the weights of `checkpoint`, in eval mode on `device`."""
    if model_type not in SAM_MODEL_TYPES:
        raise SamError(
            f"{checkpoint}: unknown SAM model type {model_type!r} "
            f"(choose one of {', '.join(SAM_MODEL_TYPES)})"
        )
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise SamError(f"{checkpoint}: SAM checkpoint not found")
    if _is_safetensors(checkpoint):
        raise SamError(
            f"{checkpoint}: a safetensors file; SAM loads the official .pth checkpoints "
            "(sam_vit_b_01ec64.pth, sam_vit_l_0b3195.pth, sam_vit_h_4b8939.pth)"
        )
    try:
        sam = segment_anything.sam_model_registry[model_type](checkpoint=str(checkpoint))
    except RuntimeError as error:
        # load_state_dict lists every mismatching key over many lines; the first says enough.
        details = [line.strip() for line in str(error).splitlines() if line.strip()]
        detail = details[1] if len(details) > 1 else (details[0] if details else "")
        if "state_dict" in str(error):
            raise SamError(
                f"{checkpoint}: weights do not fit SAM {model_type} (is it a {model_type} "
                f"checkpoint?): {detail[:300]}"
            ) from None
        raise SamError(f"{checkpoint}: cannot load ({detail[:300]})") from None
    except pickle.UnpicklingError:
        # torch's weights_only refusal is a paragraph of advice; one line says what matters.
        raise SamError(
            f"{checkpoint}: not a SAM .pth checkpoint (torch cannot load it as plain weights)"
        ) from None
    except (EOFError, ValueError, OSError) as error:
        first_line = str(error).strip().split("\n")[0][:300]
        raise SamError(f"{checkpoint}: not a readable checkpoint ({first_line})") from None
    sam = sam.to(device).eval()
    _ORIGIN[sam] = {"model_type": model_type, "checkpoint": checkpoint.name}
    return sam


def _is_safetensors(path: Path) -> bool:
    """A safetensors file starts with an 8-byte header length and a JSON object."""
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as handle:
        head = handle.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 1 << 30


def _quality(record: dict[str, Any]) -> float:
    """SAM's own ranking signal, predicted IoU x stability; NaN (0/0 stability of an empty
    mask) ranks last."""
    value = float(record["predicted_iou"]) * float(record["stability_score"])
    return value if math.isfinite(value) else -math.inf


def select_masks(
    records: list[dict[str, Any]], max_masks: int | None = None, min_area: float = 0.0
) -> list[dict[str, Any]]:
    """The generator's records with area >= `min_area` (empty masks never), best
    predicted_iou x stability_score first, at most `max_masks` of them."""
    kept = [r for r in records if r["area"] > 0 and r["area"] >= min_area]
    kept.sort(key=_quality, reverse=True)  # stable: ties keep SAM's order
    return kept if max_masks is None else kept[:max_masks]


def _plain(value: Any) -> Any:
    """JSON-ready copy (point_grids arrive as numpy arrays), so settings compare after a
    round trip through the journal."""
    return json.loads(json.dumps(value, default=lambda v: np.asarray(v).tolist()))


def _differing(found: Any, wanted: dict[str, Any]) -> list[str]:
    """Names of the settings that differ between a recorded run and this one."""
    found = found if isinstance(found, dict) else {}
    return sorted(key for key in set(found) | set(wanted) if found.get(key) != wanted.get(key))


@dataclass(frozen=True)
class _JournalRef:
    """Where one image's journal line is, and what the report needs from it: a million
    images' masks are never held in memory at once, only these (about 100 bytes each)."""

    path: Path
    offset: int
    length: int
    n_masks: int
    skipped: str | None  # the reason, for an unreadable image

    def read(self) -> dict[str, Any]:
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            return json.loads(handle.read(self.length))


def _ref(path: Path, offset: int, line: bytes, entry: dict[str, Any]) -> _JournalRef:
    skipped = entry.get("skipped")
    n_masks = 0 if skipped is not None else len(entry["masks"])
    return _JournalRef(path, offset, len(line), n_masks, skipped)


def _read_journal(path: Path, header: dict[str, Any]) -> dict[str, _JournalRef]:
    """Line references by file name of one journal, streamed line by line; refuses a
    journal made with other settings."""
    refs: dict[str, _JournalRef] = {}
    with open(path, "rb") as handle:
        try:
            found = json.loads(handle.readline())
        except (json.JSONDecodeError, UnicodeDecodeError):
            found = None
        if not isinstance(found, dict) or found.get("format") != JOURNAL_FORMAT:
            raise SamError(f"{path}: not an odis SAM journal; delete it or write elsewhere")
        if found != header:
            differing = _differing(found.get("settings"), header["settings"])
            if found.get("images_root") != header["images_root"]:
                differing.append("images_root")
            raise SamError(
                f"{path}: an earlier run with other settings ({', '.join(differing)}); "
                "write to another directory or delete this journal"
            )
        offset = handle.tell()
        for line in handle:
            try:
                entry = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                entry = None  # a line cut short by a killed run: that image is segmented again
            if isinstance(entry, dict) and "file_name" in entry:
                refs[entry["file_name"]] = _ref(path, offset, line, entry)
            offset += len(line)
    return refs


def _journaled(out: Path, header: dict[str, Any]) -> dict[str, _JournalRef]:
    """Entries of every shard's journal; a segmented result beats a skip of the same file."""
    merged: dict[str, _JournalRef] = {}
    for path in sorted((out / JOURNAL_DIR).glob("shard-*.jsonl")):
        for name, ref in _read_journal(path, header).items():
            if name not in merged or merged[name].skipped is not None:
                merged[name] = ref
    return merged


@contextmanager
def _journal_writer(path: Path, header: dict[str, Any]) -> Iterator[IO[bytes]]:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        # Drop a last line cut short by a killed run, so the next entry starts on its own line.
        text = path.read_bytes()
        cut = text.rfind(b"\n") + 1
        if cut < len(text):
            with open(path, "r+b") as handle:
                handle.truncate(cut)
    else:
        path.write_text(json.dumps(header) + "\n", encoding="utf-8")
    with open(path, "ab") as handle:
        yield handle


def _refuse_other_store(out: Path, settings: dict[str, Any]) -> None:
    """Never overwrite a COCO import, or SAM masks made with other settings, in OUT."""
    manifest_path = out / "manifest.json"
    if not manifest_path.is_file():
        return
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        manifest = {}
    if manifest.get("source") != "sam":
        raise SamError(
            f"{manifest_path}: OUT already holds a {manifest.get('source', 'non-SAM')!r} mask "
            "store; write SAM masks to another directory"
        )
    if manifest.get("settings") != settings:
        differing = ", ".join(_differing(manifest.get("settings"), settings))
        raise SamError(
            f"{manifest_path}: OUT holds SAM masks made with other settings ({differing}); "
            "write to another directory or delete it"
        )


def _load(images_root: Path, name: str) -> np.ndarray | str:
    """HWC uint8 RGB pixels of image `name`, or why it cannot be read."""
    try:
        return np.asarray(load_rgb(images_root / name))
    except UnreadableImageError as error:
        return error.reason


def _loaded_batches(
    images_root: Path, names: list[str], batch_size: int
) -> Iterator[list[tuple[str, np.ndarray | str]]]:
    """Batches of (name, pixels or reason); the next batch is decoded on threads while the
    caller segments this one (decoding must not leave the GPU waiting)."""
    batches = [names[i : i + batch_size] for i in range(0, len(names), batch_size)]
    with ThreadPoolExecutor(max_workers=min(8, max(1, batch_size))) as pool:
        pending = [pool.submit(_load, images_root, n) for n in batches[0]] if batches else []
        for k, batch in enumerate(batches):
            current = pending
            if k + 1 < len(batches):
                pending = [pool.submit(_load, images_root, n) for n in batches[k + 1]]
            yield [(name, future.result()) for name, future in zip(batch, current, strict=True)]


def _segment_batch(
    generator: BatchedMaskGenerator,
    loaded: list[tuple[str, np.ndarray | str]],
    max_masks: int | None,
    min_area: float,
) -> list[dict[str, Any]]:
    """Journal entries for one batch: each image's kept masks, or why it was skipped."""
    readable = [pixels for _, pixels in loaded if not isinstance(pixels, str)]
    with torch.inference_mode():
        records = iter(generator.generate_batch(readable))
    entries = []
    for name, pixels in loaded:
        if isinstance(pixels, str):
            entries.append({"file_name": name, "skipped": pixels})
            continue
        masks = [
            {"rle": record["segmentation"], "score": float(record["predicted_iou"])}
            for record in select_masks(next(records), max_masks, min_area)
        ]
        height, width = pixels.shape[:2]
        entries.append({"file_name": name, "width": width, "height": height, "masks": masks})
    return entries


def _write_store(
    out: Path, names: list[str], entries: dict[str, _JournalRef], images_root: Path,
    settings: dict[str, Any],
) -> MaskStore:
    """The merge/index step: images in sorted file order (id = position + 1), objects best
    first within each, shard by shard; skipped images go to the store's report file."""
    writer = StoreWriter(out, {}, source="sam", images_root=images_root, settings=settings)
    skipped: list[str] = []
    next_object_id = 1
    for position, name in enumerate(names):
        if entries[name].skipped is not None:
            skipped.append(f"{name}: {entries[name].skipped}")
            continue
        entry = entries[name].read()  # one image's masks in memory at a time
        image_id = position + 1
        objects = []
        for mask in entry["masks"]:
            rle = mask["rle"]
            objects.append(
                ObjectRecord(
                    object_id=next_object_id,
                    image_id=image_id,
                    category_id=UNKNOWN_CATEGORY,
                    bbox_xywh=tuple(float(v) for v in mask_utils.toBbox(rle)),  # type: ignore[arg-type]
                    area=float(mask_utils.area(rle)),
                    rle=rle,
                    score=mask["score"],
                )
            )
            next_object_id += 1
        writer.add(ImageRecord(image_id, name, int(entry["width"]), int(entry["height"])), objects)
    return writer.close(skipped)


def generate_sam_masks(
    images_root: Path,
    out: Path,
    sam: Sam,
    generator_kwargs: dict[str, Any] | None = None,
    max_masks: int | None = None,
    min_area: float = 0.0,
    progress: Callable[[int, int], None] | None = None,
    shard: tuple[int, int] | None = None,
    batch_size: int = 1,
    bf16: bool = True,
) -> tuple[MaskStore | None, SamReport]:
    """Segment every image under `images_root` (sorted order) with SAM's automatic mask
    generator and write the masks as a class-agnostic store at `out`.

    `generator_kwargs` holds only the generator settings the user set (SAM's defaults
    otherwise). Masks with area >= `min_area` are kept, at most `max_masks` per image (best
    predicted_iou x stability_score); each object's score is SAM's predicted IoU.
    Unreadable images are skipped and reported, never fatal. `progress(done, total)` counts
    this call's images. `shard=(i, n)` segments images i, i+n, i+2n, ... only; the store is
    returned once every image is done (by any shard), else None with `report.complete`
    False. Resumes from `out`'s journal when one exists (see the module docstring).
    `batch_size` images go through SAM's image encoder together (`sam_batch`); `bf16` runs
    that encoder under bf16 autocast on CUDA (ignored on CPU). Neither changes which
    images a resumed run skips; bf16 is part of the settings a resume must match.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_masks is not None and max_masks < 1:
        raise ValueError(f"max_masks must be >= 1, got {max_masks}")
    if min_area < 0:
        raise ValueError(f"min_area must be >= 0, got {min_area}")
    shard_index, shard_count = shard if shard is not None else (0, 1)
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard must be (i, n) with 0 <= i < n, got {shard}")
    images_root, out = Path(images_root), Path(out)
    names = list_images(images_root)
    generator_kwargs = dict(generator_kwargs or {})
    try:
        generator = batched_generator(sam, generator_kwargs, bf16=bf16)
    except (TypeError, ValueError, AssertionError, ImportError) as error:
        raise SamError(f"invalid SAM generator settings {generator_kwargs} ({error})") from None
    origin = _ORIGIN.get(sam, {})
    settings = _plain(
        {
            "model_type": origin.get("model_type"),
            "checkpoint": origin.get("checkpoint"),
            "generator_kwargs": generator_kwargs,
            "max_masks": max_masks,
            "min_area": min_area,
            # Only when it differs from the fp32 of runs made before bf16 existed, so their
            # journals and stores still resume.
            **({"encoder_dtype": "bfloat16"} if generator.bf16 else {}),
        }
    )
    header = {
        "format": JOURNAL_FORMAT,
        "images_root": str(images_root.resolve()),
        "settings": settings,
    }
    journaled = _journaled(out, header)
    _refuse_other_store(out, settings)
    mine = names[shard_index::shard_count]
    # Unreadable images are tried again: the user may have replaced them since.
    todo = [name for name in mine if name not in journaled or journaled[name].skipped is not None]
    n_resumed = len(mine) - len(todo)

    journal_path = out / JOURNAL_DIR / f"shard-{shard_index}-of-{shard_count}.jsonl"
    if progress is not None:
        progress(n_resumed, len(mine))
    done = n_resumed
    with _journal_writer(journal_path, header) as journal:
        for loaded in _loaded_batches(images_root, todo, batch_size):
            for entry in _segment_batch(generator, loaded, max_masks, min_area):
                line = (json.dumps(entry) + "\n").encode("utf-8")
                journaled[entry["file_name"]] = _ref(journal_path, journal.tell(), line, entry)
                journal.write(line)
                done += 1
            journal.flush()  # a killed run loses at most the batch in flight
            if progress is not None:
                progress(done, len(mine))

    report = _report([(name, journaled[name]) for name in mine], n_resumed)
    entries = _journaled(out, header)  # other shards may have finished meanwhile
    entries.update({name: journaled[name] for name in mine})
    if any(name not in entries for name in names):
        report.complete = False
        return None, report
    return _write_store(out, names, entries, images_root, settings), report


def _report(refs: list[tuple[str, _JournalRef]], n_resumed: int) -> SamReport:
    skipped = [f"{name}: {ref.skipped}" for name, ref in refs if ref.skipped is not None]
    return SamReport(
        n_images=len(refs) - len(skipped),
        n_objects=sum(ref.n_masks for _, ref in refs),
        n_skipped=len(skipped),
        skipped=skipped,
        n_resumed=n_resumed,
    )
