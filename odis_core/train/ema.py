"""The EMA teacher: teacher <- m * teacher + (1 - m) * student, never trained by gradients.

Only parameters the teacher has are averaged (the student's MIM mask token has no use in
the teacher, which always sees unmasked crops, but it exists there too and is averaged
like the rest so the two stay structurally identical).
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


@torch.no_grad()
def update_teacher(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """In place, over parameter lists with torch._foreach ops (one kernel per list, not per
    tensor: the EMA runs every step on every parameter)."""
    teacher_params = [p for p in teacher.parameters()]
    student_params = [p.detach() for p in student.parameters()]
    if len(teacher_params) != len(student_params):
        raise ValueError("teacher and student have different parameter lists")
    torch._foreach_mul_(teacher_params, momentum)
    torch._foreach_add_(teacher_params, student_params, alpha=1.0 - momentum)
