"""One process or many: the torchrun environment, DDP wrapping and rank-aware helpers.

`odis pretrain` started by `torchrun --nnodes N --nproc-per-node G` finds RANK, WORLD_SIZE
and LOCAL_RANK in its environment and joins the process group (NCCL on GPUs, gloo on CPU);
started plainly it is one process and needs no launcher (spec §11).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main_process() -> bool:
    return rank() == 0


def init_from_environment(device: str) -> str:
    """Join the torchrun process group if there is one; return the device this rank uses
    ("cuda:LOCAL_RANK" on GPUs). A single process returns `device` unchanged."""
    if not launched_by_torchrun() or is_initialized():
        return _local_device(device)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    device = _local_device(device)
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(backend=backend)
    return device


def _local_device(device: str) -> str:
    if device == "cuda" and launched_by_torchrun():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def shutdown() -> None:
    if is_initialized():
        dist.destroy_process_group()


def all_true(flag: bool, device: str) -> bool:
    """True when `flag` holds on every rank (a NaN on one rank stops all of them together
    instead of leaving the others waiting in the gradient all-reduce)."""
    if not is_initialized():
        return flag
    tensor = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return bool(tensor.item())


def gather_objects(value: Any) -> list[Any]:
    """`value` of every rank, in rank order (on every rank)."""
    if not is_initialized():
        return [value]
    values: list[Any] = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def wrap_ddp(module: nn.Module, device: str) -> nn.Module:
    """DDP around `module` when there are several ranks (it broadcasts rank 0's weights, so
    every rank starts identical), `module` itself otherwise."""
    if not is_initialized():
        return module
    device_ids = [torch.device(device).index] if device.startswith("cuda") else None
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids)
