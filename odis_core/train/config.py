"""Pretraining configuration: every default in one place, iBOT's numbers (spec §10).

Defaults follow the published iBOT ViT-S/16 recipe (teacher temperature 0.07, shared
head with trainable last-layer gain, 10 local crops of 96 px, global scale (0.25, 1),
local scale (0.05, 0.25), MIM ratio 0 or 0.1-0.5 per crop) and iBOT's code defaults for
the rest. A run writes its resolved configuration to `RUN_DIR/config.json`; `--config
FILE` reads the same JSON format (any subset of keys; keys starting with "_" are comments),
and command-line options override it. Named recipes: `odis_core/train/recipes.py`.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from odis_core.cpus import default_workers
from odis_core.precision import PRECISIONS

OBJECTIVES = ("odis", "image")
AUGMENT_ON = ("auto", "loader", "device")
# Architecture fields a run may override (None: the timm architecture's own value).
ARCH_OVERRIDES = ("depth", "embed_dim", "num_heads")


@dataclass
class PretrainConfig:
    # Model (spec §4)
    arch: str = "vit_small"
    patch_size: int = 16
    depth: int | None = None  # None: the architecture's own depth (12 for ViT-S/B)
    embed_dim: int | None = None  # None: the architecture's own width (tiny test models)
    num_heads: int | None = None  # None: the architecture's own number of heads
    # Position embedding of local crops: "ibot" (DINO/iBOT's scale-factor resampling, the
    # official behaviour) or "timm" (timm's resample_abs_pos_embed, odis before issue 14).
    pos_embed_resample: str = "ibot"
    # "learned" (iBOT) or "sincos": fixed 2-D sin-cos positions (MoCo v3; issue 17).
    pos_embed: str = "learned"
    drop_path: float = 0.1
    out_dim: int = 8192  # shared head: the patch head has the same out_dim
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_layers: int = 3
    norm_last_layer: bool = False

    # Method and its ablations (spec §8). "image" = plain iBOT: random crops, unmasked [CLS].
    objective: str = "odis"
    masked_attention: bool = True
    object_crops: bool = True
    feature: str = "obj"  # "obj" ([OBJ] token) or "meanpool" (mean of in-object patches)
    min_object_area: float = 0.0
    # Read-out [OBJ] tokens (issue 19): no row attends to an [OBJ] key but its own, so
    # inference embeds every object of an image in one pass. Off = the paper's model.
    obj_readout: bool = False
    # Objects trained per image (issue 19): 1 = the paper (the crops' target only); K > 1 =
    # the target plus up to K - 1 other objects of the image, each with its own read-out
    # [OBJ] token and [OBJ] loss terms; 0 = every object of the image. K != 1 needs
    # obj_readout (several [OBJ] keys that patches read is the variant reported to collapse).
    objects_per_image: int = 1

    # Multi-crop (spec §3)
    global_size: int = 224
    local_size: int = 96
    n_global_crops: int = 2
    n_local_crops: int = 10
    global_scale: tuple[float, float] = (0.25, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.25)
    max_crop_tries: int = 20
    # Where views are resampled and colour-augmented: "loader" (PIL in the DataLoader
    # workers, DINO's own pipeline), "device" (one batched pass on the training device; the
    # workers only decode and draw the crops: spec §13), "auto" (device on CUDA).
    augment_on: str = "auto"
    # Photometric strength (issue 17); the defaults are iBOT's: jitter (0.4, 0.4, 0.2, 0.1)
    # times color_jitter with p=jitter_prob, grayscale p, blur p (1.0, 0.1, 0.5 per view kind)
    # times blur_prob_scale, solarize p on the second global view.
    color_jitter: float = 1.0
    jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    blur_prob_scale: float = 1.0
    solarize_prob: float = 0.2
    # Probability that a view shows the target alone on black (background augmentation,
    # Ryali et al. 2021): against matching views by the scene's background. 0 = iBOT.
    background_removal: float = 0.0

    # Block-wise MIM masks (iBOT)
    pred_ratio: tuple[float, float] = (0.0, 0.3)
    pred_ratio_var: tuple[float, float] = (0.0, 0.2)
    min_patches_per_block: int = 16

    # Objective (spec §5)
    student_temp: float = 0.1
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.07
    warmup_teacher_patch_temp: float = 0.04
    teacher_patch_temp: float = 0.07
    warmup_teacher_temp_epochs: int = 30
    center_momentum: float = 0.9
    lambda_obj: float = 1.0
    lambda_mim: float = 1.0
    # DINOv2's KoLeo regulariser on the student's global [OBJ] backbone features (issue 17):
    # spreads the batch over the sphere against dimensional collapse. 0 = iBOT (off);
    # DINOv2 uses 0.1.
    koleo_weight: float = 0.0

    # Optimisation (spec §10)
    epochs: int = 100
    batch_size: int = 64  # per process
    lr: float = 5e-4  # for a total batch of 256; scaled linearly with the total batch
    min_lr: float = 1e-6
    warmup_epochs: int = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    momentum_teacher: float = 0.996
    clip_grad: float = 3.0  # per-parameter gradient norm; 0 disables
    freeze_last_layer: int = 1  # epochs during which the head's last layer is frozen

    # Run
    seed: int = 0
    device: str = "auto"  # "auto", "cpu", "cuda"
    workers: int = field(default_factory=default_workers)  # min(8, CPUs this process may use)
    max_steps: int | None = None  # stop early; schedules still follow `epochs` (or `steps`)
    # Schedule length in steps: the recipe's epoch-based schedules (LR and teacher-temperature
    # warm-ups, cosines, last-layer freeze) are laid proportionally over this many steps, and
    # the run trains this many steps. None: iBOT's own, `epochs` x steps per epoch.
    steps: int | None = None
    # Autocast: "bf16", "fp32", or "auto" (bf16 on CUDA, and on CPUs with bf16 matrix units
    # (AMX / AVX-512 BF16); fp32 otherwise). Resolved once and kept in the run's config.
    precision: str = "auto"
    save_every: int | None = None  # steps between checkpoints (also saved at each epoch end)

    # Speed and scale (issue 5): none of these changes what is computed
    attention_impl: str = "auto"  # "split" (flash-friendly), "dense" (one mask); auto: GPU split
    grad_checkpointing: bool = False  # recompute block activations (ViT-L on one GPU)
    compile: bool = False  # torch.compile the student and teacher steps
    deterministic: bool = False  # torch.use_deterministic_algorithms (bitwise-repeatable GPU)
    tensorboard: bool = True  # event files in RUN_DIR/tensorboard
    collapse_entropy_ratio: float = 0.98  # warn when teacher entropy >= ratio * ln(out_dim)
    collapse_patience: int = 10  # ... for this many steps in a row

    # Online k-NN monitor (issue 14, train/monitor.py); run control: may change on resume
    eval_masks: str | None = None  # evaluation mask store; None: no monitor
    eval_images: str | None = None  # its image folder (default: the store's)
    eval_every: int | None = None  # steps between evaluations (None: first and last only)
    eval_max_objects: int = 1000  # objects of bank + queries (the cost of an evaluation)
    eval_k: int = 20

    extra: dict[str, Any] = field(default_factory=dict)

    def resolved(self) -> PretrainConfig:
        """A validated copy with the objective's implications and clamped warm-ups applied."""
        config = dataclasses.replace(self)
        if config.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {config.objective!r}")
        _check_objects_per_image(config)
        if config.objective == "image":
            config.masked_attention = False
            config.object_crops = False
            config.feature = "obj"
        # iBOT's schedules need warm-ups no longer than the run; short runs shorten them.
        config.warmup_epochs = min(config.warmup_epochs, config.epochs)
        config.warmup_teacher_temp_epochs = min(config.warmup_teacher_temp_epochs, config.epochs)
        for name in ("epochs", "batch_size", "n_global_crops", "patch_size", "max_steps",
                     "save_every", "global_size", "local_size", "out_dim", "depth"):
            value = getattr(config, name)
            if value is not None and value < 1:
                raise ValueError(f"{_option(name)} {value}: must be >= 1")
        for name in ("lr", "min_lr", "workers", "n_local_crops", "weight_decay", "clip_grad",
                     "koleo_weight"):
            value = getattr(config, name)
            if value < 0:
                raise ValueError(f"{_option(name)} {value}: must be >= 0")
        if config.koleo_weight > 0 and config.batch_size < 2:
            # KoLeo pushes each feature from its nearest neighbour in the batch: it needs one.
            raise ValueError(f"{_option('koleo_weight')} {config.koleo_weight}: needs "
                             f"--batch-size >= 2 per process, not {config.batch_size}")
        if config.device not in ("auto", "cpu") and not config.device.startswith("cuda"):
            raise ValueError(f"--device {config.device}: use auto, cpu or cuda (cuda:N)")
        if config.attention_impl not in ("auto", "split", "dense"):
            raise ValueError(f"attention_impl: auto, split or dense, not {config.attention_impl!r}")
        if config.steps is not None and config.steps < 1:
            raise ValueError(f"steps must be >= 1, not {config.steps}")
        if config.precision not in PRECISIONS:
            raise ValueError(f"precision: one of {PRECISIONS}, not {config.precision!r}")
        if config.pos_embed_resample not in ("ibot", "timm"):
            raise ValueError(f"pos_embed_resample: ibot or timm, not {config.pos_embed_resample!r}")
        if not 0.0 <= config.background_removal <= 1.0:
            raise ValueError(f"{_option('background_removal')} {config.background_removal}: "
                             "must be a probability in [0, 1]")
        if config.background_removal > 0 and config.augment_on == "device":
            # The device renders every view from one source image: it has no on-black copy.
            raise ValueError(f"{_option('background_removal')} needs --augment-on loader")
        if config.background_removal > 0 and config.objects_per_image != 1:
            # Only the target is kept on black: the other objects' [OBJ] slots would read
            # black patches in those views.
            raise ValueError(f"{_option('background_removal')} needs --objects-per-image 1")
        if config.pos_embed not in ("learned", "sincos"):
            raise ValueError(f"{_option('pos_embed')}: learned or sincos, not {config.pos_embed!r}")
        if config.augment_on not in AUGMENT_ON:
            raise ValueError(f"augment_on: one of {AUGMENT_ON}, not {config.augment_on!r}")
        if config.n_global_crops != 2:
            raise ValueError("iBOT's objective needs exactly 2 global crops")
        if config.eval_masks is not None:
            config.eval_masks = str(config.eval_masks)  # a Path from Python: JSON-able
        if config.eval_images is not None:
            config.eval_images = str(config.eval_images)
        if config.eval_masks is None and config.eval_every is not None:
            raise ValueError("eval_every needs eval_masks (the evaluation mask store)")
        if config.eval_every is not None and config.eval_every < 1:
            raise ValueError(f"eval_every must be >= 1, got {config.eval_every}")
        for size_name in ("global_size", "local_size"):
            if getattr(config, size_name) % config.patch_size:
                raise ValueError(f"{size_name} must be a multiple of patch_size")
        return config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> PretrainConfig:
        # Keys starting with "_" document a recipe file ("_comment"); they are not options.
        values = {name: value for name, value in values.items() if not name.startswith("_")}
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"{source}: unknown option(s) {', '.join(unknown)}")
        hints = typing.get_type_hints(cls)
        for name, value in values.items():
            if not _fits(value, hints[name]):
                raise ValueError(f"{source}: {name}: expected {_type_name(hints[name])}, "
                                 f"got {json.dumps(value)}")
        converted = {
            name: tuple(value) if isinstance(value, list) else value
            for name, value in values.items()
        }
        return cls(**converted)


def _check_objects_per_image(config: PretrainConfig) -> None:
    """Several objects per image are only defined for ODIS's [OBJ] tokens, read out."""
    count = config.objects_per_image
    if count < 0:
        raise ValueError(f"{_option('objects_per_image')} {count}: must be >= 0 (0: all)")
    if count == 1:
        return
    if config.objective != "odis":
        raise ValueError(f"--objects-per-image {count} needs --objective odis: the image "
                         "objective has no objects")
    if not config.obj_readout:
        raise ValueError(f"--objects-per-image {count} needs --obj-readout: without read-out "
                         "tokens every patch attends to every object's [OBJ] key (the "
                         "several-[OBJ] variant the paper's authors saw collapse)")
    if not config.masked_attention or config.feature != "obj":
        raise ValueError(f"--objects-per-image {count} needs masked attention and the [OBJ] "
                         "feature: each object's token reads its own patches")


def _fits(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a field's type (a type this check does not know: yes)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        return any(_fits(value, arg) for arg in args)
    if hint in (bool, int, float, str, type(None)):
        # JSON has one number type: an int is a valid float; a bool is never a number.
        accepted = (int, float) if hint is float else hint
        return isinstance(value, accepted) and (hint is bool or not isinstance(value, bool))
    if origin is tuple:
        return isinstance(value, (list, tuple)) and len(value) == len(args) and all(
            _fits(item, arg) for item, arg in zip(value, args, strict=True))
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    return True


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _option(name: str) -> str:
    """The command-line spelling of a config key (messages name what the user typed)."""
    return f"{name} (--{name.replace('_', '-')})"


def load_config_file(path: Path | str) -> PretrainConfig:
    """A PretrainConfig from a JSON file holding any subset of the fields."""
    path = Path(path)
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: config file not found") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: malformed JSON ({error})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a JSON object of options")
    # Keys starting with "_" are comments (e.g. "_comment": why each value was chosen).
    options = {key: value for key, value in values.items() if not key.startswith("_")}
    return PretrainConfig.from_dict(options, source=str(path))
