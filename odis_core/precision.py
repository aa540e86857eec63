"""Autocast precision of training and inference: "bf16" or "fp32", and what "auto" means.

bf16 autocast pays off where the hardware multiplies bf16 matrices natively: every CUDA GPU
odis targets, and CPUs with AMX or AVX-512 BF16 units (measured in docs/benchmarks.md); on
other CPUs bf16 is emulated and slower, so "auto" keeps fp32 there. Losses, centres and
softmaxes stay in fp32 either way (the loss casts its inputs up).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

PRECISIONS = ("auto", "bf16", "fp32")
# /proc/cpuinfo flags of bf16 matrix units: Intel AMX, AVX-512 BF16 (Intel and AMD).
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
CPUINFO = Path("/proc/cpuinfo")


def cpu_has_bf16_matmul(cpuinfo: Path = CPUINFO) -> bool:
    """True when the CPU advertises AMX or AVX-512 BF16 (Linux /proc/cpuinfo flags); False
    where that cannot be read (other systems: fp32, the safe choice)."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            return any(flag in flags for flag in BF16_CPU_FLAGS)
    return False


def resolve_precision(precision: str, device: str) -> str:
    """"bf16" or "fp32" for `device` ("cpu", "cuda", "cuda:1"); "auto": bf16 on CUDA and on
    CPUs with bf16 matrix units, fp32 otherwise."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision != "auto":
        return precision
    if device.startswith("cuda") or cpu_has_bf16_matmul():
        return "bf16"
    return "fp32"


def autocast(device: str, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on `device` for a resolved "bf16"; a no-op context for "fp32"."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision != "bf16":
        raise ValueError(f"precision must be resolved to bf16 or fp32, not {precision!r}")
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    return torch.autocast(device_type, dtype=torch.bfloat16)
