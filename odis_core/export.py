"""Export a run's teacher backbone as a safetensors file with timm's key names.

The file loads into `timm.create_model(arch, num_classes=0, ...)` with `strict=True`, so the
backbone can be used without odis (fine-tuning, detection, other evaluation code). The
[OBJ] token is timm's class token; masked inference needs odis, image-level use does not.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import save

from odis_core.atomic import atomic_write
from odis_core.embed.inference import load_teacher_backbone
from odis_core.train.checkpoint import load_strict
from odis_core.train.config import ARCH_OVERRIDES


def timm_kwargs_of(backbone: torch.nn.Module, config: Any) -> dict[str, Any]:
    """What `timm.create_model` needs to rebuild this backbone without odis."""
    kwargs: dict[str, Any] = {
        "num_classes": 0,
        "img_size": config.global_size,
        "patch_size": backbone.patch_size,
        "dynamic_img_size": True,
    }
    for name in ARCH_OVERRIDES:  # set only where the run overrode the architecture's own
        if getattr(config, name, None) is not None:
            kwargs[name] = getattr(config, name)
    return kwargs


def export_teacher(checkpoint: Path | str, out: Path | str) -> dict[str, Any]:
    """Write the teacher backbone of `checkpoint` (a run directory or file) to `out` and
    return the metadata stored in the file's header (arch and timm.create_model kwargs)."""
    backbone, config = load_teacher_backbone(checkpoint)
    state = {key: value.detach().contiguous() for key, value in backbone.vit.state_dict().items()}
    kwargs = timm_kwargs_of(backbone, config)
    # Prove the promise before writing: a plain timm model takes every key, strictly.
    plain = timm.create_model(backbone.arch, pretrained=False, **kwargs)
    load_strict(plain, state, f"{checkpoint} (as timm {backbone.arch})")
    metadata = {
        "format": "odis-teacher-backbone",
        "arch": backbone.arch,
        "timm_kwargs": json.dumps(kwargs),
        # Read-out [OBJ] (issue 19): timm's weights are the same, the attention mask is not.
        "obj_readout": json.dumps(bool(backbone.obj_readout)),
        "source": str(checkpoint),
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out) as handle:
        handle.write(save(state, metadata=metadata))
    return {**metadata, "timm_kwargs": kwargs, "obj_readout": backbone.obj_readout,
            "tensors": len(state)}
