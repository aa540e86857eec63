"""Checkpoints that resume exactly and load without running code from the file.

A checkpoint is a dict of tensors and plain data only (the config as a dict, never a
pickled object), written to a temporary name and renamed, and read back with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from odis_core.atomic import atomic_write

CHECKPOINT_FORMAT = "odis-checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"
# Prefixes that wrappers (DDP, iBOT/DINO MultiCropWrapper, our network) put before timm's keys.
_WRAPPER_PREFIXES = ("module.", "backbone.", "vit.")


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message names the file and the problem."""


def save_checkpoint(path: Path | str, state: dict[str, Any]) -> None:
    """Write `state` atomically: a temporary file in the same directory, then rename."""
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}
    with atomic_write(path) as handle:
        torch.save(payload, handle)


def resolve_checkpoint_path(path: Path | str) -> Path:
    """A run directory means its latest checkpoint; a file means itself."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    return path


def load_checkpoint(path: Path | str, map_location: str = "cpu") -> dict[str, Any]:
    path = resolve_checkpoint_path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises many types for corrupt or foreign files
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error)
        raise CheckpointError(f"{path}: cannot load checkpoint ({first_line})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not an odis checkpoint")
    state["path"] = str(path)
    return state


def strip_prefixes(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Keys under `prefix` with that prefix removed (e.g. 'backbone.vit.' -> timm names)."""
    return {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}


def timm_backbone_state(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm key names from a network, DDP or DINO/iBOT-style state dict: wrapper prefixes are
    stripped once, here, and head or mask-token entries dropped."""
    result = {}
    for key, value in state_dict.items():
        while key.startswith(_WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        if key.startswith(("head.", "mask_token", "masked_embed", "last_layer")):
            continue
        result[key] = value
    return result


# The old `torch.nn.utils.weight_norm` names of iBOT/DINO heads -> the parametrization's.
_WEIGHT_NORM_NAMES = {"weight_g": "parametrizations.weight.original0",
                      "weight_v": "parametrizations.weight.original1"}


def network_state_from_official(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An odis DistillationNetwork state dict from an official iBOT/DINO student or teacher
    (MultiCropWrapper keys `backbone.*` and `head.*`, optionally under DDP's `module.`).

    backbone.X -> backbone.vit.X (timm names); backbone.masked_embed (1, D) -> the mask token
    (1, 1, 1, D); the head's old weight_norm `weight_g`/`weight_v` -> the parametrization's
    `original0`/`original1`; iBOT's shared-head duplicates `head.last_layer2.*` are dropped
    (with a shared head it is the same module as `head.last_layer`)."""
    result = {}
    for key, value in state_dict.items():
        while key.startswith("module."):
            key = key[len("module."):]
        if key.startswith("head.last_layer2."):
            continue
        if key == "backbone.masked_embed":
            result["backbone.mask_token"] = value.reshape(1, 1, 1, -1)
            continue
        if key.startswith("backbone."):
            key = "backbone.vit." + key[len("backbone."):]
        prefix, _, leaf = key.rpartition(".")
        if prefix.startswith("head.last_layer") and leaf in _WEIGHT_NORM_NAMES:
            key = f"{prefix}.{_WEIGHT_NORM_NAMES[leaf]}"
        result[key] = value
    return result


def load_strict(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict that fails loudly, listing missing and unexpected keys (a silent
    partial load evaluates random weights: spec §11)."""
    missing, unexpected = module.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        def _short(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
        raise CheckpointError(
            f"{source}: weights do not match the model: "
            f"missing [{_short(list(missing))}], unexpected [{_short(list(unexpected))}]"
        )
