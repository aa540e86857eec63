"""iBOT's objective applied to [OBJ] (spec §5, bookkeeping in §10).

L_obj: the teacher's centred, sharpened [OBJ] distribution on each global crop q is the
target for the student's [OBJ] distribution on every other crop v != q (the other global
crop and all local crops), averaged over all such (q, v) pairs.
L_mim: each global crop's masked student view against the same crop's unmasked teacher
view, at masked patches only: averaged over that image's masked patches (at least one),
then over the batch, then over the global crops.
The centres (one for [OBJ], one for patches) are updated after the loss with the batch
mean of the teacher outputs, all-reduced across ranks, with momentum 0.9.

Several objects per image (issue 19): each object of an image has its own [OBJ] output per
view, and its own L_obj terms, the same (q, v) pairs as above, counted only where the
object has patches in both views q and v. L_obj is the mean over all counted (object, q, v)
terms, which for one object per image is the mean above. The [OBJ] centre is the mean of
the teacher [OBJ] outputs of the objects present in their global view (every output, for
one object per image), so it tracks what the loss sharpens against. Under DDP each rank
averages its own counted terms and the gradient all-reduce averages the ranks: ranks that
count different numbers of terms weigh them slightly unlike one large batch would.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def teacher_temp_schedule(
    warmup_temp: float, final_temp: float, warmup_epochs: int, n_epochs: int
) -> np.ndarray:
    """(n_epochs,) teacher temperature: linear warm-up over `warmup_epochs`, then constant."""
    warmup_epochs = min(warmup_epochs, n_epochs)
    return np.concatenate(
        (
            np.linspace(warmup_temp, final_temp, warmup_epochs),
            np.full(n_epochs - warmup_epochs, final_temp),
        )
    )


@dataclass
class LossTerms:
    obj: torch.Tensor  # λ1·L_obj, scalar
    mim: torch.Tensor  # λ2·L_mim, scalar
    total: torch.Tensor
    # Mean entropy of the teacher's [OBJ] distribution (nats), a 0-d tensor: reading it with
    # the loss terms in one transfer (`as_floats`) keeps the step at one GPU sync.
    teacher_entropy: torch.Tensor | float = 0.0
    # How many (object, teacher view, student view) [OBJ] terms L_obj averages this step.
    object_pairs: torch.Tensor | float = 0.0

    def as_floats(self, extra: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
        """All terms, and any `extra` scalar tensors (e.g. a regulariser's), as Python
        floats, copied from the device in one transfer."""
        device = self.total.device
        entropy = torch.as_tensor(self.teacher_entropy, device=device)
        pairs = torch.as_tensor(self.object_pairs, device=device)
        extra = extra or {}
        values = torch.stack(
            [self.total.detach(), self.obj.detach(), self.mim.detach(), entropy.float(),
             pairs.float(), *(value.detach().float() for value in extra.values())]
        ).tolist()
        names = ("loss", "loss_obj", "loss_mim", "teacher_entropy", "object_pairs", *extra)
        return dict(zip(names, values, strict=True))


def object_pair_masks(
    view_objects: list[torch.Tensor], n_global: int
) -> list[tuple[int, int, torch.Tensor]]:
    """The [OBJ] terms of several objects per image: (q, v, (B, S) bool) for teacher global
    view q and student view v != q, True where the object is in both views.

    view_objects: per view (globals first), (B, S) bool, True where the object has patches."""
    return [
        (q, v, view_objects[q] & present)
        for q in range(n_global)
        for v, present in enumerate(view_objects)
        if v != q
    ]


class IBOTLoss(nn.Module):
    def __init__(
        self,
        out_dim: int,
        patch_out_dim: int,
        n_global_crops: int,
        n_local_crops: int,
        n_epochs: int,
        warmup_teacher_temp: float = 0.04,
        teacher_temp: float = 0.07,
        warmup_teacher_patch_temp: float = 0.04,
        teacher_patch_temp: float = 0.07,
        warmup_teacher_temp_epochs: int = 30,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        center_momentum_patch: float = 0.9,
        lambda_obj: float = 1.0,
        lambda_mim: float = 1.0,
    ) -> None:
        super().__init__()
        self.n_global_crops = n_global_crops
        self.n_local_crops = n_local_crops
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.center_momentum_patch = center_momentum_patch
        self.lambda_obj = lambda_obj
        self.lambda_mim = lambda_mim
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("center_patch", torch.zeros(1, 1, patch_out_dim))
        self.teacher_temps = teacher_temp_schedule(
            warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, n_epochs
        )
        self.teacher_patch_temps = teacher_temp_schedule(
            warmup_teacher_patch_temp, teacher_patch_temp, warmup_teacher_temp_epochs, n_epochs
        )

    def teacher_temperatures(self, epoch: int) -> tuple[float, float]:
        epoch = min(epoch, len(self.teacher_temps) - 1)
        return float(self.teacher_temps[epoch]), float(self.teacher_patch_temps[epoch])

    def forward(
        self,
        student_obj: torch.Tensor,
        student_local_obj: torch.Tensor | None,
        student_patch: torch.Tensor,
        teacher_obj: torch.Tensor,
        teacher_patch: torch.Tensor,
        student_mim_mask: torch.Tensor,
        epoch: int,
        global_objects: torch.Tensor | None = None,
        local_objects: torch.Tensor | None = None,
    ) -> LossTerms:
        """Loss terms of one step; updates the centres afterwards.

        student_obj: (G*B, K) student [OBJ] logits of the global crops, crop-major.
        student_local_obj: (L*B, K) student [OBJ] logits of the local crops, or None.
        student_patch: (G*B, N, K2) student patch logits of the masked global crops.
        teacher_obj: (G*B, K) teacher [OBJ] logits; teacher_patch: (G*B, N, K2).
        student_mim_mask: (G*B, N) bool, True at masked patches.
        Several objects per image: student_obj (G*B, S, K), student_local_obj (L*B, S, K),
        teacher_obj (G*B, S, K); global_objects (G*B, S) and local_objects (L*B, S) bool,
        True where the object has patches in that view (False: absent, or a padding slot).
        """
        if student_obj.ndim == 3:
            assert global_objects is not None
            return self._several_objects(
                student_obj, student_local_obj, student_patch, teacher_obj, teacher_patch,
                student_mim_mask, epoch, global_objects, local_objects,
            )
        temp, _ = self.teacher_temperatures(epoch)
        n_global = self.n_global_crops

        student_views = (
            [student_obj] if student_local_obj is None else [student_obj, student_local_obj]
        )
        student_obj_all = torch.cat(student_views).float() / self.student_temp
        student_obj_chunks = student_obj_all.chunk(n_global + self.n_local_crops)
        teacher_obj_probs = F.softmax((teacher_obj.float() - self.center) / temp, dim=-1)
        teacher_obj_chunks = teacher_obj_probs.detach().chunk(n_global)

        # iBOT's loop: view pairs q != v give the [OBJ] terms; q == v the MIM term
        # (`_mim_loss`, the same additions in the same order).
        loss_obj = student_obj.new_zeros((), dtype=torch.float32)
        n_obj_terms = 0
        for q, teacher_q in enumerate(teacher_obj_chunks):
            for v, student_v in enumerate(student_obj_chunks):
                if v != q:
                    per_image = torch.sum(-teacher_q * F.log_softmax(student_v, dim=-1), dim=-1)
                    loss_obj = loss_obj + per_image.mean()
                    n_obj_terms += 1
        loss_obj = loss_obj / max(n_obj_terms, 1) * self.lambda_obj
        loss_mim = self._mim_loss(student_patch, teacher_patch, student_mim_mask, epoch)
        # Collapse shows as this entropy pinned near ln(out_dim) (uniform) or near 0 (one-hot).
        entropy = -(teacher_obj_probs * teacher_obj_probs.clamp_min(1e-12).log()).sum(-1).mean()
        self.update_centers(teacher_obj, teacher_patch)
        return LossTerms(
            obj=loss_obj, mim=loss_mim, total=loss_obj + loss_mim, teacher_entropy=entropy.detach(),
            object_pairs=float(n_obj_terms * len(teacher_obj_chunks[0])),
        )

    def _several_objects(
        self,
        student_obj: torch.Tensor,
        student_local_obj: torch.Tensor | None,
        student_patch: torch.Tensor,
        teacher_obj: torch.Tensor,
        teacher_patch: torch.Tensor,
        student_mim_mask: torch.Tensor,
        epoch: int,
        global_objects: torch.Tensor,
        local_objects: torch.Tensor | None,
    ) -> LossTerms:
        """`forward` with S [OBJ] slots per image (see there and the module docstring)."""
        temp, _ = self.teacher_temperatures(epoch)
        n_global = self.n_global_crops
        student_views = (
            [student_obj] if student_local_obj is None else [student_obj, student_local_obj]
        )
        student_chunks = (torch.cat(student_views).float() / self.student_temp).chunk(
            n_global + self.n_local_crops
        )
        objects = global_objects if local_objects is None else torch.cat(
            [global_objects, local_objects]
        )
        view_objects = list(objects.chunk(n_global + self.n_local_crops))
        teacher_probs = F.softmax((teacher_obj.float() - self.center) / temp, dim=-1)
        teacher_chunks = teacher_probs.detach().chunk(n_global)

        loss_sum = student_obj.new_zeros((), dtype=torch.float32)
        n_pairs = student_obj.new_zeros((), dtype=torch.float32)
        for q, v, pair in object_pair_masks(view_objects, n_global):
            per_term = torch.sum(
                -teacher_chunks[q] * F.log_softmax(student_chunks[v], dim=-1), dim=-1
            )  # (B, S)
            loss_sum = loss_sum + torch.where(pair, per_term, 0.0).sum()
            n_pairs = n_pairs + pair.sum()
        loss_obj = loss_sum / n_pairs.clamp(min=1.0) * self.lambda_obj
        loss_mim = self._mim_loss(student_patch, teacher_patch, student_mim_mask, epoch)
        present = global_objects.float()
        per_entry = -(teacher_probs * teacher_probs.clamp_min(1e-12).log()).sum(-1)
        entropy = (per_entry * present).sum() / present.sum().clamp(min=1.0)
        self.update_centers(teacher_obj, teacher_patch, global_objects)
        return LossTerms(
            obj=loss_obj, mim=loss_mim, total=loss_obj + loss_mim,
            teacher_entropy=entropy.detach(), object_pairs=n_pairs.detach(),
        )

    def _mim_loss(
        self,
        student_patch: torch.Tensor,
        teacher_patch: torch.Tensor,
        student_mim_mask: torch.Tensor,
        epoch: int,
    ) -> torch.Tensor:
        """λ2·L_mim: per global view, the masked patches' cross-entropy averaged over each
        image's masked patches, then over the batch, then over the global views."""
        _, temp_patch = self.teacher_temperatures(epoch)
        n_global = self.n_global_crops
        student_chunks = (student_patch.float() / self.student_temp).chunk(n_global)
        mim_mask_chunks = student_mim_mask.flatten(1).float().chunk(n_global)
        teacher_probs = F.softmax((teacher_patch.float() - self.center_patch) / temp_patch, dim=-1)
        teacher_chunks = teacher_probs.detach().chunk(n_global)
        loss_mim = student_patch.new_zeros((), dtype=torch.float32)
        for q in range(n_global):
            per_patch = torch.sum(
                -teacher_chunks[q] * F.log_softmax(student_chunks[q], dim=-1), dim=-1
            )
            mask = mim_mask_chunks[q]
            per_image = (per_patch * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
            loss_mim = loss_mim + per_image.mean()
        return loss_mim / n_global * self.lambda_mim

    @torch.no_grad()
    def update_centers(
        self,
        teacher_obj: torch.Tensor,
        teacher_patch: torch.Tensor,
        global_objects: torch.Tensor | None = None,
    ) -> None:
        """EMA of the batch mean of the teacher outputs, averaged over all ranks.

        Several objects per image (teacher_obj (G*B, S, K), global_objects (G*B, S) bool):
        the [OBJ] mean is over the objects present in their view; the patch mean stays
        over the G*B crops."""
        patch_sum = teacher_patch.float().mean(dim=1).sum(dim=0, keepdim=True)
        count = torch.tensor(float(len(teacher_patch)), device=patch_sum.device)
        if global_objects is None:
            obj_sum = teacher_obj.float().sum(dim=0, keepdim=True)
            obj_count = count
        else:
            present = global_objects.float().unsqueeze(-1)
            obj_sum = (teacher_obj.float() * present).sum(dim=(0, 1)).unsqueeze(0)
            obj_count = present.sum()
        if dist.is_available() and dist.is_initialized():
            reduced = (obj_sum, patch_sum, count) if global_objects is None else (
                obj_sum, patch_sum, count, obj_count)
            for tensor in reduced:
                dist.all_reduce(tensor)
        self.center.mul_(self.center_momentum).add_(
            obj_sum / obj_count, alpha=1 - self.center_momentum
        )
        self.center_patch.mul_(self.center_momentum_patch).add_(
            patch_sum.unsqueeze(1) / count, alpha=1 - self.center_momentum_patch
        )
