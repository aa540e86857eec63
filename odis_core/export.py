"""Export a run's teacher backbone for use without odis: timm key names, shape and
preprocessing included.

`odis export RUN --out DIR` writes DIR/model.safetensors and DIR/config.json in the layout
of timm's hub checkpoints (`architecture`, `model_args`, `pretrained_cfg`), so
`timm.create_model("local-dir:DIR", pretrained=True)` rebuilds the network the run trained
(patch size, depth, width, heads, image size) and loads it strictly, and
`timm.data.resolve_data_config({}, model=m)` gives odis's own inference preprocessing:
the whole image squashed to a square `global_size` with PIL bicubic (odis never centre-crops:
objects at the border would be cut away), ImageNet mean/std. In timm's terms that is
crop_mode "squash" with crop_pct 1.0. The [OBJ] token is timm's class token; masked
inference needs odis, image-level use does not.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import timm
from safetensors.torch import save

from odis_core.atomic import atomic_write
from odis_core.crops.photometric import IMAGENET_MEAN, IMAGENET_STD
from odis_core.embed.inference import load_teacher_backbone
from odis_core.model.obj_vit import ARCHITECTURES, ObjViT
from odis_core.train.checkpoint import load_strict
from odis_core.train.config import PretrainConfig

WEIGHTS_NAME = "model.safetensors"  # the first name timm's local-dir loader looks for
CONFIG_NAME = "config.json"


def timm_kwargs_of(backbone: ObjViT, config: PretrainConfig) -> dict[str, Any]:
    """The keyword arguments of `timm.create_model(architecture, ...)` that rebuild this
    backbone's exact shape: every shape argument is explicit, so a non-standard network
    (the demo's 4-block ViT-Ti/8 at 64 px) does not depend on what the name implies."""
    vit = backbone.vit
    return {
        "num_classes": 0,
        "img_size": config.global_size,
        "patch_size": backbone.patch_size,
        "depth": len(vit.blocks),
        "embed_dim": backbone.embed_dim,
        "num_heads": vit.blocks[0].attn.num_heads,
        # Local crops were smaller than global ones: the position embedding resamples.
        "dynamic_img_size": True,
    }


def architecture_of(backbone: ObjViT) -> str:
    """The registered timm name that matches the patch size and width if one exists
    (e.g. vit_small_patch8_224 for a ViT-S/8), else the run's own entry point; model_args
    carry the exact shape either way."""
    if backbone.arch not in ARCHITECTURES.values():  # a timm name the user chose: keep it
        return backbone.arch
    candidate = backbone.arch.replace("_patch16_", f"_patch{backbone.patch_size}_")
    return candidate if candidate in timm.list_models(candidate) else backbone.arch


def pretrained_cfg_of(config: PretrainConfig, architecture: str) -> dict[str, Any]:
    """timm's data configuration describing odis's inference preprocessing exactly."""
    size = config.global_size
    return {
        "architecture": architecture,
        "tag": "odis",
        "input_size": [3, size, size],
        "fixed_input_size": False,
        "interpolation": "bicubic",  # PIL bicubic, as odis_core.embed resizes
        "crop_pct": 1.0,
        "crop_mode": "squash",  # whole image to a square, aspect ratio not kept, no crop
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "num_classes": 0,
        "pool_size": None,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
    }


def hub_config_of(backbone: ObjViT, config: PretrainConfig) -> dict[str, Any]:
    """The content of config.json, in the layout of timm's hub checkpoints."""
    architecture = architecture_of(backbone)
    return {
        "architecture": architecture,
        "num_classes": 0,
        "num_features": backbone.embed_dim,
        "global_pool": "token",
        "model_args": timm_kwargs_of(backbone, config),
        "pretrained_cfg": pretrained_cfg_of(config, architecture),
    }


def export_paths(out: Path | str) -> tuple[Path, Path]:
    """(weights, config.json): `out` is a folder unless it names a .safetensors file, whose
    config.json is then written beside it."""
    out = Path(out)
    if out.suffix == ".safetensors":
        return out, out.parent / CONFIG_NAME
    return out / WEIGHTS_NAME, out / CONFIG_NAME


def export_teacher(checkpoint: Path | str, out: Path | str) -> dict[str, Any]:
    """Write the teacher backbone of `checkpoint` (a run directory or file) to `out` (a
    folder, or a .safetensors file) and return what was written: paths, the hub config
    and the number of tensors."""
    backbone, config = load_teacher_backbone(checkpoint)
    state = {key: value.detach().contiguous() for key, value in backbone.vit.state_dict().items()}
    hub_config = hub_config_of(backbone, config)
    architecture, model_args = hub_config["architecture"], hub_config["model_args"]
    # Prove the promise before writing: the named architecture with these arguments takes
    # every key, strictly.
    plain = timm.create_model(architecture, pretrained=False, **model_args)
    load_strict(plain, state, f"{checkpoint} (as timm {architecture})")
    metadata = {
        "format": "odis-teacher-backbone",
        "architecture": architecture,
        "model_args": json.dumps(model_args),
        "pretrained_cfg": json.dumps(hub_config["pretrained_cfg"]),
        # Earlier exports' names for the same facts (odis embed reads either).
        "arch": architecture,
        "timm_kwargs": json.dumps(model_args),
        # Read-out [OBJ] (issue 19): timm's weights are the same, the attention mask is not.
        "obj_readout": json.dumps(bool(backbone.obj_readout)),
        "source": str(checkpoint),
    }
    weights_path, config_path = export_paths(out)
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(weights_path) as handle:
        handle.write(save(state, metadata=metadata))
    # Written last: a folder with config.json holds whole weights.
    with atomic_write(config_path) as handle:
        handle.write((json.dumps(hub_config, indent=2) + "\n").encode("utf-8"))
    return {
        "weights": weights_path,
        "config": config_path,
        "hub_config": hub_config,
        "obj_readout": backbone.obj_readout,
        "tensors": len(state),
    }

