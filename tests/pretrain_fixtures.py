"""A tiny scene store and the `odis pretrain` options the pretraining tests share."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

# Depth 2, tiny head, 32 px crops of patch 8: a step takes milliseconds on a CPU core.
TINY_CONFIG = {
    "depth": 2,
    "head_hidden_dim": 32,
    "head_bottleneck_dim": 16,
    "min_patches_per_block": 2,
    "warmup_epochs": 1,
    # fp32 whatever the CPU: `auto` would pick bf16 on CPUs with bf16 units, and the exact
    # resume and DDP-equals-one-process checks compare fp32 arithmetic.
    "precision": "fp32",
}


def make_store(root: Path, n_images: int = 16) -> Path:
    from odis_core.masks.coco import import_coco
    from odis_core.scenes.synthetic import SceneConfig, generate_scenes

    splits = generate_scenes(
        root / "scenes", n_images, 1, seed=3, config=SceneConfig(image_size=32)
    )
    store = root / "masks"
    import_coco(splits["train"].annotations, store, images_root=splits["train"].images_dir)
    return store


def pretrain_args(store: Path, run: Path, config_file: Path, **options) -> list[str]:
    """`odis pretrain` arguments for a tiny CPU run; `options` override (--name value)."""
    if not config_file.exists():
        config_file.write_text(json.dumps(TINY_CONFIG))
    values = {
        "arch": "vit_tiny",
        "patch-size": 8,
        "global-size": 32,
        "local-size": 16,
        "n-local-crops": 2,
        "out-dim": 64,
        "batch-size": 4,
        "epochs": 4,
        "workers": 0,
        "device": "cpu",
        "seed": 5,
    }
    values.update({key.replace("_", "-"): value for key, value in options.items()})
    args = ["pretrain", "--masks", str(store), "--out", str(run), "--config", str(config_file)]
    for key, value in values.items():
        args += [f"--{key}"] if value is True else [f"--{key}", str(value)]
    return args


def load_run_state(run: Path) -> dict:
    return torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)


def assert_same_training_state(a: dict, b: dict, exact: bool = True, **tolerance) -> None:
    """Student, teacher, loss centres and optimizer moments of two checkpoints agree."""
    assert a["step"] == b["step"]
    pairs = [
        (f"{part}.{key}", a[part][key], b[part][key])
        for part in ("student", "teacher", "loss")
        for key in a[part]
    ]
    for index, (sa, sb) in enumerate(
        zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True)
    ):
        pairs += [(f"optimizer.{index}.{key}", sa[key], sb[key]) for key in sa]
    for name, x, y in pairs:
        if exact:
            assert torch.equal(x, y), name
        else:
            torch.testing.assert_close(x, y, msg=name, **tolerance)


@pytest.fixture
def one_thread():
    """One intra-op thread: on the shared 2-core test machine two threads contend with the
    other test processes (10x slower steps), and a fixed count keeps CPU runs repeatable."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
