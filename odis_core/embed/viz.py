"""Pictures of what the backbone sees: the [OBJ] attention of each object and a PCA of the
patch features mapped to RGB — the two pictures users of DINO look at first.

The [OBJ] attention is recomputed from the last block's own weights: a forward hook keeps
the input of that block's attention (its first norm's output) during the ordinary masked
forward, and the [OBJ] query row is formed from the block's qkv projection with the same
object mask. Nothing in the model changes for it, so any faster attention kernel the
model uses stays in place.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from odis_core.atomic import atomic_write
from odis_core.embed.inference import _ObjectInputs
from odis_core.masks.store import ImageRecord, MaskStore
from odis_core.model.obj_vit import ObjViT

# More objects than this per image make the panels too small to read.
MAX_OBJECTS_DRAWN = 6


@torch.no_grad()
def obj_attention(
    backbone: ObjViT, images: torch.Tensor, obj_patch_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Last-block attention of the [OBJ] query, averaged over heads.

    images: (B, 3, H, W) normalised; obj_patch_mask: (B, N) bool, True = in the object.
    Returns ((B, 1 + N) attention row over [OBJ] + patches, summing to 1 and zero outside
    the object, (B, 1 + N, D) the block's attention input, for checks).
    """
    block = backbone.vit.blocks[-1]
    captured: dict[str, torch.Tensor] = {}
    handle = block.norm1.register_forward_hook(
        lambda module, args, output: captured.__setitem__("x", output)
    )
    try:
        backbone(images, obj_patch_mask=obj_patch_mask, force_masked_path=True)
    finally:
        handle.remove()
    x, attn = captured["x"], block.attn
    batch, n_tokens, dim = x.shape
    qkv = attn.qkv(x).reshape(batch, n_tokens, 3, attn.num_heads, dim // attn.num_heads)
    q, k = qkv.permute(2, 0, 3, 1, 4)[:2]  # each (B, H, T, head_dim)
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q[:, :, :1] @ k.transpose(-2, -1)).squeeze(2) * attn.scale  # (B, H, T)
    visible = torch.cat([obj_patch_mask.new_ones(batch, 1), obj_patch_mask], dim=1)
    logits = logits.masked_fill(~visible[:, None], float("-inf"))
    return logits.softmax(dim=-1).mean(dim=1), x


def pca_rgb(patch_tokens: torch.Tensor, grid: tuple[int, int]) -> np.ndarray:
    """(N, D) patch features -> (gh, gw, 3) float in [0, 1]: the first three principal
    components, each stretched to [0, 1]."""
    centred = patch_tokens.float() - patch_tokens.float().mean(dim=0, keepdim=True)
    _, _, components = torch.linalg.svd(centred, full_matrices=False)
    projected = centred @ components[:3].T
    if projected.shape[1] < 3:  # fewer patches or dimensions than three
        projected = torch.nn.functional.pad(projected, (0, 3 - projected.shape[1]))
    low, high = projected.min(dim=0).values, projected.max(dim=0).values
    scaled = (projected - low) / (high - low).clamp(min=1e-8)
    return scaled.reshape(*grid, 3).cpu().numpy()


def _draw(
    path: Path,
    image: np.ndarray,
    pca: np.ndarray,
    attention: list[np.ndarray],
    rows: list[dict],
    title: str,
) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window (headless servers)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    height, width = image.shape[:2]
    n_panels = 2 + len(attention)
    figure, axes = plt.subplots(1, n_panels, figsize=(2.6 * n_panels, 2.9), squeeze=False)
    axes = axes[0]
    axes[0].imshow(image)
    axes[0].set_title(title, fontsize=8)
    axes[1].imshow(pca, interpolation="nearest", extent=(0, width, height, 0))
    axes[1].set_title("patch features, PCA -> RGB", fontsize=8)
    for axis, amap, row in zip(axes[2:], attention, rows, strict=True):
        axis.imshow(image)
        # Patches outside the object get exactly zero attention: leave them see-through.
        axis.imshow(
            np.ma.masked_equal(amap, 0.0),
            cmap="inferno",
            alpha=0.7,
            interpolation="nearest",
            extent=(0, width, height, 0),
        )
        if row.get("object_id") is not None:
            x, y, w, h = row["box"]
            axis.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor="cyan", linewidth=1))
        axis.set_title(f"[OBJ] attention: {row.get('category') or 'image'}", fontsize=8)
    for axis in axes:
        axis.set_axis_off()
    figure.tight_layout()
    with atomic_write(path) as handle:
        figure.savefig(handle, format="png", dpi=100)
    plt.close(figure)


@torch.no_grad()
def write_viz(
    backbone: ObjViT,
    images_root: Path | str,
    records: list[ImageRecord],
    store: MaskStore | None,
    out_dir: Path | str,
    image_size: int,
    device: str = "cpu",
) -> list[Path]:
    """One PNG per readable image of `records` in `out_dir`: the image, its patch-feature
    PCA and, per object (at most MAX_OBJECTS_DRAWN), the [OBJ] attention map with the
    object's box. Without objects the whole image is the object. Returns the PNG paths."""
    from PIL import Image

    from odis_core.images import UnreadableImageError, load_rgb

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    level = "object" if store is not None else "image"
    inputs = _ObjectInputs(
        Path(images_root), records, store, level, "masked", image_size, backbone.patch_size
    )
    grid = inputs.grid
    backbone = backbone.to(device).eval()
    written = []
    for index, record in enumerate(records):
        item = inputs[index]
        if "skipped" in item or not item["masks"]:
            continue  # unreadable, or no object: nothing to draw
        try:
            picture = np.asarray(
                load_rgb(Path(images_root) / record.file_name).resize(
                    (image_size, image_size), Image.Resampling.BICUBIC
                )
            )
        except UnreadableImageError:
            continue
        n_drawn = min(len(item["masks"]), MAX_OBJECTS_DRAWN)
        batch = torch.stack(item["images"])[torch.tensor(item["owner"][:n_drawn])].to(device)
        masks = torch.stack(item["masks"][:n_drawn]).to(device)
        attention, _ = obj_attention(backbone, batch, masks)
        maps = [row[1:].reshape(grid).float().cpu().numpy() for row in attention]
        tokens = backbone(batch[:1])[0, 1:]
        rows = [
            {
                **_scaled_row(row, record, image_size),
                "category": store.category_name(row["category_id"]) if store else None,
            }
            for row in item["rows"][:n_drawn]
        ]
        path = out_dir / (Path(record.file_name).stem + f"_{record.image_id}.png")
        _draw(path, picture, pca_rgb(tokens, grid), maps, rows, record.file_name)
        written.append(path)
    return written


def _scaled_row(row: dict, record: ImageRecord, image_size: int) -> dict:
    """The row with its box mapped from image pixels to the resized square picture."""
    if row.get("object_id") is None or not record.width or not record.height:
        return row
    x, y, w, h = row["box"]
    sx, sy = image_size / record.width, image_size / record.height
    return {**row, "box": [x * sx, y * sy, w * sx, h * sy]}
