"""Will one training step fit? An estimate before the first step (issue 15).

The default `odis pretrain` (ViT-S/16, 224 px, 10 local crops, batch 64) on a 24 GiB CPU
machine used to be killed by the kernel's out-of-memory killer after a minute and a half,
with nothing from odis. Now the step's peak is estimated from the configuration and the
run refuses, in one line naming a batch size that fits, when it exceeds the memory
available (CPU: MemAvailable, shared by the processes on this node; GPU: free device memory).

The estimate: fixed = weights x 6 (student, its gradient, AdamW's two moments, teacher, one
spare copy) + a runtime allowance; per image = a constant x depth x (embed_dim x tokens
+ heads x sum of squared crop lengths) bytes: the saved activations grow with tokens x
width and the attention maps with the square of each crop's length. The constant is fitted
to the CPU figures measured for the default run (float32: batch 8 4.3 GB, batch 16 7.0 GB,
issue 15), so it is an upper bound where bench_memory.py measured less (ViT-L/16: 1.07 GiB
per image measured, 1.7 GiB estimated). bf16 on a GPU halves the activations; gradient
checkpointing keeps about a third of them (bench_memory.py, ViT-L/16: 0.376 / 1.066).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from odis_core.train.config import PretrainConfig

# bytes per (block x activation unit), fitted to the default run's measured 0.3375 GB/image
BYTES_PER_UNIT = 32.9
RUNTIME_BYTES = 1.0 * 2**30  # torch, the loader workers and the batch in flight
GRAD_CHECKPOINTING_SHARE = 0.35
HEADROOM = 0.9  # plan for 90% of what is available


class MemoryEstimateError(ValueError):
    """The step will not fit; the message names a batch size that does."""


@dataclass(frozen=True)
class StepMemory:
    fixed: float  # bytes whatever the batch
    per_image: float  # bytes per image of the batch

    def at(self, batch_size: int) -> float:
        return self.fixed + self.per_image * batch_size


def _backbone_shape(config: PretrainConfig) -> tuple[int, int, int, int]:
    """(depth, embed_dim, heads, backbone parameters), from a model built on the meta
    device (no memory, no weights)."""
    import timm

    from odis_core.model.obj_vit import resolve_arch

    kwargs = {"num_classes": 0, "img_size": config.global_size, "patch_size": config.patch_size}
    if config.depth is not None:
        kwargs["depth"] = config.depth
    with torch.device("meta"):
        vit = timm.create_model(resolve_arch(config.arch), pretrained=False, **kwargs)
    depth = len(vit.blocks)
    heads = vit.blocks[0].attn.num_heads
    return depth, vit.embed_dim, heads, sum(p.numel() for p in vit.parameters())


def estimate_step_memory(config: PretrainConfig, device: str = "cpu") -> StepMemory:
    depth, dim, heads, backbone_params = _backbone_shape(config)
    hidden, bottleneck = config.head_hidden_dim, config.head_bottleneck_dim
    head_params = (
        dim * hidden + hidden * hidden * max(0, config.head_layers - 2)
        + hidden * bottleneck + bottleneck * config.out_dim
    )
    fixed = (backbone_params + head_params) * 4 * 6 + RUNTIME_BYTES
    # + [CLS] and [OBJ] in every crop, + the other objects' [OBJ] tokens (objects_per_image
    # K > 1; with 0, "every object", their number is the data's and is not counted here)
    other_objects = max(config.objects_per_image - 1, 0)
    global_len = (config.global_size // config.patch_size) ** 2 + 2 + other_objects
    local_len = (config.local_size // config.patch_size) ** 2 + 2 + other_objects
    tokens = config.n_global_crops * global_len + config.n_local_crops * local_len
    squares = config.n_global_crops * global_len**2 + config.n_local_crops * local_len**2
    per_image = BYTES_PER_UNIT * depth * (dim * tokens + heads * squares)
    if config.grad_checkpointing:
        per_image *= GRAD_CHECKPOINTING_SHARE
    if device.startswith("cuda"):
        per_image *= 0.5  # bf16 autocast
        fixed -= RUNTIME_BYTES  # the runtime lives in host memory
    return StepMemory(fixed, per_image)


def available_bytes(device: str) -> float:
    """Free device memory on a GPU; on the CPU MemAvailable (Linux) shared among the
    processes of this node (torchrun's LOCAL_WORLD_SIZE)."""
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return float(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    total = float(line.split()[1]) * 1024
                    return total / max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except OSError:
        pass
    return float("inf")  # unknown: do not refuse


def check_step_fits(config: PretrainConfig, device: str) -> StepMemory:
    """Raise MemoryEstimateError, naming the largest batch size that fits, when one step
    at `config.batch_size` is estimated to need more than the memory available."""
    estimate = estimate_step_memory(config, device)
    budget = available_bytes(device) * HEADROOM
    needed = estimate.at(config.batch_size)
    if needed <= budget:
        return estimate
    fits = int((budget - estimate.fixed) // estimate.per_image)
    where = "free on " + device if device.startswith("cuda") else "available RAM"
    gib = 2**30
    advice = (
        f"--batch-size {min(fits, config.batch_size - 1)} fits"
        if fits >= 1
        else "not even batch 1 fits: try --grad-checkpointing or a smaller --arch"
    )
    raise MemoryEstimateError(
        f"--batch-size {config.batch_size}: one step needs about {needed / gib:.1f} GiB "
        f"({config.arch}, {config.global_size} px, {config.n_local_crops} local crops), "
        f"{budget / HEADROOM / gib:.1f} GiB {where}; {advice} "
        "(--no-memory-check to try anyway)"
    )
