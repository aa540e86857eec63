"""SAM's automatic mask generator over a batch of images: one image-encoder pass per batch.

The plain generator (`SamAutomaticMaskGenerator.generate`) encodes one image at a time,
and the ViT image encoder is most of SAM's cost on a GPU; its batch of one leaves the GPU
mostly idle. Here the encoder runs on a batch of images (bf16 autocast on CUDA, where the
embedding's precision does not decide a threshold), then each image's point prompts go
through segment-anything's own decoding, filtering and NMS unchanged, reading the
precomputed embedding instead of encoding again. On CPU in fp32 the masks equal the
plain generator's (tests/test_masks_sam_batch.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from segment_anything import SamAutomaticMaskGenerator, SamPredictor
from segment_anything.modeling import Sam

# Prompts decoded per forward on CUDA when the user leaves points_per_batch to SAM (64):
# the decoder is small, so larger batches only cut launch overhead. Results do not depend
# on it (each prompt's masks are filtered on their own; the order is kept).
CUDA_POINTS_PER_BATCH = 256


class _PrecomputedPredictor(SamPredictor):
    """A SamPredictor whose next `set_image` takes an embedding computed beforehand, when
    one is waiting for an image of that size; any other call encodes as usual."""

    def __init__(self, sam_model: Sam) -> None:
        super().__init__(sam_model)
        self.waiting: tuple[tuple[int, int], tuple[int, int], torch.Tensor] | None = None

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        if self.waiting is not None and self.waiting[0] == tuple(image.shape[:2]):
            original_size, input_size, features = self.waiting
            self.waiting = None
            self.reset_image()
            self.original_size, self.input_size = original_size, input_size
            self.features = features
            self.is_image_set = True
            return
        super().set_image(image, image_format)


class BatchedMaskGenerator(SamAutomaticMaskGenerator):
    """`SamAutomaticMaskGenerator` (same settings, same records) with `generate_batch`."""

    def __init__(self, model: Sam, bf16: bool = False, **generator_kwargs: Any) -> None:
        super().__init__(model, **generator_kwargs)
        self.predictor = _PrecomputedPredictor(model)
        self.bf16 = bf16 and model.device.type == "cuda"

    @torch.no_grad()
    def encode(self, images: Sequence[np.ndarray]) -> list[tuple[tuple, tuple, torch.Tensor]]:
        """(original (H, W), resized (h, w), (1, C, h', w') embedding) per image, from one
        encoder pass over the batch (each image resized and padded as SamPredictor does)."""
        model, transform = self.predictor.model, self.predictor.transform
        inputs, sizes = [], []
        for image in images:
            if model.image_format != "RGB":
                image = image[..., ::-1]
            resized = torch.as_tensor(transform.apply_image(image), device=model.device)
            resized = resized.permute(2, 0, 1).contiguous()[None]
            sizes.append((tuple(image.shape[:2]), tuple(resized.shape[-2:])))
            inputs.append(model.preprocess(resized))
        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        )
        with autocast:
            features = model.image_encoder(torch.cat(inputs))
        # The decoder runs in fp32: mask logits are thresholded at 0, and stability scores
        # compare two offsets of them.
        features = features.float()
        return [(o, r, features[i : i + 1]) for i, (o, r) in enumerate(sizes)]

    @torch.no_grad()
    def generate_batch(self, images: Sequence[np.ndarray]) -> list[list[dict[str, Any]]]:
        """`generate(image)` for each image (HWC uint8 RGB), the encoder run once for all."""
        if not images:
            return []
        results = []
        for image, embedding in zip(images, self.encode(images), strict=True):
            # Only the crop covering the whole image (layer 0) reuses the embedding; with
            # crop_n_layers > 0 the smaller crops are encoded one by one, as SAM does.
            self.predictor.waiting = embedding
            try:
                results.append(self.generate(image))
            finally:
                self.predictor.waiting = None
        return results


def batched_generator(
    model: Sam, generator_kwargs: dict[str, Any], bf16: bool = True
) -> BatchedMaskGenerator:
    """The generator for `model` with the user's settings (SAM's defaults otherwise); on
    CUDA, prompts are decoded CUDA_POINTS_PER_BATCH at a time unless the user set it."""
    kwargs = dict(generator_kwargs)
    if model.device.type == "cuda":
        kwargs.setdefault("points_per_batch", CUDA_POINTS_PER_BATCH)
    return BatchedMaskGenerator(model, bf16=bf16, output_mode="coco_rle", **kwargs)
