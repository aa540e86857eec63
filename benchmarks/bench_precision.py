"""bf16 autocast vs fp32: `Trainer.train_step` time for the same model, side by side.

    python benchmarks/bench_precision.py                  # the demo's model and ViT-S/16
    python benchmarks/bench_precision.py --quick          # tiny, seconds (the test's)

One process, one device, random tensors of iBOT's multi-crop shapes. Both precisions of a
model are built once and timed in alternating rounds (median per precision), so a slow
spell on a shared machine hits both alike; only the ratio fp32 time / bf16 time means
anything there. Models:
- the demo's (`odis demo`): 4-block ViT-Ti/8, 64-px global and 4 x 32-px local crops,
  1024-d head, batch 64 (the demo's own batch is 32; 64 as in issue 14's measurement);
- ViT-S/16: 2 x 224-px global and 10 x 96-px local crops, the 8192-d head, a small batch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from odis_core.crops.dataset import CropBatch
from odis_core.demo import DemoSettings
from odis_core.precision import cpu_has_bf16_matmul, resolve_precision
from odis_core.train.config import PretrainConfig
from odis_core.train.loop import Trainer

console = Console(width=None if sys.stdout.isatty() else 130)


def random_batch(config: PretrainConfig, seed: int = 0) -> CropBatch:
    """A CropBatch of the config's crop shapes with random object and MIM masks."""
    g = torch.Generator().manual_seed(seed)
    b, n_local = config.batch_size, config.n_local_crops
    n_g = (config.global_size // config.patch_size) ** 2
    n_l = (config.local_size // config.patch_size) ** 2

    def object_masks(rows: int, n: int) -> torch.Tensor:
        masks = torch.rand(rows, n, generator=g) > 0.5
        masks[:, 0] = True  # never empty
        return masks

    return CropBatch(
        global_crops=torch.randn(2 * b, 3, config.global_size, config.global_size, generator=g),
        local_crops=torch.randn(n_local * b, 3, config.local_size, config.local_size, generator=g),
        global_patch_masks=object_masks(2 * b, n_g),
        local_patch_masks=object_masks(n_local * b, n_l),
        mim_masks=torch.rand(2 * b, n_g, generator=g) > 0.7,
        indices=torch.arange(b),
        n_skipped=0,
        n_whole_image_fallback=0,
        n_crop_failures=0,
    )


def models(quick: bool, vit_s_batch: int) -> dict[str, PretrainConfig]:
    demo = dataclasses.replace(DemoSettings().pretrain, batch_size=64)
    vit_s = PretrainConfig(arch="vit_small", batch_size=vit_s_batch)
    if quick:
        demo = dataclasses.replace(demo, depth=1, batch_size=4, n_local_crops=1)
        vit_s = dataclasses.replace(vit_s, depth=1, batch_size=1, global_size=64,
                                    local_size=32, n_local_crops=1, out_dim=256)
        return {"demo model (quick)": demo, "ViT-S/16 (quick)": vit_s}
    return {
        "demo: ViT-Ti/8, 4 blocks, 64 px, batch 64": demo,
        f"ViT-S/16, 224 px + 10 x 96 px, batch {vit_s_batch}": vit_s,
    }


def timed_steps(trainer: Trainer, batch: CropBatch, steps: int) -> float:
    """Mean seconds per step over `steps` steps (CPU: synchronous)."""
    started = time.perf_counter()
    for _ in range(steps):
        metrics = trainer.train_step(batch)
        if not torch.isfinite(torch.tensor(metrics["loss"])):
            raise RuntimeError(f"non-finite loss {metrics['loss']} ({trainer.precision})")
    return (time.perf_counter() - started) / max(steps, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models (the test's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; median")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per precision")
    parser.add_argument("--vit-s-batch", type=int, default=8)
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    figures: dict[str, dict] = {}
    for name, config in models(args.quick, args.vit_s_batch).items():
        batch = random_batch(config)
        trainers = {}
        for precision in ("fp32", "bf16"):
            run = dataclasses.replace(config, precision=precision, device=args.device)
            trainers[precision] = Trainer(run.resolved(), iters_per_epoch=10_000,
                                          device=args.device)
            timed_steps(trainers[precision], batch, args.warmup)
        seconds: dict[str, list[float]] = {"fp32": [], "bf16": []}
        for _ in range(args.rounds):
            for precision, trainer in trainers.items():
                seconds[precision].append(timed_steps(trainer, batch, args.steps))
        medians = {p: statistics.median(values) for p, values in seconds.items()}
        figures[name] = {
            "fp32_s": medians["fp32"],
            "bf16_s": medians["bf16"],
            "speedup": medians["fp32"] / medians["bf16"],
            "rounds": seconds,
        }
        del trainers
        console.print(f"{name}: fp32 / bf16 = {figures[name]['speedup']:.2f}x", highlight=False)
    table = Table(title=f"bf16 autocast vs fp32, train_step, {args.device}, "
                  f"{args.threads} thread(s), median of {args.rounds} alternating rounds")
    for column in ("model", "fp32 / bf16 step time"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, row in figures.items():
        table.add_row(name, f"{row['speedup']:.2f}x")
    console.print(table)
    bf16_units = cpu_has_bf16_matmul()
    console.print(
        f"CPU bf16 matrix units (amx_bf16 / avx512_bf16): {bf16_units}; --precision auto "
        f"resolves to {resolve_precision('auto', args.device)} here. Ratios only: absolute "
        "times on a shared machine mean nothing.",
        highlight=False,
    )
    if args.json:
        args.json.write_text(json.dumps({"device": args.device, "threads": args.threads,
                                         "cpu_bf16_units": bf16_units,
                                         "models": figures}, indent=2) + "\n")


if __name__ == "__main__":
    main()
