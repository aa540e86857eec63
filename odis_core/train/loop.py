"""The pretraining loop: data → student/teacher → iBOT loss → AdamW → EMA, with checkpoints.

`pretrain` is a generator of events (start, every step, checkpoints, end), so the CLI can
draw progress and the library stays quiet. Everything a run needs to resume exactly is in
its checkpoint: weights, optimizer, loss centres, step, RNG state, config; the data order
is a pure function of (seed, epoch), so resuming at step s replays the same batches.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Sampler

from odis_core.crops.dataset import CropBatch, MimConfig, ObjectCropDataset, collate_crops
from odis_core.crops.object_aware import ObjectMultiCrop
from odis_core.loss.ibot import IBOTLoss
from odis_core.masks.store import MaskStore
from odis_core.model.heads import IBOTHead
from odis_core.model.network import DistillationNetwork
from odis_core.model.obj_vit import ObjViT
from odis_core.train.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from odis_core.train.config import PretrainConfig
from odis_core.train.ema import make_teacher, update_teacher
from odis_core.train.schedules import cosine_schedule

RUN_CONTROL_FIELDS = ("device", "workers", "max_steps", "save_every")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the last checkpoint on disk is left untouched."""


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
class CheckpointSaved:
    step: int
    path: Path


@dataclass
class RunFinished:
    steps: int
    report: dict[str, Any] = field(default_factory=dict)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but torch sees no GPU")
    return device


class EpochSampler(Sampler[int]):
    """Indices of one epoch: a permutation drawn from (seed, epoch), starting at a batch
    offset so a resumed run sees exactly the batches it had not seen yet."""

    def __init__(self, n_items: int, seed: int) -> None:
        self.n_items = n_items
        self.seed = seed
        self.epoch = 0
        self.start = 0

    def set_position(self, epoch: int, start_index: int) -> None:
        self.epoch, self.start = epoch, start_index

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n_items, generator=generator).tolist()
        return iter(order[self.start:])

    def __len__(self) -> int:
        return self.n_items - self.start


def build_backbone_for(config: PretrainConfig, drop_path_rate: float) -> ObjViT:
    depth = {} if config.depth is None else {"depth": config.depth}
    return ObjViT(
        config.arch,
        img_size=config.global_size,
        patch_size=config.patch_size,
        drop_path_rate=drop_path_rate,
        **depth,
    )


def build_network(config: PretrainConfig, student: bool = True) -> DistillationNetwork:
    backbone = build_backbone_for(config, config.drop_path if student else 0.0)
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
    )
    mim = MimConfig(
        pred_ratio=config.pred_ratio,
        pred_ratio_var=config.pred_ratio_var,
        min_patches_per_block=config.min_patches_per_block,
    )
    return ObjectCropDataset(
        store, images_root, multicrop, mim, seed=config.seed, min_object_area=config.min_object_area
    )


class Trainer:
    """Student, teacher, loss, optimizer and schedules of one run."""

    def __init__(self, config: PretrainConfig, iters_per_epoch: int, device: str) -> None:
        self.config = config
        self.device = device
        self.iters_per_epoch = iters_per_epoch
        self.total_steps = config.epochs * iters_per_epoch
        torch.manual_seed(config.seed)
        self.student = build_network(config, student=True).to(device)
        self.teacher = make_teacher(self.student).to(device)
        self.teacher.eval()  # no drop-path in the teacher
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
        total_batch = config.batch_size * world_size()
        self.lr_schedule = cosine_schedule(
            config.lr * total_batch / 256.0, config.min_lr, config.epochs, iters_per_epoch,
            warmup_epochs=config.warmup_epochs,
        )
        self.wd_schedule = cosine_schedule(
            config.weight_decay, config.weight_decay_end, config.epochs, iters_per_epoch
        )
        self.momentum_schedule = cosine_schedule(
            config.momentum_teacher, 1.0, config.epochs, iters_per_epoch
        )
        self.step = 0

    def state(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
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
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.student.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.loss.load_state_dict(state["loss"])
        self.step = int(state["step"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(_as_python_rng_state(state["rng"]["python"]))
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])

    def train_step(self, batch: CropBatch) -> dict[str, float]:
        config, step = self.config, self.step
        epoch = step // self.iters_per_epoch
        # Plain floats: numpy scalars in param_groups would end up in the checkpoint, which
        # torch.load(weights_only=True) refuses to unpickle.
        for index, group in enumerate(self.optimizer.param_groups):
            group["lr"] = float(self.lr_schedule[step])
            if index == 0:
                group["weight_decay"] = float(self.wd_schedule[step])
        batch = batch.to(self.device, non_blocking=True)
        use_bf16 = self.device.startswith("cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
            with torch.no_grad():
                teacher_obj, teacher_patch = self.teacher(
                    batch.global_crops, batch.global_patch_masks
                )
            student_obj, student_patch = self.student(
                batch.global_crops, batch.global_patch_masks, mim_mask=batch.mim_masks
            )
            student_local_obj = None
            if batch.local_crops is not None:
                student_local_obj, _ = self.student(
                    batch.local_crops, batch.local_patch_masks, with_patches=False
                )
            terms = self.loss(
                student_obj, student_local_obj, student_patch, teacher_obj, teacher_patch,
                batch.mim_masks, epoch,
            )
        if not math.isfinite(terms.total.item()):
            raise NonFiniteLossError(
                f"loss is {terms.total.item()} at step {step + 1}; stopped, the last "
                "checkpoint on disk is intact"
            )
        self.optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        grad_norm = clip_gradients_per_parameter(self.student, config.clip_grad)
        cancel_last_layer_gradients(self.student, epoch, config.freeze_last_layer)
        self.optimizer.step()
        momentum = float(self.momentum_schedule[step])
        update_teacher(self.teacher, self.student, momentum)
        self.step += 1
        temp, _ = self.loss.teacher_temperatures(epoch)
        return {
            **terms.as_floats(),
            "teacher_entropy": terms.teacher_entropy,
            "lr": float(self.lr_schedule[step]),
            "wd": float(self.wd_schedule[step]),
            "momentum": momentum,
            "teacher_temp": temp,
            "grad_norm": grad_norm,
        }


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _as_python_rng_state(state: Any) -> tuple:
    # torch.load(weights_only=True) returns the tuple's inner tuple as a list.
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def pretrain(
    config: PretrainConfig,
    images_root: Path | str,
    store: MaskStore,
    out_dir: Path | str,
    resume: bool = False,
) -> Iterator[RunStarted | StepDone | CheckpointSaved | RunFinished]:
    """Run (or resume) pretraining, yielding events; writes into `out_dir`:
    config.json (resolved), checkpoint.pt (latest, atomic), metrics.jsonl, report.json."""
    out_dir, images_root = Path(out_dir), Path(images_root)
    checkpoint_path = out_dir / CHECKPOINT_NAME
    state = None
    if resume:
        # The method's settings come from the checkpoint; how to run (device, workers, when
        # to stop, how often to save) from this invocation.
        state = load_checkpoint(checkpoint_path)
        saved = PretrainConfig.from_dict(state["config"], source=str(checkpoint_path))
        config = dataclasses.replace(
            saved, **{name: getattr(config, name) for name in RUN_CONTROL_FIELDS}
        )
    config = config.resolved()
    device = resolve_device(config.device)
    out_dir.mkdir(parents=True, exist_ok=True)

    dataset = make_dataset(config, store, images_root)
    iters_per_epoch = len(dataset) // config.batch_size
    if iters_per_epoch < 1:
        raise ValueError(
            f"batch size {config.batch_size} is larger than the {len(dataset)} images in the store"
        )
    trainer = Trainer(config, iters_per_epoch, device)
    if state is not None:
        trainer.load_state(state)
    (out_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")

    total_steps = trainer.total_steps
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    yield RunStarted(config, total_steps, trainer.step, iters_per_epoch, len(dataset), device)

    sampler = EpochSampler(len(dataset), config.seed)
    counts = {"images_skipped": 0, "whole_image_fallbacks": 0, "crop_fallbacks": 0, "images": 0}
    started = time.perf_counter()
    start_step = trainer.step
    with open(out_dir / "metrics.jsonl", "a", encoding="utf-8") as metrics_file:
        while trainer.step < total_steps:
            epoch, offset = divmod(trainer.step, iters_per_epoch)
            dataset.set_epoch(epoch)
            sampler.set_position(epoch, offset * config.batch_size)
            loader = DataLoader(
                dataset,
                batch_size=config.batch_size,
                sampler=sampler,
                num_workers=config.workers,
                collate_fn=collate_crops,
                drop_last=True,
                pin_memory=device.startswith("cuda"),
                persistent_workers=False,
            )
            for batch in loader:
                counts["images_skipped"] += batch.n_skipped
                counts["whole_image_fallbacks"] += batch.n_whole_image_fallback
                counts["crop_fallbacks"] += batch.n_crop_failures
                if len(batch.indices) == 0:
                    trainer.step += 1  # every image of the batch was unreadable
                    continue
                counts["images"] += len(batch.indices)
                metrics = trainer.train_step(batch)
                metrics_file.write(json.dumps({"step": trainer.step, "epoch": epoch, **metrics}))
                metrics_file.write("\n")
                yield StepDone(trainer.step, total_steps, epoch, metrics)
                end_of_epoch = trainer.step % iters_per_epoch == 0
                periodic = config.save_every and trainer.step % config.save_every == 0
                if end_of_epoch or periodic or trainer.step == total_steps:
                    metrics_file.flush()
                    save_checkpoint(checkpoint_path, trainer.state())
                    yield CheckpointSaved(trainer.step, checkpoint_path)
                if trainer.step >= total_steps:
                    break

    elapsed = time.perf_counter() - started
    report = {
        **counts,
        "steps": trainer.step,
        "steps_this_run": trainer.step - start_step,
        "seconds": round(elapsed, 2),
        "images_per_second": round(counts["images"] / elapsed, 2) if elapsed > 0 else None,
        "device": device,
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    yield RunFinished(trainer.step, report)
