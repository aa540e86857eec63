"""Named recipes (`--config cpu-demo`) and the meaning of every PretrainConfig key.

Recipes are the JSON files of the repository's top-level `configs/` folder (one source of
truth: the demo reads configs/cpu-demo.json). They are found next to the package in a
source checkout or an editable install (`pip install -e .`), and in
`<prefix>/share/odis/configs`, where a wheel (`pip install .`) installs them (pyproject's
data-files). `--config` takes a path first, then a recipe name.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

from odis_core.train.config import PretrainConfig, load_config_file

RECIPE_DIRS = (
    Path(__file__).resolve().parents[2] / "configs",
    Path(sys.prefix) / "share" / "odis" / "configs",
)

# One line per key: what it controls (spec section or iBOT argument where it has one).
MEANINGS = {
    "color_jitter": "colour-jitter strength, times iBOT's (0.4, 0.4, 0.2, 0.1); 0: no jitter",
    "jitter_prob": "probability of colour jitter per view (iBOT 0.8)",
    "grayscale_prob": "probability of grayscale per view (iBOT 0.2)",
    "blur_prob_scale": "times iBOT's blur probabilities (1.0, 0.1, 0.5 per view kind)",
    "solarize_prob": "probability of solarize on the second global view (iBOT 0.2)",
    "pos_embed_resample": "local crops' pos grid: ibot (scale-factor bicubic, official), timm",
    "pos_embed": "positions: learned (iBOT) or sincos (fixed 2-D sin-cos, MoCo v3)",
    "background_removal": "per-view probability of the target alone on black (0: off)",
    "obj_readout": "read-out [OBJ] tokens: no token attends to an [OBJ] key (issue 19)",
    "objects_per_image": "objects trained per image: 1 = the target only (paper), K = up to K, "
    "0 = all; != 1 needs obj_readout",
    "steps": "schedule length in steps (null: epochs x steps/epoch); the run trains that many",
    "precision": "autocast: auto (bf16 on CUDA and on CPUs with bf16 matrix units), bf16 or fp32",
    "eval_k": "k of the online k-NN monitor's weighted vote",
    "arch": "ViT width: vit_tiny, vit_small, vit_base, vit_large or a timm vit_* name",
    "patch_size": "ViT patch size in px",
    "depth": "number of transformer blocks (null: the architecture's own)",
    "drop_path": "stochastic depth rate of the student",
    "out_dim": "prototypes of the shared [OBJ]/patch head (iBOT out_dim)",
    "head_hidden_dim": "hidden width of the head's MLP",
    "head_bottleneck_dim": "bottleneck before the head's last layer",
    "head_layers": "MLP layers of the head",
    "norm_last_layer": "weight-normalised head last layer with fixed gain (iBOT norm_last_layer)",
    "objective": "odis ([OBJ] on object crops), or image (plain iBOT [CLS])",
    "masked_attention": "[OBJ] attends only to its object's patches (ablation: off)",
    "object_crops": "crops sampled around objects (ablation: off = plain random crops)",
    "feature": "obj ([OBJ] token) or meanpool (mean of in-object patch tokens)",
    "min_object_area": "objects with a smaller mask area (px) are never a crop's target",
    "global_size": "global crop size in px (also the model's native input size)",
    "local_size": "local crop size in px",
    "n_global_crops": "global crops per image (iBOT needs 2)",
    "n_local_crops": "local crops per image",
    "global_scale": "area range of global crops, as a fraction of the image",
    "local_scale": "area range of local crops, as a fraction of the image",
    "max_crop_tries": "draws of a crop until it shows its object (else the best try is kept)",
    "augment_on": "where views are resized and colour-augmented: loader, device or auto",
    "pred_ratio": "MIM masking ratio range per masked crop (iBOT pred_ratio)",
    "pred_ratio_var": "spread around pred_ratio (iBOT pred_ratio_var)",
    "min_patches_per_block": "smallest block of masked patches (iBOT: 16)",
    "student_temp": "student softmax temperature",
    "warmup_teacher_temp": "teacher [OBJ] temperature at the start of its warm-up",
    "teacher_temp": "teacher [OBJ] temperature after the warm-up",
    "warmup_teacher_patch_temp": "teacher patch temperature at the start of its warm-up",
    "teacher_patch_temp": "teacher patch temperature after the warm-up",
    "warmup_teacher_temp_epochs": "epochs of the teacher temperature warm-up",
    "center_momentum": "momentum of the teacher's output centres",
    "lambda_obj": "weight of the [OBJ] loss",
    "lambda_mim": "weight of the masked-patch loss",
    "koleo_weight": "KoLeo regulariser on the student's global [OBJ] features "
    "(DINOv2: 0.1; 0 = off, iBOT)",
    "epochs": "epochs; every schedule spans them",
    "batch_size": "images per step per process",
    "lr": "peak learning rate for a total batch of 256 (scaled linearly)",
    "min_lr": "learning rate at the end of the cosine",
    "warmup_epochs": "epochs of linear learning-rate warm-up",
    "weight_decay": "weight decay at the start (cosine schedule)",
    "weight_decay_end": "weight decay at the end",
    "momentum_teacher": "EMA momentum of the teacher at the start (cosine to 1)",
    "clip_grad": "per-parameter gradient-norm clip (0: off)",
    "freeze_last_layer": "epochs during which the head's last layer is frozen",
    "seed": "seed of weights, crops and data order",
    "device": "auto, cpu or cuda",
    "workers": "data-loading processes",
    "max_steps": "stop after this many steps (schedules still follow epochs)",
    "save_every": "steps between checkpoints (also at every epoch end)",
    "attention_impl": "split (flash-friendly), dense (one masked SDPA) or auto",
    "grad_checkpointing": "recompute block activations in backward (less memory)",
    "compile": "torch.compile the student and teacher steps",
    "deterministic": "torch.use_deterministic_algorithms (bitwise-repeatable GPU runs)",
    "tensorboard": "event files in RUN_DIR/tensorboard",
    "collapse_entropy_ratio": "warn when teacher entropy >= ratio x ln(out_dim)",
    "collapse_patience": "... for this many steps in a row",
    "extra": "free-form notes stored with the run",
}


def recipe_names() -> list[str]:
    """Names `--config` accepts besides paths, from every recipe folder present."""
    return sorted({path.stem for folder in RECIPE_DIRS if folder.is_dir()
                   for path in folder.glob("*.json")})


def resolve_config(value: str | Path) -> Path:
    """The file `--config VALUE` means: an existing path, else the recipe of that name."""
    path = Path(value)
    if path.is_file():
        return path
    name = path.stem if path.suffix == ".json" else path.name
    if path.parent in (Path("."), Path("configs")):  # a name, or the repository's path
        for folder in RECIPE_DIRS:
            if (folder / f"{name}.json").is_file():
                return folder / f"{name}.json"
    raise ValueError(f"{value}: no such config file or recipe "
                     f"(recipes: {', '.join(recipe_names()) or 'none found'})")


def load_recipe(value: str | Path) -> PretrainConfig:
    """The PretrainConfig of a config file or a named recipe (other keys: defaults)."""
    return load_config_file(resolve_config(value))


def meaning_of(name: str) -> str:
    """One line on what a key controls; keys added without an entry here fall back to the
    trailing comment of their line in config.py."""
    if name in MEANINGS:
        return MEANINGS[name]
    import inspect

    for line in inspect.getsource(PretrainConfig).splitlines():
        stripped = line.strip()
        if stripped.startswith(f"{name}:") and "#" in stripped:
            return stripped.split("#", 1)[1].strip()
    return ""


def default_of(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def config_rows(config: PretrainConfig) -> list[tuple[str, Any, Any, str]]:
    """(key, resolved value, default, meaning) for every field, in PretrainConfig's order."""
    return [(field.name, getattr(config, field.name), default_of(field), meaning_of(field.name))
            for field in dataclasses.fields(PretrainConfig)]
