"""Features from a pretrained teacher backbone (spec §6).

Object level, one feature per object of the mask store:
- "masked" (default, the paper's masked inference): the whole image goes in, the [OBJ] row
  attends only to the object's patches; its output after the final norm is the feature.
- "crop": the image cropped to the object's box, unmasked [OBJ].
- "blackout": background pixels set to black, unmasked [OBJ] (the paper reports it hurts).
- "meanpool": mean of the final in-object patch tokens of an unmasked pass.
Image level: one feature per image, the unmasked [OBJ] token (= plain [CLS] inference).

One pass per image (`one_pass`, read-out models only, issue 19): the masked features of all
objects of an image come from one forward with one read-out [OBJ] token per object (at most
`max_objects_per_pass`; more objects take several passes). The patch stream of a read-out
model never reads an [OBJ] key, so each feature equals that object's own pass (tested to
fp32 tolerance); the paper's model gives no such guarantee, and one pass is refused there.

The whole image is resized to a square `image_size` (no centre crop, which would cut
objects at the border away); the object mask is patchified with the same rule as in
training (a patch is in when the object covers at least half of it, always at least one).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from odis_core.crops.object_aware import CropBox, patch_coverage, patchify
from odis_core.crops.photometric import normalize_only
from odis_core.embed.device_decode import encoded_jpeg, model_inputs
from odis_core.images import UnreadableImageError, list_images, load_rgb
from odis_core.masks.store import UNKNOWN_CATEGORY, ImageRecord, MaskStore
from odis_core.model.network import meanpool_object
from odis_core.model.obj_vit import ObjViT
from odis_core.precision import autocast, resolve_precision
from odis_core.train.checkpoint import load_checkpoint, load_strict, strip_prefixes
from odis_core.train.config import PretrainConfig
from odis_core.train.loop import build_backbone_for, build_network

LEVELS = ("object", "image")
DECODE_ON = ("auto", "loader", "device")
OBJECT_MODES = ("masked", "crop", "blackout", "meanpool")
# Read-out [OBJ] tokens per forward row: a 224 px ViT/16 with 64 of them runs 260 tokens
# instead of 197; images with more objects take several rows.
MAX_OBJECTS_PER_PASS = 64


@dataclass
class EmbedResult:
    features: np.ndarray  # (N, D) float32
    labels: np.ndarray  # (N,) int64, -1 where unknown
    meta: list[dict[str, Any]]
    skipped: list[str] = field(default_factory=list)  # "file: reason"


def build_backbone(config: PretrainConfig) -> ObjViT:
    """The run's backbone architecture at its initial weights (the untrained baseline:
    the same seed gives the same weights the run started from)."""
    torch.manual_seed(config.seed)
    return build_network(config, student=True).backbone


def load_teacher_backbone(checkpoint: Path | str) -> tuple[ObjViT, PretrainConfig]:
    """The teacher backbone of an odis checkpoint (a run directory or a checkpoint file).
    Keys must match exactly: a partial load would silently evaluate random weights."""
    state = load_checkpoint(checkpoint)
    config = PretrainConfig.from_dict(state["config"], source=state["path"]).resolved()
    backbone = build_backbone_for(config, drop_path_rate=0.0)
    load_strict(backbone, strip_prefixes(state["teacher"], "backbone."), state["path"])
    return backbone, config


class _ObjectInputs(Dataset):
    """Per image: its distinct model inputs ("images") and, per object (or for the image
    itself), which of them it uses ("owner"), its patch mask and its meta row. Masked and
    meanpool objects share their image's one tensor: it is decoded, resized, collated and
    copied to the device once, and expanded per object on the device."""

    def __init__(
        self,
        images_root: Path,
        records: list[ImageRecord],
        store: MaskStore | None,
        level: str,
        mode: str,
        image_size: int,
        patch_size: int,
        decode_on_device: bool = False,
    ) -> None:
        self.images_root, self.records, self.store = images_root, records, store
        self.level, self.mode = level, mode
        self.image_size, self.grid = image_size, (image_size // patch_size,) * 2
        # Whole-image inputs of plain JPEGs travel encoded; the device decodes and resizes.
        whole_image_input = level == "image" or mode in ("masked", "meanpool")
        self.decode_on_device = decode_on_device and whole_image_input

    def __len__(self) -> int:
        return len(self.records)

    def _resize(self, image: Image.Image) -> torch.Tensor:
        size = (self.image_size, self.image_size)
        return normalize_only(image.resize(size, Image.Resampling.BICUBIC))

    def _patch_mask(self, mask: np.ndarray) -> torch.Tensor:
        full = CropBox(0, 0, mask.shape[0], mask.shape[1])
        return patchify(patch_coverage(torch.from_numpy(mask).float(), full, self.grid))

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        path = self.images_root / record.file_name
        encoded = encoded_jpeg(path) if self.decode_on_device else None
        try:
            image = load_rgb(path) if encoded is None else None
        except UnreadableImageError as error:
            return {"skipped": str(error)}
        if encoded is not None:
            whole_input, width, height = encoded
        else:
            assert image is not None
            whole_input, (width, height) = None, image.size
        n_patches = self.grid[0] * self.grid[1]
        all_patches = torch.ones(n_patches, dtype=torch.bool)
        objects = self.store.objects_of(record.image_id) if self.store is not None else []
        if self.level == "image":
            largest = max(objects, key=lambda o: o.area, default=None)
            label = largest.category_id if largest is not None else UNKNOWN_CATEGORY
            row = {"image": record.file_name, "image_id": record.image_id, "object_id": None,
                   "category_id": label, "box": [0, 0, width, height]}
            inputs = [whole_input if whole_input is not None else self._resize(image)]
            return {"images": inputs, "owner": [0], "masks": [all_patches], "rows": [row]}
        shared = self.mode in ("masked", "meanpool")
        inputs = []
        if shared and objects:
            inputs = [whole_input if whole_input is not None else self._resize(image)]
        owner, masks, rows = [], [], []
        for obj in objects:
            owner.append(0 if shared else len(inputs))
            if shared:
                mask = MaskStore.decode(obj, height, width)
                masks.append(self._patch_mask(mask))
            elif self.mode == "crop":
                x, y, w, h = obj.bbox_xywh
                box = (int(x), int(y), max(int(x) + 1, round(x + w)), max(int(y) + 1, round(y + h)))
                inputs.append(self._resize(image.crop(box)))
                masks.append(all_patches)
            else:  # blackout
                pixels = np.asarray(image).copy()
                pixels[~MaskStore.decode(obj, image.height, image.width)] = 0
                inputs.append(self._resize(Image.fromarray(pixels)))
                masks.append(all_patches)
            rows.append({"image": record.file_name, "image_id": record.image_id,
                         "object_id": obj.object_id, "category_id": obj.category_id,
                         "box": [round(v, 2) for v in obj.bbox_xywh]})
        return {"images": inputs, "owner": owner, "masks": masks, "rows": rows}


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Distinct images (M, 3, H, W), per object the row of its image "owner" (K,) int64,
    patch masks (K, N) bool, K meta rows and the skipped images' reasons."""
    images, owner, masks, rows, skipped = [], [], [], [], []
    for item in items:
        if "skipped" in item:
            skipped.append(item["skipped"])
            continue
        owner += [len(images) + index for index in item["owner"]]
        images += item["images"]
        masks += item["masks"]
        rows += item["rows"]
    return {
        # A list when some images travel encoded (`model_inputs` decodes them on the device).
        "images": (torch.stack(images) if all(i.ndim == 3 for i in images) else images)
        if images
        else None,
        "owner": torch.tensor(owner, dtype=torch.int64),
        "masks": torch.stack(masks) if masks else None,
        "rows": rows,
        "skipped": skipped,
    }


def resolve_decode_on(decode_on: str, device: str) -> str:
    """"loader" or "device": where whole-image inputs are decoded ("auto": device on CUDA)."""
    if decode_on not in DECODE_ON:
        raise ValueError(f"decode_on must be one of {DECODE_ON}, got {decode_on!r}")
    if decode_on == "auto":
        return "device" if device.startswith("cuda") else "loader"
    return decode_on


def resolve_one_pass(one_pass: bool | None, backbone: ObjViT) -> bool:
    """One pass per image: the default for read-out models, refused for the others (their
    patch tokens attend to the [OBJ] key, so several objects in one pass would not be exact)."""
    if one_pass is None:
        return backbone.obj_readout
    if one_pass and not backbone.obj_readout:
        raise ValueError(
            "--one-pass needs a read-out model (odis pretrain --obj-readout): in this one "
            "the patches attend to the [OBJ] token, so objects cannot share a pass"
        )
    return one_pass


def one_pass_slots(owner: list[int], cap: int) -> tuple[list[int], list[int], list[int]]:
    """Forward rows for objects grouped by image: each row holds up to `cap` objects of one
    image. owner: the image index of each object. Returns the image of each row, and the
    row and slot (its [OBJ] token) of each object."""
    row_images: list[int] = []
    filled: list[int] = []
    open_row: dict[int, int] = {}  # image -> its row still taking objects
    rows, slots = [], []
    for image in owner:
        row = open_row.get(image)
        if row is None or filled[row] == cap:
            row = open_row[image] = len(row_images)
            row_images.append(image)
            filled.append(0)
        rows.append(row)
        slots.append(filled[row])
        filled[row] += 1
    return row_images, rows, slots


def one_pass_features(
    backbone: ObjViT,
    images: torch.Tensor,
    owner: torch.Tensor,
    masks: torch.Tensor,
    cap: int = MAX_OBJECTS_PER_PASS,
) -> torch.Tensor:
    """[OBJ] features (T, D) of T objects, all objects of an image in one forward row.

    images (M, 3, H, W); owner (T,) int64, the image of each object; masks (T, N) bool.
    Rows with fewer objects than the batch's widest row are padded with all-false masks
    (a padding token sees only its own key, and no token sees it)."""
    row_images, rows, slots = one_pass_slots(owner.tolist(), cap)
    width = max(slots) + 1
    rows_t = torch.tensor(rows, device=masks.device)
    slots_t = torch.tensor(slots, device=masks.device)
    row_masks = masks.new_zeros(len(row_images), width, masks.shape[1])
    row_masks[rows_t, slots_t] = masks
    inputs = images[torch.tensor(row_images, device=images.device)]
    tokens = backbone(inputs, obj_patch_mask=row_masks)
    return tokens[rows_t, slots_t]


def _without_images(batch: dict[str, Any], failed: list[int]) -> dict[str, Any]:
    """`batch` without the objects of its `failed` inputs, each named in "skipped"."""
    keep = [k for k, owner in enumerate(batch["owner"].tolist()) if owner not in failed]
    names = {batch["rows"][k]["image"] for k, o in enumerate(batch["owner"].tolist())
             if o in failed}
    return {
        "images": batch["images"],
        "owner": batch["owner"][keep],
        "masks": batch["masks"][keep] if keep else None,
        "rows": [batch["rows"][k] for k in keep],
        "skipped": batch["skipped"] + [f"{name}: cannot decode (device JPEG decoder)"
                                       for name in sorted(names)],
    }


@torch.no_grad()
def batch_features(
    backbone: ObjViT,
    images: torch.Tensor,
    owner: torch.Tensor,
    masks: torch.Tensor,
    level: str,
    mode: str,
    device: str,
    precision: str = "fp32",
    max_objects_per_pass: int | None = None,
) -> torch.Tensor:
    """(K, D) float32 features of one collated batch: `images` (M, 3, H, W) on `device`, per
    object the row of its image `owner` (K,) and its patch mask `masks` (K, N); `precision`
    a resolved "bf16" or "fp32" (`odis_core.precision.resolve_precision`).
    `max_objects_per_pass` set: the objects of an image share one forward of a read-out
    model (at most that many [OBJ] tokens per pass; `one_pass_features`)."""
    masks = masks.to(device, non_blocking=True)
    with autocast(device, precision):
        if max_objects_per_pass:
            # One-pass rows index their own images: no per-object image copy is built.
            feature = one_pass_features(backbone, images, owner, masks, max_objects_per_pass)
        elif mode == "meanpool" and level == "object":
            inputs = images[owner.to(device, non_blocking=True)]
            feature = meanpool_object(backbone(inputs)[:, 1:], masks)
        else:
            inputs = images[owner.to(device, non_blocking=True)]
            feature = backbone(inputs, obj_patch_mask=masks)[:, 0]
    return feature.float()


def object_batches(
    images_root: Path | str,
    records: list[ImageRecord],
    store: MaskStore,
    image_size: int,
    patch_size: int,
    batch_size: int = 64,
) -> Iterator[dict[str, Any]]:
    """The collated masked-mode inputs of `records`' objects (decoded and resized on the
    host, as `embed` does), `batch_size` images at a time, in order. No DataLoader: it would
    draw a seed from the global RNG (a training run's exact resume depends on that stream)."""
    dataset = _ObjectInputs(Path(images_root), records, store, "object", "masked", image_size,
                            patch_size)
    for start in range(0, len(records), batch_size):
        yield _collate([dataset[i] for i in range(start, min(len(records), start + batch_size))])


@torch.no_grad()
def embed(
    backbone: ObjViT,
    images_root: Path | str,
    store: MaskStore | None,
    level: str = "object",
    mode: str = "masked",
    image_size: int = 224,
    batch_size: int = 64,
    device: str = "cpu",
    workers: int = 0,
    progress: Callable[[int, int], None] | None = None,
    decode_on: str = "auto",
    precision: str | None = None,
    one_pass: bool | None = None,
) -> EmbedResult:
    """Features for every object (level "object") or image (level "image").

    `batch_size` counts images; all objects of a batch's images go through one forward.
    Without a store (image level only), every image under `images_root` is embedded with
    label -1; with one, the image's label is the category of its largest object.
    """
    records = list_records(images_root, store, level, mode)
    return embed_records(backbone, images_root, records, store, level, mode, image_size,
                         batch_size, device, workers, progress, decode_on, precision, one_pass)


def list_records(
    images_root: Path | str, store: MaskStore | None, level: str, mode: str
) -> list[ImageRecord]:
    """The images to embed, in a fixed order: the store's, or the folder's sorted listing.
    Checks the level/mode/store combination first."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    if level == "object" and mode not in OBJECT_MODES:
        raise ValueError(f"mode must be one of {OBJECT_MODES}, got {mode!r}")
    if level == "object" and store is None:
        raise ValueError("object-level features need a mask store (--masks)")
    if store is not None:
        return list(store.images)
    return [ImageRecord(i, name, 0, 0) for i, name in enumerate(list_images(images_root))]


@torch.no_grad()
def embed_records(
    backbone: ObjViT,
    images_root: Path | str,
    records: list[ImageRecord],
    store: MaskStore | None,
    level: str = "object",
    mode: str = "masked",
    image_size: int = 224,
    batch_size: int = 64,
    device: str = "cpu",
    workers: int = 0,
    progress: Callable[[int, int], None] | None = None,
    decode_on: str = "auto",
    precision: str | None = None,
    one_pass: bool | None = None,
    max_objects_per_pass: int = MAX_OBJECTS_PER_PASS,
) -> EmbedResult:
    """Features of the objects (or images) of `records`, in their order (see `embed`).

    precision: autocast "bf16", "fp32" or "auto" (bf16 on CUDA and on CPUs with bf16
    matrix units, see `odis_core.precision`); None (the library default, unchanged from
    before `--precision`): bf16 on CUDA, fp32 on the CPU. Features are returned in float32.

    decode_on: "loader" (PIL in the loader), "device" (whole-image inputs of plain JPEGs
    decoded and resized on `device`, see `device_decode.py`), "auto" (device on CUDA).
    one_pass: masked objects of an image share one forward (see the module docstring);
    None = on for read-out models. Other modes and the image level are unaffected.
    """
    shared_pass = resolve_one_pass(one_pass, backbone) and level == "object" and mode == "masked"
    on_device = resolve_decode_on(decode_on, device) == "device"
    dataset = _ObjectInputs(
        Path(images_root), records, store, level, mode, image_size, backbone.patch_size,
        decode_on_device=on_device,
    )
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=_collate)
    backbone = backbone.to(device).eval()
    if precision is None:
        precision = "bf16" if device.startswith("cuda") else "fp32"
    precision = resolve_precision(precision, device)
    features, labels, meta, skipped = [], [], [], []
    done = 0
    for batch in loader:
        skipped += batch["skipped"]
        if batch["masks"] is not None:
            images, failed = model_inputs(batch["images"], image_size, device)
            if failed:  # bytes that passed the header checks but did not decode
                reported = len(batch["skipped"])
                batch = _without_images(batch, failed)
                skipped += batch["skipped"][reported:]
        if batch["masks"] is not None:
            feature = batch_features(
                backbone, images, batch["owner"], batch["masks"], level, mode, device,
                precision, max_objects_per_pass if shared_pass else None,
            )
            features.append(feature.cpu())
            for row in batch["rows"]:
                category = row.pop("category_id")
                labels.append(category)
                row["category_id"] = category
                row["category"] = (store.category_name(category) if store is not None
                                   else None)
                meta.append(row)
        done = min(len(records), done + batch_size)
        if progress is not None:
            progress(done, len(records))
    dim = backbone.embed_dim
    stacked = torch.cat(features).numpy() if features else np.zeros((0, dim), np.float32)
    return EmbedResult(stacked, np.asarray(labels, dtype=np.int64), meta, skipped)
