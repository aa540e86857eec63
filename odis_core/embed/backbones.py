"""The backbone `odis embed` runs: an odis run's teacher, or any timm ViT checkpoint.

Accepted files:
- an odis run directory or `checkpoint.pt` (the teacher backbone, architecture from its
  config);
- an `odis export` safetensors file or folder (architecture from its header);
- any other state dict, .pth or .safetensors — timm, DINO, iBOT, DeiT: give its timm
  architecture (`arch`). The state dict may sit under "teacher", "state_dict", "model" or
  "module"; wrapper prefixes (`module.`, `backbone.`, `vit.`) are stripped once, heads are
  dropped, and then the keys must match the model exactly (spec §11: a partial load
  silently evaluates random weights; users hit this with DINO checkpoints, dino#65).

Only `torch.load(weights_only=True)`: a checkpoint never runs code on load. Full DINO/iBOT
training checkpoints pickle an argparse Namespace and are refused with that explanation.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from odis_core.model.obj_vit import ObjViT
from odis_core.train.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_NAME,
    CheckpointError,
    load_strict,
    resolve_checkpoint_path,
    timm_backbone_state,
)
from odis_core.train.config import ARCH_OVERRIDES

# Where training scripts put the weights inside a checkpoint dict, most specific first
# (DINO/iBOT: "teacher"/"student"; timm, DeiT: "state_dict"/"model"; DDP saves: "module").
STATE_DICT_KEYS = ("teacher", "state_dict", "model", "module")


@dataclass
class LoadedBackbone:
    """backbone: the ObjViT in eval mode on the CPU. name: the architecture (timm name or
    odis short name). weights: a fingerprint of the weights, so k-NN can check that bank
    and queries came from one backbone. image_size: its native input size. source: "odis"
    for an odis run, "timm" for anything else. config: the odis run config, if any."""

    backbone: ObjViT
    name: str
    weights: str
    image_size: int
    source: str
    config: Any = None


def weights_fingerprint(module: torch.nn.Module) -> str:
    """16 hex digits hashing every tensor of the state dict (names, shapes and bytes)."""
    digest = hashlib.blake2b(digest_size=8)
    for key, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(flat.view(torch.uint8).numpy())  # the buffer itself, no copy
    return digest.hexdigest()


def _is_tensor_dict(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and bool(value)
        and all(isinstance(item, torch.Tensor) for item in value.values())
    )


def _foreign_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict in a non-odis file and the safetensors header (empty for .pth)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), "pt") as handle:
                header = handle.metadata() or {}
            return load_file(str(path)), header
        except Exception as error:  # safetensors raises several types for bad files
            raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for corrupt or foreign files
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error)
        raise CheckpointError(
            f"{path}: cannot load with weights_only=True ({first_line}); if it pickles "
            "Python objects (DINO/iBOT training checkpoints hold an argparse Namespace), "
            "save its state dict alone with torch.save(ckpt['teacher'], ...) first"
        ) from None
    if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT:
        return state, {"format": CHECKPOINT_FORMAT}
    if isinstance(state, dict):
        for key in STATE_DICT_KEYS:
            if _is_tensor_dict(state.get(key)):
                return state[key], {}
    if _is_tensor_dict(state):
        return state, {}
    raise CheckpointError(
        f"{path}: no state dict found (looked for a dict of tensors at the "
        f"top level and under {', '.join(STATE_DICT_KEYS)})"
    )


def _geometry(state: dict[str, torch.Tensor], path: Path) -> tuple[int, int]:
    """(patch size, image size) implied by the patch projection and position embedding."""
    try:
        patch_size = int(state["patch_embed.proj.weight"].shape[-1])
        n_positions = int(state["pos_embed"].shape[1]) - 1  # minus the class token
    except KeyError as error:
        raise CheckpointError(f"{path}: weights do not match a ViT: no {error} key") from None
    grid = math.isqrt(n_positions)
    if grid * grid != n_positions:
        raise CheckpointError(
            f"{path}: pos_embed has {n_positions} patch positions, not a "
            "square grid (a model with registers or no class token?)"
        )
    return patch_size, grid * patch_size


def load_backbone(checkpoint: Path | str, arch: str | None = None) -> LoadedBackbone:
    """Load the backbone of `checkpoint` (see the module docstring for accepted files).

    arch: the timm architecture of a foreign state dict (e.g. vit_base_patch16_224);
    ignored for odis files, which name their own. Raises CheckpointError naming the file
    and listing missing/unexpected keys when the weights do not fit the architecture.
    """
    from odis_core.embed.inference import load_teacher_backbone

    folder = Path(checkpoint)
    if (folder.is_dir() and not (folder / CHECKPOINT_NAME).exists()
            and (folder / "model.safetensors").is_file()):
        checkpoint = folder / "model.safetensors"  # an `odis export` folder
    path = resolve_checkpoint_path(checkpoint)
    state, header = _foreign_state_dict(path)
    if header.get("format") == CHECKPOINT_FORMAT:
        backbone, config = load_teacher_backbone(path)
        return LoadedBackbone(
            backbone.eval(),
            config.arch,
            weights_fingerprint(backbone.vit),
            config.global_size,
            "odis",
            config,
        )
    state = timm_backbone_state(state)
    if header.get("format") == "odis-teacher-backbone":
        arch = header["arch"]
    if arch is None:
        raise CheckpointError(
            f"{path}: not an odis checkpoint; give its timm architecture "
            "with --arch (e.g. vit_base_patch16_224)"
        )
    patch_size, image_size = _geometry(state, path)
    kwargs = json.loads(header["timm_kwargs"]) if "timm_kwargs" in header else {}
    overrides = {name: kwargs[name] for name in ARCH_OVERRIDES if name in kwargs}
    # Exports of read-out runs say so in their header (odis_core/export.py).
    obj_readout = json.loads(header.get("obj_readout", "false")) is True
    try:
        backbone = ObjViT(
            arch, img_size=image_size, patch_size=patch_size, drop_path_rate=0.0,
            obj_readout=obj_readout, **overrides,
        )
    except ValueError as error:
        raise CheckpointError(f"{path}: {error}") from None
    try:
        load_strict(backbone.vit, state, str(path))
    except RuntimeError as error:  # same keys, other shapes (e.g. ViT-S weights, ViT-B arch)
        detail = str(error).strip().splitlines()
        raise CheckpointError(
            f"{path}: weights do not match {backbone.arch}: "
            f"{detail[1].strip() if len(detail) > 1 else detail[0]}"
        ) from None
    return LoadedBackbone(
        backbone.eval(), backbone.arch, weights_fingerprint(backbone.vit), image_size, "timm"
    )
