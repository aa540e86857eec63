"""The pretraining loop: data → student/teacher → iBOT loss → AdamW → EMA, with checkpoints.

`pretrain` is a generator of events (start, every step, warnings, checkpoints, end), so the
CLI can draw progress and the library stays quiet. Everything a run needs to resume exactly
is in its checkpoint: weights, optimizer, loss centres, step, every rank's RNG states,
config; the data order is a pure function of (seed, epoch) and every sample draws from its
own (seed, epoch, index) generator, so resuming at step s replays the same batches with
the same crops, whatever the number of loader workers.

Under torchrun the same code runs DDP: each rank takes a disjoint slice of every global
batch, gradients and loss centres are averaged across ranks, the LR scales with the global
batch (iBOT: lr x global batch / 256), and only rank 0 writes to the run directory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from odis_core.crops.dataset import CropBatch, MimConfig, ObjectCropDataset, collate_crops
from odis_core.crops.object_aware import ObjectMultiCrop
from odis_core.crops.photometric import PhotometricSettings
from odis_core.loss.ibot import IBOTLoss
from odis_core.loss.koleo import koleo_per_crop
from odis_core.masks.store import MaskStore
from odis_core.model.heads import IBOTHead
from odis_core.model.network import DistillationNetwork, MultiCropStudent
from odis_core.model.obj_vit import ObjViT
from odis_core.precision import autocast, resolve_precision
from odis_core.train import distributed
from odis_core.train.checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    load_checkpoint,
    load_strict,
    save_checkpoint,
)
from odis_core.train.config import ARCH_OVERRIDES, PretrainConfig
from odis_core.train.curve import CURVE_NAME, curve_table, evaluation_rows, plot_curve, read_rows
from odis_core.train.ema import make_teacher, update_teacher
from odis_core.train.memory import check_step_fits
from odis_core.train.metrics import METRICS_NAME, CollapseWatch, RunLog
from odis_core.train.resume import (
    check_same_store,
    ignored_settings,
    remove_stale_temporaries,
    store_fingerprint,
)
from odis_core.train.schedules import cosine_schedule_steps
from odis_core.train.signals import ignore_stop_signals_in_worker

# How to run, not what to compute: taken from the command line even when resuming.
RUN_CONTROL_FIELDS = (
    "device",
    "workers",
    "max_steps",
    "save_every",
    "attention_impl",
    "grad_checkpointing",
    "compile",
    "deterministic",
    "tensorboard",
    # The k-NN monitor watches a run without changing it (train/monitor.py).
    "eval_masks",
    "eval_images",
    "eval_every",
    "eval_max_objects",
    "eval_k",
)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the last checkpoint on disk is left untouched."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


@dataclass
class RunStarted:
    config: PretrainConfig
    total_steps: int
    start_step: int
    iters_per_epoch: int
    n_images: int
    device: str


@dataclass
class StepDone:
    step: int  # 1-based count of optimizer steps done
    total_steps: int
    epoch: int
    metrics: dict[str, float]


@dataclass
class CollapseWarning:
    """The teacher's [OBJ] entropy has stayed near ln(out_dim): the collapse of spec §11."""

    step: int
    entropy: float
    max_entropy: float  # ln(out_dim)
    message: str


@dataclass
class ScheduleWarning:
    """--max-steps stops the run inside a warm-up phase: LR warm-up, teacher-temperature
    warm-up or the last layer's freeze (the schedules follow `epochs`, or `steps`)."""

    step: int
    message: str


@dataclass
class CheckpointSaved:
    step: int
    path: Path


@dataclass
class Evaluated:
    """One evaluation of the k-NN monitor (teacher backbone, held-out objects)."""

    step: int  # optimizer steps done when evaluated (0: the initial weights)
    knn_top1: float  # percent
    knn_top5: float
    effective_rank: float  # participation ratio of the bank features' covariance
    seconds: float  # forward passes + search (the images were decoded once, up front)


@dataclass
class Notice:
    """Something the user should read once (a resume from step 0, ignored settings)."""

    message: str


@dataclass
class RunStopped:
    """A stop was requested (SIGTERM, SIGINT): the current step finished and was saved."""

    step: int
    path: Path


@dataclass
class RunFinished:
    steps: int
    report: dict[str, Any] = field(default_factory=dict)


# Everything `pretrain` yields (the CLI draws them; the library never prints).
RunEvent = (
    RunStarted
    | ScheduleWarning
    | StepDone
    | CollapseWarning
    | Evaluated
    | CheckpointSaved
    | Notice
    | RunStopped
    | RunFinished
)

def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but torch sees no GPU")
    return device


class EpochSampler(Sampler[int]):
    """This rank's indices of one epoch: a permutation drawn from (seed, epoch), the same on
    every rank, cut into global batches of `batch_size * world` images of which rank r takes
    the r-th slice (disjoint shards; together exactly the single-process global batch).
    `start_index` (a position in the permutation) lets a resumed run see exactly the
    batches it had not seen yet."""

    def __init__(
        self, n_items: int, seed: int, batch_size: int = 1, rank: int = 0, world: int = 1
    ) -> None:
        self.n_items, self.seed = n_items, seed
        self.batch_size, self.rank, self.world = batch_size, rank, world
        self.epoch = 0
        self.start = 0

    def set_position(self, epoch: int, start_index: int) -> None:
        self.epoch, self.start = epoch, start_index

    def _global_batch_starts(self) -> range:
        global_batch = self.batch_size * self.world
        n_used = self.n_items // global_batch * global_batch  # a partial global batch is dropped
        return range(self.start, n_used, global_batch)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n_items, generator=generator).tolist()
        if self.world == 1 and self.batch_size == 1:
            return iter(order[self.start :])
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        starts = self._global_batch_starts()
        return iter([index for start in starts for index in order[start + lo : start + hi]])

    def __len__(self) -> int:
        if self.world == 1 and self.batch_size == 1:
            return self.n_items - self.start
        return len(self._global_batch_starts()) * self.batch_size


def build_backbone_for(
    config: PretrainConfig, drop_path_rate: float, grad_checkpointing: bool = False
) -> ObjViT:
    overrides = {
        name: getattr(config, name)
        for name in ARCH_OVERRIDES
        if getattr(config, name) is not None
    }
    return ObjViT(
        config.arch,
        img_size=config.global_size,
        patch_size=config.patch_size,
        drop_path_rate=drop_path_rate,
        attention_impl=config.attention_impl,
        grad_checkpointing=grad_checkpointing,
        pos_embed_resample=config.pos_embed_resample,
        obj_readout=config.obj_readout,
        pos_embed=config.pos_embed,
        **overrides,
    )


def build_network(config: PretrainConfig, student: bool = True) -> DistillationNetwork:
    backbone = build_backbone_for(
        config,
        config.drop_path if student else 0.0,
        grad_checkpointing=student and config.grad_checkpointing,
    )
    head = IBOTHead(
        backbone.embed_dim,
        out_dim=config.out_dim,
        hidden_dim=config.head_hidden_dim,
        bottleneck_dim=config.head_bottleneck_dim,
        n_layers=config.head_layers,
        norm_last_layer=config.norm_last_layer,
    )
    return DistillationNetwork(
        backbone, head, masked_attention=config.masked_attention, feature=config.feature
    )


def param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """iBOT's groups: biases and 1-D parameters (norms) are exempt from weight decay."""
    decayed, exempt = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        (exempt if name.endswith(".bias") or parameter.ndim == 1 else decayed).append(parameter)
    return [{"params": decayed}, {"params": exempt, "weight_decay": 0.0}]


@torch.no_grad()
def clip_gradients_per_parameter(model: nn.Module, max_norm: float) -> float:
    """iBOT's clipping: each parameter's gradient is scaled to norm <= max_norm on its own.
    Returns the total gradient norm before clipping (for logging)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    norms = torch._foreach_norm(grads)
    total = torch.linalg.vector_norm(torch.stack(norms)).item()
    if max_norm > 0:
        scales = [torch.clamp(max_norm / (n + 1e-6), max=1.0) for n in norms]
        torch._foreach_mul_(grads, scales)
    return total


def cancel_last_layer_gradients(model: DistillationNetwork, epoch: int, freeze_epochs: int) -> None:
    # DINO/iBOT: a frozen last layer in the first epoch stabilises the start of training.
    if epoch < freeze_epochs:
        for parameter in model.head.last_layer.parameters():
            parameter.grad = None


def make_dataset(config: PretrainConfig, store: MaskStore, images_root: Path) -> ObjectCropDataset:
    multicrop = ObjectMultiCrop(
        global_size=config.global_size,
        local_size=config.local_size,
        n_global=config.n_global_crops,
        n_local=config.n_local_crops,
        global_scale=config.global_scale,
        local_scale=config.local_scale,
        patch_size=config.patch_size,
        max_tries=config.max_crop_tries,
        object_aware=config.object_crops,
        render_pixels=config.augment_on != "device",
        photometric_settings=PhotometricSettings(
            color_jitter=config.color_jitter,
            jitter_prob=config.jitter_prob,
            grayscale_prob=config.grayscale_prob,
            blur_prob_scale=config.blur_prob_scale,
            solarize_prob=config.solarize_prob,
        ),
        background_removal=config.background_removal,
    )
    mim = MimConfig(
        pred_ratio=config.pred_ratio,
        pred_ratio_var=config.pred_ratio_var,
        min_patches_per_block=config.min_patches_per_block,
    )
    return ObjectCropDataset(
        store, images_root, multicrop, mim, seed=config.seed,
        min_object_area=config.min_object_area, objects_per_image=config.objects_per_image,
    )


class Trainer:
    """Student, teacher, loss, optimizer and schedules of one run (one rank of it)."""

    def __init__(self, config: PretrainConfig, iters_per_epoch: int, device: str) -> None:
        self.config = config
        self.device = device
        self.iters_per_epoch = iters_per_epoch
        # The schedules' length: iBOT's epochs x steps per epoch, or `steps` (the recipe's
        # epoch-based schedules laid proportionally over that many steps).
        self.total_steps = config.steps or config.epochs * iters_per_epoch
        self.precision = resolve_precision(config.precision, device)
        torch.manual_seed(config.seed)  # the same initial weights on every rank
        self.student = build_network(config, student=True).to(device)
        self.teacher = make_teacher(self.student).to(device)
        self.teacher.eval()  # no drop-path in the teacher
        if distributed.world_size() > 1:
            # Ranks draw different drop-path masks (as iBOT seeds each rank with seed + rank).
            torch.manual_seed(config.seed + distributed.rank())
        # DDP wraps the whole multi-crop step; checkpoints save the unwrapped network.
        self.student_step: nn.Module = distributed.wrap_ddp(MultiCropStudent(self.student), device)
        self.teacher_step: nn.Module = self.teacher
        if config.compile:
            self.student_step = torch.compile(self.student_step)
            self.teacher_step = torch.compile(self.teacher)
        self.loss = IBOTLoss(
            out_dim=config.out_dim,
            patch_out_dim=config.out_dim,
            n_global_crops=config.n_global_crops,
            n_local_crops=config.n_local_crops,
            n_epochs=config.epochs,
            warmup_teacher_temp=config.warmup_teacher_temp,
            teacher_temp=config.teacher_temp,
            warmup_teacher_patch_temp=config.warmup_teacher_patch_temp,
            teacher_patch_temp=config.teacher_patch_temp,
            warmup_teacher_temp_epochs=config.warmup_teacher_temp_epochs,
            student_temp=config.student_temp,
            center_momentum=config.center_momentum,
            center_momentum_patch=config.center_momentum,
            lambda_obj=config.lambda_obj,
            lambda_mim=config.lambda_mim,
        ).to(device)
        self.optimizer = torch.optim.AdamW(param_groups(self.student))
        total_batch = config.batch_size * distributed.world_size()
        self.lr_schedule = cosine_schedule_steps(
            config.lr * total_batch / 256.0,
            config.min_lr,
            self.total_steps,
            self.epoch_steps(config.warmup_epochs),
        )
        self.wd_schedule = cosine_schedule_steps(
            config.weight_decay, config.weight_decay_end, self.total_steps
        )
        self.momentum_schedule = cosine_schedule_steps(
            config.momentum_teacher, 1.0, self.total_steps
        )
        self.step = 0

    def schedule_epoch(self, step: int) -> int:
        """The recipe epoch of `step`: what the teacher temperature and the last-layer freeze
        follow (the data epoch, unless `steps` lays the schedules over another length)."""
        if self.config.steps is None:
            return step // self.iters_per_epoch
        return step * self.config.epochs // self.config.steps

    def epoch_steps(self, epochs: int) -> int:
        """The first step of recipe epoch `epochs` (the steps that `epochs` epochs span)."""
        if self.config.steps is None:
            return epochs * self.iters_per_epoch
        return -(-epochs * self.config.steps // self.config.epochs)  # ceil: schedule_epoch's

    def warmup_phases(self) -> dict[str, int]:
        """Per warm-up phase, the steps a run must take to leave it (0: no such phase): the
        LR's last warm-up value is its peak; the teacher's final temperatures start at the
        last epoch of iBOT's linspace warm-up (the epoch after it for a 1-epoch warm-up);
        the last layer first trains at the first step after the freeze."""
        config = self.config
        warming_temp = (config.warmup_teacher_temp, config.warmup_teacher_patch_temp) != (
            config.teacher_temp,
            config.teacher_patch_temp,
        )
        temp_epochs = config.warmup_teacher_temp_epochs
        first_final_epoch = temp_epochs - 1 if temp_epochs >= 2 else temp_epochs
        return {
            "LR warm-up": self.epoch_steps(config.warmup_epochs),
            "teacher-temperature warm-up": (
                self.epoch_steps(first_final_epoch) + 1 if warming_temp and temp_epochs else 0
            ),
            "last-layer freeze": (
                self.epoch_steps(config.freeze_last_layer) + 1 if config.freeze_last_layer else 0
            ),
        }

    def schedule_warning(self, stop: int) -> str | None:
        """The warning for a run stopped by --max-steps after `stop` steps inside a warm-up
        phase of schedules laid over more steps; None when it is not."""
        if stop >= self.total_steps:
            return None
        inside = [
            f"{name} (left after {end} steps)"
            for name, end in self.warmup_phases().items()
            if stop < end
        ]
        if not inside:
            return None
        return (
            f"--max-steps {stop} stops the run inside its " + ", ".join(inside)
            + f" of schedules laid over {self.total_steps} steps; "
            f"--steps {stop} lays the schedules over the steps that run"
        )

    def state(self) -> dict[str, Any]:
        """Everything to resume exactly; collective under DDP (every rank must call it)."""
        rng: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "step": self.step,
            "epoch": self.step // self.iters_per_epoch,
            "config": self.config.to_dict(),
            "student": self.student.state_dict(),
            "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "loss": self.loss.state_dict(),
            "rng": rng,
            # Drop-path draws differ per rank: each rank's stream is kept for an exact resume.
            "rng_per_rank": distributed.gather_objects(rng),
            "world_size": distributed.world_size(),
            # DDP keeps ranks bitwise identical; a differing fingerprint shows a rank drifted.
            "rank_fingerprints": distributed.gather_objects(
                [weights_fingerprint(self.student), weights_fingerprint(self.teacher)]
            ),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        source = state.get("path", "checkpoint")
        saved_world = int(state.get("world_size", 1))
        if saved_world != distributed.world_size():
            # The global batch, the rank shards and the step -> (epoch, batch) mapping all
            # depend on the number of processes: another count would not resume this run.
            raise CheckpointError(
                f"{source}: written by {saved_world} process(es); resume it with the same "
                f"number (now {distributed.world_size()})"
            )
        for name, module in (
            ("student", self.student),
            ("teacher", self.teacher),
            ("loss", self.loss),
        ):
            load_strict(module, state[name], f"{source} ({name})")
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as error:
            raise CheckpointError(f"{source}: optimizer state does not match ({error})") from None
        self.step = int(state["step"])
        rng = state["rng"]
        per_rank = state.get("rng_per_rank") or []
        if len(per_rank) == distributed.world_size():
            rng = per_rank[distributed.rank()]
        elif distributed.world_size() > 1:  # another world size: fresh per-rank streams
            rng = None
            torch.manual_seed(self.config.seed + 7919 * self.step + distributed.rank())
        if rng is not None:
            torch.set_rng_state(rng["torch"])
            random.setstate(_as_python_rng_state(rng["python"]))
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])

    def train_step(self, batch: CropBatch) -> dict[str, float]:
        config, step = self.config, self.step
        epoch = self.schedule_epoch(step)
        # Plain floats: numpy scalars in param_groups would end up in the checkpoint, which
        # torch.load(weights_only=True) refuses to unpickle.
        for index, group in enumerate(self.optimizer.param_groups):
            group["lr"] = float(self.lr_schedule[step])
            if index == 0:
                group["weight_decay"] = float(self.wd_schedule[step])
        batch = batch.to(self.device, non_blocking=True)
        with torch.no_grad():
            batch = batch.rendered(config.global_size, config.local_size)
        # Several objects per image (issue 19): S [OBJ] slots per view, the target in slot 0.
        global_objects, local_objects = objects_in_views(batch)
        several = global_objects is not None
        global_masks = batch.global_object_masks if several else batch.global_patch_masks
        local_masks = batch.local_object_masks if several else batch.local_patch_masks
        with autocast(self.device, self.precision):
            with torch.no_grad():
                teacher_obj, teacher_patch = self.teacher_step(batch.global_crops, global_masks)
            student_obj, student_patch, student_local_obj, student_features = self.student_step(
                batch.global_crops,
                global_masks,
                batch.mim_masks,
                batch.local_crops,
                local_masks,
            )
            terms = self.loss(
                student_obj,
                student_local_obj,
                student_patch,
                teacher_obj,
                teacher_patch,
                batch.mim_masks,
                epoch,
                global_objects,
                local_objects,
            )
            total_loss, koleo = terms.total, None
            if config.koleo_weight > 0:
                koleo = config.koleo_weight * koleo_per_crop(
                    student_features, config.n_global_crops
                )
                total_loss = total_loss + koleo
        # The step's one device-to-host sync before backward (KoLeo's term rides along).
        values = terms.as_floats({} if koleo is None else {"loss_koleo": koleo})
        if koleo is not None:
            values["loss"] += values["loss_koleo"]
        total = values["loss"]
        if not distributed.all_true(math.isfinite(total), self.device):
            raise NonFiniteLossError(f"loss is {total} at step {step + 1}", step + 1)
        self.optimizer.zero_grad(set_to_none=True)
        total_loss.backward()
        grad_norm = clip_gradients_per_parameter(self.student, config.clip_grad)
        cancel_last_layer_gradients(self.student, epoch, config.freeze_last_layer)
        self.optimizer.step()
        momentum = float(self.momentum_schedule[step])
        update_teacher(self.teacher, self.student, momentum)
        self.step += 1
        temp, _ = self.loss.teacher_temperatures(epoch)
        return {
            **values,
            "lr": float(self.lr_schedule[step]),
            "wd": float(self.wd_schedule[step]),
            "momentum": momentum,
            "teacher_temp": temp,
            "grad_norm": grad_norm,
        }


def objects_in_views(batch: CropBatch) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(G*B, S) and (L*B, S) bool: where each [OBJ] slot's object has patches in that view
    (padding slots never); (None, None) for one object per image."""
    # getattr: a batch built by hand (library users, tests) may predate these fields.
    if getattr(batch, "global_object_masks", None) is None or batch.object_slots is None:
        return None, None
    slots = batch.object_slots  # (B, S): padding is all-false anyway; this makes it explicit

    def present(masks: torch.Tensor) -> torch.Tensor:
        return masks.any(-1) & slots.repeat(len(masks) // len(slots), 1)  # crop-major rows

    local = batch.local_object_masks
    return present(batch.global_object_masks), None if local is None else present(local)


def world_size() -> int:
    return distributed.world_size()


@torch.no_grad()
def weights_fingerprint(module: nn.Module) -> list[float]:
    """[sum, sum of squares, index-weighted sum] of all parameters in float64: cheap on the
    device, and any difference between two ranks' weights changes it."""
    total, squares, weighted = 0.0, 0.0, 0.0
    for index, parameter in enumerate(module.parameters(), start=1):
        values = parameter.detach().double()
        total += values.sum().item()
        squares += values.square().sum().item()
        weighted += index * values.sum().item()
    return [total, squares, weighted]


def _as_python_rng_state(state: Any) -> tuple:
    # torch.load(weights_only=True) returns the tuple's inner tuple as a list.
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def set_determinism(enabled: bool) -> None:
    """Bitwise-repeatable kernels (slower on GPU); CPU runs are repeatable without it."""
    if not enabled:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to comply
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def pretrain(
    config: PretrainConfig,
    images_root: Path | str,
    store: MaskStore,
    out_dir: Path | str,
    resume: bool = False,
    given: Iterable[str] = (),
    stop_requested: Callable[[], bool] | None = None,
    memory_check: bool = True,
) -> Iterator[RunEvent]:
    """Run (or resume) pretraining, yielding events; writes into `out_dir` (rank 0 only):
    config.json (resolved), checkpoint.pt (latest, atomic), metrics.jsonl, tensorboard/,
    report.json. Under torchrun it joins the process group and trains with DDP.
    `resume` on a directory without a complete checkpoint starts at step 0 (a Notice says
    so). `given`: names of settings the user set; on resume those the checkpoint overrides
    are named in a Notice. `stop_requested()` is polled after each step: when true, the
    run checkpoints, yields RunStopped and ends. `memory_check`: refuse, before the first
    step, a batch estimated not to fit in the memory available (odis_core.train.memory)."""
    out_dir, images_root = Path(out_dir), Path(images_root)
    checkpoint_path = out_dir / CHECKPOINT_NAME
    state = None
    if out_dir.is_dir() and os.environ.get("RANK", "0") == "0":
        remove_stale_temporaries(out_dir)
    if resume and not checkpoint_path.is_file():
        yield Notice(f"--resume: no complete checkpoint in {out_dir}; starting from step 0")
    elif resume:
        # The method's settings come from the checkpoint; how to run (device, workers, when
        # to stop, how often to save) from this invocation.
        state = load_checkpoint(checkpoint_path)
        check_same_store(state, store)
        saved = PretrainConfig.from_dict(state["config"], source=str(checkpoint_path))
        ignored = ignored_settings(saved, config, given, RUN_CONTROL_FIELDS)
        if ignored:
            yield Notice("--resume keeps the checkpoint's settings; ignored: " + "; ".join(ignored))
        config = dataclasses.replace(
            saved, **{name: getattr(config, name) for name in RUN_CONTROL_FIELDS}
        )
    config = config.resolved()
    joined_here = distributed.launched_by_torchrun() and not distributed.is_initialized()
    device = distributed.init_from_environment(resolve_device(config.device))
    if config.augment_on == "auto":
        # Resolved once and saved with the run: a resume renders views the same way.
        # Background removal renders in the loader: only it holds the on-black copy.
        on_device = device.startswith("cuda") and config.background_removal == 0
        config = dataclasses.replace(config, augment_on="device" if on_device else "loader")
    # Resolved once and saved with the run (config.json, checkpoint): a resume keeps it.
    config = dataclasses.replace(config, precision=resolve_precision(config.precision, device))
    if memory_check:
        check_step_fits(config, device)
    try:
        yield from _run(config, images_root, store, out_dir, state, device, stop_requested)
    finally:
        if joined_here:  # a process group the caller created stays theirs
            distributed.shutdown()


def _run(
    config: PretrainConfig,
    images_root: Path,
    store: MaskStore,
    out_dir: Path,
    state: dict[str, Any] | None,
    device: str,
    stop_requested: Callable[[], bool] | None = None,
) -> Iterator[RunEvent]:
    set_determinism(config.deterministic)
    checkpoint_path = out_dir / CHECKPOINT_NAME
    main, world = distributed.is_main_process(), distributed.world_size()
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)

    dataset = make_dataset(config, store, images_root)
    global_batch = config.batch_size * world
    iters_per_epoch = len(dataset) // global_batch
    if iters_per_epoch < 1:
        raise ValueError(
            f"global batch {global_batch} ({config.batch_size} x {world} processes) is larger "
            f"than the {len(dataset)} images in the store"
        )
    trainer = Trainer(config, iters_per_epoch, device)
    if state is not None:
        trainer.load_state(state)
    last_saved_step = trainer.step if state is not None else None
    if main:
        (out_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    # Only rank 0 evaluates; the others wait for it in their next gradient all-reduce.
    monitor = _make_monitor(config, out_dir) if main and config.eval_masks else None

    total_steps = trainer.total_steps
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    yield RunStarted(config, total_steps, trainer.step, iters_per_epoch, len(dataset), device)
    schedule_warning = trainer.schedule_warning(total_steps)
    if schedule_warning is not None:
        yield ScheduleWarning(trainer.step, schedule_warning)

    sampler = EpochSampler(len(dataset), config.seed, config.batch_size, distributed.rank(), world)
    collapse = CollapseWatch(
        config.out_dim, config.collapse_entropy_ratio, config.collapse_patience
    )
    counts = {"images_skipped": 0, "whole_image_fallbacks": 0, "crop_fallbacks": 0, "images": 0}
    started = time.perf_counter()
    start_step = trainer.step
    data_seconds = 0.0
    log = RunLog(out_dir, trainer.step, tensorboard=config.tensorboard) if main else None
    # The curve so far (metrics.jsonl, cut back to the checkpoint's step): a resume that
    # already has the evaluation of its first step does not repeat it.
    evaluated_steps = (
        {row["step"] for row in evaluation_rows(read_rows(out_dir / METRICS_NAME))}
        if monitor is not None
        else set()
    )
    eval_times: list[float] = []  # this invocation's evaluations (their cost)
    fingerprint = store_fingerprint(store)
    stopped = False
    try:
        if monitor is not None and trainer.step not in evaluated_steps:
            yield _evaluate(monitor, trainer, log, evaluated_steps, eval_times)
        while trainer.step < total_steps:
            epoch, offset = divmod(trainer.step, iters_per_epoch)
            dataset.set_epoch(epoch)
            sampler.set_position(epoch, offset * global_batch)
            loader = DataLoader(
                dataset,
                batch_size=config.batch_size,
                sampler=sampler,
                num_workers=config.workers,
                collate_fn=collate_crops,
                drop_last=True,
                pin_memory=device.startswith("cuda"),
                persistent_workers=False,
                # Its own generator: a loader left to draw its base seed from the global RNG
                # would shift the drop-path stream at every (re)start and break exact resume.
                generator=torch.Generator().manual_seed(config.seed),
                # A stop signal is the main process's to handle (finish the step, save).
                worker_init_fn=ignore_stop_signals_in_worker,
            )
            waited_from = time.perf_counter()
            for batch in loader:
                step_started = time.perf_counter()
                data_wait = step_started - waited_from
                data_seconds += data_wait
                counts["images_skipped"] += batch.n_skipped
                counts["whole_image_fallbacks"] += batch.n_whole_image_fallback
                counts["crop_fallbacks"] += batch.n_crop_failures
                # Every image of a batch unreadable: skip the step on every rank together
                # (a rank stepping alone would wait forever in the gradient all-reduce).
                if not distributed.all_true(len(batch.indices) > 0, device):
                    trainer.step += 1
                    if trainer.step >= total_steps:
                        break
                    waited_from = time.perf_counter()
                    continue
                counts["images"] += len(batch.indices)
                try:
                    metrics = trainer.train_step(batch)
                except NonFiniteLossError as error:
                    kept = (
                        f"the checkpoint of step {last_saved_step} ({checkpoint_path}) is intact"
                        if last_saved_step is not None
                        else "no checkpoint was written"
                    )
                    raise NonFiniteLossError(f"{error}; stopped, {kept}", error.step) from None
                step_seconds = time.perf_counter() - waited_from
                metrics["images_per_second"] = len(batch.indices) * world / max(step_seconds, 1e-9)
                metrics["data_wait_share"] = data_wait / max(step_seconds, 1e-9)
                record = {"step": trainer.step, "epoch": epoch, **metrics}
                warn = collapse.update(metrics["teacher_entropy"])
                if warn:
                    record["warning"] = "collapse"
                elif schedule_warning is not None:  # on this invocation's first record
                    record["warning"], record["warning_message"] = "schedule", schedule_warning
                    schedule_warning = None
                if log is not None:
                    log.write(record)
                yield StepDone(trainer.step, total_steps, epoch, metrics)
                if warn:
                    yield CollapseWarning(
                        trainer.step,
                        metrics["teacher_entropy"],
                        collapse.max_entropy,
                        f"teacher [OBJ] entropy {metrics['teacher_entropy']:.3f} has stayed near "
                        f"ln(out_dim) = {collapse.max_entropy:.3f} for {collapse.patience} steps: "
                        "the teacher output is near uniform (collapse)",
                    )
                if monitor is not None and (
                    trainer.step == total_steps
                    or (config.eval_every and trainer.step % config.eval_every == 0)
                ):
                    yield _evaluate(monitor, trainer, log, evaluated_steps, eval_times)
                end_of_epoch = trainer.step % iters_per_epoch == 0
                periodic = config.save_every and trainer.step % config.save_every == 0
                # Every rank stops at the same step (torchrun signals each rank itself).
                stopped = stop_requested is not None and not distributed.all_true(
                    not stop_requested(), device
                )
                if end_of_epoch or periodic or trainer.step == total_steps or stopped:
                    checkpoint_state = trainer.state()  # collective: every rank takes part
                    checkpoint_state["store"] = fingerprint  # a resume on another is refused
                    if log is not None:
                        log.flush()
                        _save(checkpoint_path, checkpoint_state)
                    last_saved_step = trainer.step
                    yield CheckpointSaved(trainer.step, checkpoint_path)
                if trainer.step >= total_steps or stopped:
                    break
                waited_from = time.perf_counter()
            if stopped:
                break
        # A run ended by skipped batches still gets its last evaluation; a stopped one not
        # (a scheduler's grace period is short).
        if monitor is not None and trainer.step not in evaluated_steps and not stopped:
            yield _evaluate(monitor, trainer, log, evaluated_steps, eval_times)
    finally:
        if log is not None:
            log.close()
    if stopped and trainer.step < total_steps:  # a stop at the last step is simply the end
        yield RunStopped(trainer.step, checkpoint_path)
        return

    elapsed = time.perf_counter() - started
    report = {
        **counts,
        "steps": trainer.step,
        "steps_this_run": trainer.step - start_step,
        "seconds": round(elapsed, 2),
        "images_per_second": round(counts["images"] * world / elapsed, 2) if elapsed > 0 else None,
        "data_wait_share": round(data_seconds / elapsed, 4) if elapsed > 0 else None,
        "processes": world,
        "device": device,
    }
    if monitor is not None:
        rows = read_rows(out_dir / METRICS_NAME)
        report["curve"] = curve_table(rows)  # [[step, knn_top1, knn_top5, effective_rank]]
        seconds = [row["eval_seconds"] for row in evaluation_rows(rows) if "eval_seconds" in row]
        report["eval"] = {
            "k": config.eval_k, "n_bank": len(monitor.bank.labels),
            "n_query": len(monitor.queries.labels),
            "preload_seconds": round(monitor.preload_seconds, 2),
            "seconds_per_evaluation": round(sum(seconds) / len(seconds), 3) if seconds else None,
            "share_of_run": round(sum(eval_times) / elapsed, 4) if elapsed > 0 else None,
        }
        plot_curve(out_dir / METRICS_NAME, out_dir / CURVE_NAME,
                   title=f"{config.arch}, {config.objective} objective")
    if main:
        (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    yield RunFinished(trainer.step, report)


def _make_monitor(config: PretrainConfig, out_dir: Path) -> Any:
    """The run's k-NN monitor (its images decoded once, here); its split in eval_split.json."""
    from odis_core.masks.store import read_store
    from odis_core.train.monitor import KnnMonitor  # imports embed, which imports this module

    store = read_store(config.eval_masks)
    images_root = config.eval_images or store.images_root
    if images_root is None:
        raise ValueError(f"{config.eval_masks}: the store records no image folder; "
                         "pass --eval-images")
    monitor = KnnMonitor(store, images_root, config.global_size, config.patch_size,
                         seed=config.seed, max_objects=config.eval_max_objects, k=config.eval_k)
    (out_dir / "eval_split.json").write_text(json.dumps(monitor.split(), indent=2) + "\n")
    return monitor


def _evaluate(
    monitor: Any, trainer: Trainer, log: RunLog | None, done: set[int], times: list[float]
) -> Evaluated:
    """Evaluate the teacher's backbone now; record the row in metrics.jsonl/TensorBoard."""
    values = monitor.evaluate(trainer.teacher.backbone)
    times.append(values["eval_seconds"])
    if log is not None:
        log.write({"step": trainer.step, **values})
        log.flush()
    done.add(trainer.step)
    return Evaluated(trainer.step, values["knn_top1"], values["knn_top5"],
                     values["effective_rank"], values["eval_seconds"])


def _save(path: Path, state: dict[str, Any]) -> None:
    try:
        save_checkpoint(path, state)
    except OSError as error:
        # Disk full, read-only or vanished directory: atomic_write left the previous
        # checkpoint untouched; say so in one line.
        reason = error.strerror or str(error)
        raise CheckpointError(
            f"{path}: cannot write checkpoint ({reason}); the previous checkpoint is intact"
        ) from None
