"""The EMA teacher: teacher <- m * teacher + (1 - m) * student, never trained by gradients.

Parameters are paired by name, as iBOT's teacher (built without masked modelling) pairs
with its student. The MIM mask token is the student's alone: the teacher always sees
unmasked crops, so its copy (kept so the two networks share one structure and checkpoint
layout) is never averaged and stays at its initial value. Parameters the student does not
train either (fixed sin-cos positions) are left as they were copied.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def make_teacher(student: nn.Module) -> nn.Module:
    """A frozen copy of `student`: no parameter requires grad."""
    teacher = copy.deepcopy(student)
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher


STUDENT_ONLY = ("mask_token",)  # leaf names the EMA leaves alone


def averaged_pairs(
    teacher: nn.Module, student: nn.Module
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The teacher's averaged parameters and the student's of the same names, in order."""
    student_params = dict(student.named_parameters())
    teacher_params, sources = [], []
    for name, parameter in teacher.named_parameters():
        if name.rsplit(".", 1)[-1] in STUDENT_ONLY:
            continue
        source = student_params.get(name)
        if source is None or source.shape != parameter.shape:
            raise ValueError(f"teacher parameter {name} has no student parameter of its shape")
        if not source.requires_grad:
            # Fixed in the student too (sin-cos positions, a normalised head's gain): the
            # copy is already equal, and averaging it would only add rounding.
            continue
        teacher_params.append(parameter)
        sources.append(source.detach())
    return teacher_params, sources


@torch.no_grad()
def update_teacher(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """In place, over parameter lists with torch._foreach ops (one kernel per list, not per
    tensor: the EMA runs every step on every parameter)."""
    teacher_params, student_params = averaged_pairs(teacher, student)
    torch._foreach_mul_(teacher_params, momentum)
    torch._foreach_add_(teacher_params, student_params, alpha=1.0 - momentum)
