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
