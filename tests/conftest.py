"""Shared fixtures."""

from functools import partial
from pathlib import Path

import pytest
import torch

# --- a tiny, randomly initialised SAM (real weights cannot be downloaded in tests) ---------

TINY_SAM_IMAGE_SIZE = 64  # SAM resizes the longest image side to this
TINY_SAM_SEED = 1
# Random output hypernetworks give mask logits near zero: every mask empty and every
# stability score 0. Scaling their last layer spreads the logits, so masks have pixels and
# differing scores, like a trained SAM's.
TINY_SAM_LOGIT_SCALE = 300.0


def build_tiny_sam(embed_dim: int = 32):
    """A SAM with segment-anything's own modules at toy size: 64 px input, patch 16 (a 4x4
    embedding), one encoder block, one two-way transformer block."""
    from segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    grid = TINY_SAM_IMAGE_SIZE // 16
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=TINY_SAM_IMAGE_SIZE, patch_size=16, embed_dim=embed_dim, depth=1,
            num_heads=2, mlp_ratio=2.0, out_chans=32, qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=32, image_embedding_size=(grid, grid),
            input_image_size=(TINY_SAM_IMAGE_SIZE, TINY_SAM_IMAGE_SIZE), mask_in_chans=4,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=1, embedding_dim=32, mlp_dim=32, num_heads=2),
            transformer_dim=32, iou_head_depth=2, iou_head_hidden_dim=16,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    ).eval()


def save_tiny_sam(path: Path, embed_dim: int = 32, seed: int = TINY_SAM_SEED) -> Path:
    """Save the state_dict of a seeded tiny SAM to `path` (global RNG state untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sam = build_tiny_sam(embed_dim)
    with torch.no_grad():
        for mlp in sam.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(TINY_SAM_LOGIT_SCALE)
    torch.save(sam.state_dict(), path)
    return path


def _build_tiny_sam_vit_b(checkpoint=None):
    # Mirrors segment_anything.build_sam: build the architecture, then load the file
    # strictly, so a checkpoint of another shape fails the way a real one would.
    sam = build_tiny_sam()
    if checkpoint is not None:
        with open(checkpoint, "rb") as handle:
            sam.load_state_dict(torch.load(handle, weights_only=True))
    return sam


@pytest.fixture
def tiny_sam_checkpoint(tmp_path, monkeypatch) -> Path:
    """Path of a tiny SAM checkpoint that `sam_model_registry["vit_b"]` builds and loads
    for the duration of the test, so `load_sam("vit_b", path)` runs its real code path."""
    from segment_anything import sam_model_registry

    monkeypatch.setitem(sam_model_registry, "vit_b", _build_tiny_sam_vit_b)
    return save_tiny_sam(tmp_path / "tiny_sam_vit_b.pth")


# --- the bad-input corpus (tests/bad_inputs.py), for any command's tests ------------------


@pytest.fixture(scope="session")
def _bomb_png(tmp_path_factory):
    from bad_inputs import write_bomb_png

    return write_bomb_png(tmp_path_factory.mktemp("bomb") / "bomb.png")


@pytest.fixture
def bad_image_corpus(tmp_path, _bomb_png):
    """An ImageCorpus under tmp_path/corpus: odd images that load, broken ones that don't."""
    from bad_inputs import write_image_corpus

    return write_image_corpus(tmp_path / "corpus", bomb=_bomb_png)

# --- tiny Fashion-MNIST-format IDX files (tests never need the real dataset) ---------------


def write_idx(path: Path, array, compress: bool) -> Path:
    """Write `array` (uint8) as an IDX file: magic 0x0000 0x08 ndim, big-endian dims, data."""
    import gzip
    import struct

    import numpy as np

    array = np.ascontiguousarray(array, dtype=np.uint8)
    raw = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw += array.tobytes()
    path.write_bytes(gzip.compress(raw, mtime=0) if compress else raw)
    return path


def fashion_items(n: int, shape: str, labels, seed: int):
    """(n, 28, 28) uint8 light items on black, one random tone each: filled squares or
    rings, so which split an item came from can be told from its silhouette alone (a
    square's centre is in it, a ring's is not)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:28, 0:28] + 0.5
    items = np.zeros((n, 28, 28), dtype=np.uint8)
    for i in range(n):
        half = rng.uniform(8, 12)
        if shape == "square":
            inside = (np.abs(xs - 14) < half) & (np.abs(ys - 14) < half)
        else:
            inside = (np.hypot(xs - 14, ys - 14) < half) & (np.hypot(xs - 14, ys - 14) > 5)
        items[i][inside] = rng.integers(120, 256)
    return items, np.asarray(labels, dtype=np.uint8)


def write_fashion_idx_dir(directory: Path, n_train: int = 40, n_test: int = 20,
                          train_labels=None, test_labels=None) -> Path:
    """A Fashion-MNIST-like source: train items are squares (IDX gzipped, the dataset's own
    names), test items are rings (IDX uncompressed, the `.idx3-ubyte` spelling)."""
    directory.mkdir(parents=True, exist_ok=True)
    train_labels = [i % 10 for i in range(n_train)] if train_labels is None else train_labels
    test_labels = [i % 10 for i in range(n_test)] if test_labels is None else test_labels
    train_images, train_labels = fashion_items(n_train, "square", train_labels, seed=1)
    test_images, test_labels = fashion_items(n_test, "ring", test_labels, seed=2)
    write_idx(directory / "train-images-idx3-ubyte.gz", train_images, compress=True)
    write_idx(directory / "train-labels-idx1-ubyte.gz", train_labels, compress=True)
    write_idx(directory / "t10k-images.idx3-ubyte", test_images, compress=False)
    write_idx(directory / "t10k-labels.idx1-ubyte", test_labels, compress=False)
    return directory


@pytest.fixture
def fashion_idx_dir(tmp_path) -> Path:
    return write_fashion_idx_dir(tmp_path / "fashion-mnist")


@pytest.fixture
def make_fashion_idx_dir(tmp_path):
    """`make(name, **kwargs)`: write_fashion_idx_dir under tmp_path/name."""
    return lambda name, **kwargs: write_fashion_idx_dir(tmp_path / name, **kwargs)
