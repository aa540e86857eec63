"""Supervised ceiling on the Fashion-MNIST scenes: the recipe's network trained *with labels*.

Self-distillation has to discover the classes; this script tells the network what they
are. The recipe's backbone (same architecture, input size, position embedding and
initial weights) gets a linear classifier on its masked [OBJ] token, and both train with
cross-entropy on the pretraining objects (the whole scene in, the object's patch mask on
[OBJ], horizontal flips, AdamW, batch 32, the recipe's precision). At each milestone the
backbone alone is evaluated exactly as the sweep evaluates a pretrained teacher: masked
k-NN top-1 (k = 20) on the same bank and queries. So it answers: how much of the class
can a network of this size read out after S steps *at best* — a bound on what any
self-supervised recipe can show at the same step count.

    python examples/supervised_ceiling.py --workdir runs/small_data \
        --config configs/small-data.json --milestones 0,100,200,400,800

It writes WORKDIR/supervised_ceiling.json: the settings and, per milestone, top-1, the
mean training loss of the last 50 steps and the CPU seconds of training so far.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

# Run as a script, this folder is on sys.path: the sweep's data, recipe and evaluation are
# imported, not copied.
import small_data_sweep as sweep
import torch
import torch.nn.functional as F

from odis_core.atomic import atomic_write
from odis_core.embed.inference import object_batches
from odis_core.precision import autocast, resolve_precision
from odis_core.train.loop import build_backbone_for


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--config", type=Path, required=True, help="the recipe (its network)")
    parser.add_argument("--milestones", default="0,100,200,400,800")
    parser.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, help="default: WORKDIR/supervised_ceiling.json")
    known, rest = parser.parse_known_args(argv)
    # Data options (--source, --tiny, scene counts) are the sweep's own.
    known.sweep = sweep.parse_args(["--workdir", str(known.workdir), "--config",
                                    str(known.config), *rest])
    return known


def training_objects(images: Path, store: Any, size: int, patch: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every object of `store`: scene pixels (M, 3, H, W), each object's scene row, its
    patch mask and its class index (categories numbered in order of appearance)."""
    scenes, owners, masks, labels = [], [], [], []
    classes: dict[int, int] = {}
    seen = 0
    for batch in object_batches(images, list(store.images), store, size, patch):
        if batch["images"] is None:
            continue
        scenes.append(batch["images"])
        owners.append(batch["owner"] + seen)
        seen += len(batch["images"])
        masks.append(batch["masks"])
        labels += [classes.setdefault(row["category_id"], len(classes)) for row in batch["rows"]]
    return torch.cat(scenes), torch.cat(owners), torch.cat(masks), torch.tensor(labels)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.sweep.threads)
    images, stores = sweep.build_data(args.sweep)
    config = sweep.arm_config(args.sweep, json.loads(args.config.read_text()), str(args.config))
    milestones = sorted({int(m) for m in args.milestones.split(",")})
    torch.manual_seed(config.seed)  # the same initial weights as the recipe's step 0
    backbone = build_backbone_for(config, drop_path_rate=0.0)
    scenes, owners, masks, labels = training_objects(
        images["train"], stores["train"], config.global_size, config.patch_size)
    classifier = torch.nn.Linear(backbone.embed_dim, int(labels.max()) + 1)
    trained = [p for p in [*backbone.parameters(), *classifier.parameters()] if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=args.lr, weight_decay=0.05)
    generator = torch.Generator().manual_seed(config.seed)
    grid = config.global_size // config.patch_size
    precision = resolve_precision(config.precision, "cpu")
    out = args.out or args.workdir / "supervised_ceiling.json"
    record: dict[str, Any] = {"config": str(args.config), "lr": args.lr, "precision": precision,
                              "batch_size": args.batch_size, "n_objects": len(labels),
                              "curve": []}
    losses: list[float] = []
    cpu = 0.0
    for step in range(milestones[-1] + 1):
        if step in milestones:
            backbone.eval()
            point = sweep.evaluate(backbone, config.global_size, images, stores)
            backbone.train()
            point.update(step=step, cpu_s=round(cpu, 3),
                         loss=round(sum(losses[-50:]) / len(losses[-50:]), 4) if losses else None)
            record["curve"].append(point)
            with atomic_write(out, "w", encoding="utf-8") as handle:
                handle.write(json.dumps(record, indent=1) + "\n")
            print(f"step {step}: top1 {point['top1']:.1f} loss {point['loss']} "
                  f"cpu {point['cpu_s']} s", flush=True)
        if step == milestones[-1]:
            break
        started = time.process_time()
        chosen = torch.randint(0, len(labels), (args.batch_size,), generator=generator)
        pixels, patch_masks = scenes[owners[chosen]], masks[chosen]
        if torch.rand((), generator=generator) < 0.5:  # flip the scenes and their masks
            pixels = pixels.flip(-1)
            patch_masks = patch_masks.view(-1, grid, grid).flip(-1).reshape(len(chosen), -1)
        with autocast("cpu", precision):
            obj = backbone(pixels, obj_patch_mask=patch_masks)[:, 0]
        loss = F.cross_entropy(classifier(obj.float()), labels[chosen])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        cpu += time.process_time() - started


if __name__ == "__main__":
    main()
